"""Context (sequence) parallelism of the training/prefill attention over the `sequence` mesh axis.

Each sequence shard keeps its own queries and gathers every shard's keys and values, with their positions and segment
ids, inside `jax.shard_map`. The masks are built from positions and segment ids, never from array indices, so causal
order and documents that straddle shard boundaries come out exact whatever the token layout. All-gather rather than
ring: with GQA the gathered K/V is small (InternLM2-7B, 8 kv heads: 512 MiB per layer for a 128K row in bf16), and the
kernels run unchanged on the gathered operands (long_context_and_quantization.md, gap 1). The backward comes from
autodiff: the transpose of `all_gather` is a reduce-scatter, which hands each shard the dK/dV of its own tokens.

The "ulysses" strategy (DeepSpeed-Ulysses) instead all-to-alls queries, keys and values from a sequence split to a
head split, runs whole sequences on a slice of the heads, and all-to-alls the output back; under GQA each kv head is
repeated only up to the sequence degree. All-gather moves fewer bytes up to sequence 4, Ulysses from 8 on.

No ring attention: it would need the kernels to return their log-sum-exp and a backward that rotates K, V, their ids
and dK/dV around the ring, while gathering K/V holds up to 256K and more for InternLM2-7B (8 kv heads) and keeps the
kernels unchanged.
"""

import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from internlm2_jax.config import CONTEXT_PARALLEL
from internlm2_jax.kernels.tiling import block_ranges, live_tiles
from internlm2_jax.parallel.sequence_layout import CONTIGUOUS, SequenceLayout, natural_order, sequence_layout
from internlm2_jax.parallel.sharding import ACTIVATION_RULES, logical_to_spec

AXIS = "sequence"
STRATEGIES = CONTEXT_PARALLEL


def sequence_shards() -> int:
    """How many ways the mesh set by `jax.set_mesh` splits the sequence (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"context-parallel strategy must be one of {STRATEGIES}, got {strategy!r}")


def context_parallel_attention(local_attention, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                               *, strategy: str = "all_gather", layout: str | None = None):
    """`local_attention(q, k, v, q_positions=, kv_positions=, q_segment_ids=, kv_segment_ids=)` over the shards of
    the mesh set by `jax.set_mesh`, inputs and output sequence-sharded.

    Every axis is manual, as the Mosaic kernels need: the batch splits over the data-parallel axes and the kv heads
    (with their query-head groups) over `tensor`, as far as the sizes divide. `strategy`: "all_gather" (each shard's
    queries against the gathered K/V) or "ulysses" (an all-to-all trades the sequence split for a head split).
    `layout` ("contiguous" | "zigzag", default: what the training pipeline gives this strategy,
    parallel/sequence_layout.py) is how the rows are laid out. Masks come from positions, so any layout is exact; the
    all-gather strategy un-permutes zigzag keys so the kernels' tile ranges stay tight.
    """
    check_strategy(strategy)
    mesh = jax.sharding.get_abstract_mesh()
    shards = dict(mesh.shape)[AXIS]
    arranged = sequence_layout(strategy, mesh) if layout is None else SequenceLayout(layout, shards)
    if strategy == "ulysses" and not arranged.identity:
        raise ValueError("ulysses context parallelism takes contiguous rows: its shards hold whole sequences, and a "
                         "zigzag layout would only loosen the kernels' tile ranges")
    for name, length in (("query", q.shape[1]), ("key/value", k.shape[1])):
        try:
            arranged.check_length(length)
        except ValueError as error:
            raise ValueError(f"context-parallel attention, {name} length: {error}") from None
    batch, _, kv_heads, _ = logical_to_spec(("batch", None, "kv_heads", None), k.shape, dict(mesh.shape),
                                            ACTIVATION_RULES)
    heads, tokens = P(batch, AXIS, kv_heads, None), P(batch, AXIS)
    if strategy == "all_gather":
        body = functools.partial(_all_gather, local_attention, arranged)
    else:
        ways = 1 if kv_heads is None else dict(mesh.shape)[kv_heads]
        body = functools.partial(_ulysses, local_attention, kv_repeats(q.shape[2] // ways, k.shape[2] // ways, shards))
    return jax.shard_map(body, mesh=mesh, in_specs=(heads,) * 3 + (tokens,) * 4, out_specs=heads,
                         check_vma=False)(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)


def _gather(x, layout: SequenceLayout = CONTIGUOUS):
    return natural_order(jax.lax.all_gather(x, axis_name=AXIS, axis=1, tiled=True), layout)


def _all_gather(local_attention, layout, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    return local_attention(q, _gather(k, layout), _gather(v, layout), q_positions=q_positions,
                           kv_positions=_gather(kv_positions, layout), q_segment_ids=q_segment_ids,
                           kv_segment_ids=_gather(kv_segment_ids, layout))


def kv_repeats(heads: int, kv_heads: int, shards: int) -> int:
    """How many copies of each (local) kv head Ulysses sends, so every shard gets whole query groups with their kv
    head: none when the kv heads split over `sequence`, else just enough to reach the sequence degree (never to
    every query head, which would multiply the K/V traffic by the group size)."""
    if heads % shards == 0 and kv_heads % shards == 0:
        return 1
    if heads % shards == 0 and shards % kv_heads == 0:
        return shards // kv_heads
    raise ValueError(f"ulysses context parallelism over mesh.sequence={shards} needs the query heads per tensor shard "
                     f"({heads}) to be a multiple of it and the kv heads per tensor shard ({kv_heads}) a multiple or "
                     "a divisor of it: change mesh.sequence or mesh.tensor, or use the all_gather strategy")


def _ulysses(local_attention, repeats, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    # Query heads are ordered [kv_heads, q_per_kv], so the contiguous slice of query heads that shard j receives
    # belongs to the groups of the kv heads it receives (with repeats, the one kv head j // repeats).
    k, v = (jnp.repeat(x, repeats, axis=2) for x in (k, v))
    to_heads = lambda x: jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)
    out = local_attention(to_heads(q), to_heads(k), to_heads(v), q_positions=_gather(q_positions),
                          kv_positions=_gather(kv_positions), q_segment_ids=_gather(q_segment_ids),
                          kv_segment_ids=_gather(kv_segment_ids))
    return jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)


def tiles_per_shard(layout: SequenceLayout, length: int, block: int = 512, *, unpermute: bool = True):
    """(live tiles, tiles visited) [shards] of one causal document of `length` tokens laid out by `layout`: each
    sequence shard's query blocks against the gathered keys, as the all-gather strategy hands them to the flash
    kernels (`unpermute=False`: in the gathered, laid-out order). Live tiles measure each shard's work (its balance);
    visited tiles (each query block's contiguous kv block range) what the kernels actually compute."""
    positions = jnp.asarray(layout.apply({"positions": np.arange(length, dtype=np.int32)[None]})["positions"])
    keys = natural_order(positions, layout) if unpermute else positions
    local = length // layout.shards
    live, visited = [], []
    for shard in range(layout.shards):
        queries = positions[:, shard * local:(shard + 1) * local]
        table = live_tiles(queries, keys, jnp.ones_like(queries), jnp.ones_like(keys), block, block, True)
        lo, hi = block_ranges(table)
        live.append(int(table.sum()))
        visited.append(int(jnp.sum(hi - lo + 1)))
    return np.asarray(live), np.asarray(visited)
