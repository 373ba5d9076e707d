"""Context (sequence) parallelism of the training/prefill attention over the `sequence` mesh axis.

Each sequence shard keeps its own queries and gathers every shard's keys and values, with their positions and segment
ids, inside `jax.shard_map`. The masks are built from positions and segment ids, never from array indices, so causal
order and documents that straddle shard boundaries come out exact whatever the token layout. All-gather rather than
ring: with GQA the gathered K/V is small (InternLM2-7B, 8 kv heads: 512 MiB per layer for a 128K row in bf16), and the
kernels run unchanged on the gathered operands (long_context_and_quantization.md, gap 1). The backward comes from
autodiff: the transpose of `all_gather` is a reduce-scatter, which hands each shard the dK/dV of its own tokens.

The "ulysses" strategy (DeepSpeed-Ulysses) instead all-to-alls queries, keys and values from a sequence split to a
head split, runs whole sequences on a slice of the heads, and all-to-alls the output back; under GQA each kv head is
repeated only up to the sequence degree.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from internlm2_jax.config import CONTEXT_PARALLEL
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
                               *, strategy: str = "all_gather"):
    """`local_attention(q, k, v, q_positions=, kv_positions=, q_segment_ids=, kv_segment_ids=)` over the shards of
    the mesh set by `jax.set_mesh`, inputs and output sequence-sharded.

    Every axis is manual, as the Mosaic kernels need: the batch splits over the data-parallel axes and the kv heads
    (with their query-head groups) over `tensor`, as far as the sizes divide. `strategy`: "all_gather" (each shard's
    queries against the gathered K/V) or "ulysses" (an all-to-all trades the sequence split for a head split).
    """
    check_strategy(strategy)
    mesh = jax.sharding.get_abstract_mesh()
    shards = dict(mesh.shape)[AXIS]
    for name, length in (("query", q.shape[1]), ("key/value", k.shape[1])):
        if length % shards:
            raise ValueError(f"context-parallel attention over mesh.sequence={shards} needs the {name} length to be "
                             f"a multiple of it, got {length} (pad the rows, or use mesh.sequence=1)")
    batch, _, kv_heads, _ = logical_to_spec(("batch", None, "kv_heads", None), k.shape, dict(mesh.shape),
                                            ACTIVATION_RULES)
    heads, tokens = P(batch, AXIS, kv_heads, None), P(batch, AXIS)
    if strategy == "all_gather":
        body = functools.partial(_all_gather, local_attention)
    else:
        ways = 1 if kv_heads is None else dict(mesh.shape)[kv_heads]
        body = functools.partial(_ulysses, local_attention, _kv_repeats(q.shape[2] // ways, k.shape[2] // ways, shards))
    return jax.shard_map(body, mesh=mesh, in_specs=(heads,) * 3 + (tokens,) * 4, out_specs=heads,
                         check_vma=False)(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)


def _gather(x):
    return jax.lax.all_gather(x, axis_name=AXIS, axis=1, tiled=True)


def _all_gather(local_attention, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    return local_attention(q, _gather(k), _gather(v), q_positions=q_positions, kv_positions=_gather(kv_positions),
                           q_segment_ids=q_segment_ids, kv_segment_ids=_gather(kv_segment_ids))


def _kv_repeats(heads: int, kv_heads: int, shards: int) -> int:
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
