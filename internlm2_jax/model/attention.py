"""The attention entry points of the codebase (conventions.md); back ends are chosen by `impl`.

- `attention`: training and prefill over packed rows.
- `decode_attention` / `chunked_prefill_attention`: one or several new query tokens per sequence over the paged
  KV cache (`k_pages`/`v_pages` [kv_heads, num_pages, page_size, head_dim]).

`impl="auto"` picks the Pallas kernel of the target platform (TPU or GPU) and the XLA reference elsewhere (on CPU,
one query per row, i.e. decoding, goes to the C++ kernels of `kernels/decode_attention.py`); the
target is the platform of the mesh set by `jax.set_mesh`, so an ahead-of-time compile for a TPU topology on a CPU
machine gets the real TPU kernel. A Pallas impl asked for where the target is not that accelerator runs the kernel
in interpret mode (how the tests check it on CPU); `interpret=` overrides. Under a mesh with `sequence > 1`,
`attention` is context-parallel (model/context_parallel.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from internlm2_jax.config import ATTENTION_IMPLS, GPU_FLASH_KERNELS
from internlm2_jax.kernels import flash_gpu, flash_mgpu, flash_tpu, paged_gpu, paged_tpu
from internlm2_jax.kernels.decode_attention import (paged_kernel_applies, paged_single_query_attention, pages_dtype,
                                                    pages_kv_dtype, single_query_attention)
from internlm2_jax.kernels.platform import target_platform
from internlm2_jax.kernels.reference import attention_mask, paged_attention_reference, xla_attention
from internlm2_jax.kernels.tiling import BlockSizes
from internlm2_jax.model.context_parallel import check_strategy, context_parallel_attention, sequence_shards
from internlm2_jax.parallel.sharding import ACTIVATION_RULES, logical_to_spec

_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def resolve_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(target_platform(), "xla")
    return impl


def _interpret(impl: str, interpret: bool | None) -> bool:
    return target_platform() != _PLATFORM[impl] if interpret is None else interpret


def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, impl="auto",
              scale=None, block_sizes: BlockSizes | None = None, interpret: bool | None = None,
              shared_segment: int | None = None, gpu_flash_kernel: str = "triton",
              context_parallel: str = "all_gather") -> jax.Array:
    """Causal grouped-query attention over packed rows.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] (never repeated to all heads).
    Positions and segment ids are int32 [batch, len]. Segment id 0 is padding and attends to nothing; a token attends
    only within its own segment and, if causal, to key positions <= its own. `block_sizes` tunes the Pallas kernels
    (default: kernels.flash_gpu.DEFAULT_BLOCKS on GPU, 512 x 512 on TPU). `shared_segment` (XLA back end only)
    makes that segment's keys visible to every segment: a tree mask, several branches scored on one shared prefix.
    `gpu_flash_kernel` picks what "pallas_gpu" runs: "triton" (kernels/flash_gpu.py) or "mosaic" (the Hopper
    kernels of kernels/flash_mgpu.py, bf16/fp16 with head_dim a multiple of 64). Under a mesh with `sequence > 1`
    the sequence dimension is split over `sequence` and `context_parallel` picks the strategy, "all_gather" or
    "ulysses" (model/context_parallel.py).
    """
    impl = resolve_impl(impl)
    if gpu_flash_kernel not in GPU_FLASH_KERNELS:
        raise ValueError(f"gpu_flash_kernel must be one of {GPU_FLASH_KERNELS}, got {gpu_flash_kernel!r}")
    if shared_segment is not None and impl != "xla":
        raise ValueError(f"shared_segment is supported by the xla attention impl only, not {impl!r}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    check_strategy(context_parallel)
    ids = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    if impl == "xla":
        run = functools.partial(xla_attention, causal=causal, scale=scale, shared_segment=shared_segment)
    else:
        if impl == "pallas_tpu":
            kernel = flash_tpu.flash_attention
        else:
            kernel = flash_mgpu.flash_attention if gpu_flash_kernel == "mosaic" else flash_gpu.flash_attention
        run = functools.partial(kernel, causal=causal, scale=scale, block_sizes=block_sizes,
                                interpret=_interpret(impl, interpret))
    if sequence_shards() > 1:
        return context_parallel_attention(run, q, k, v, *ids, strategy=context_parallel)
    if impl == "xla" and q.shape[1] == 1 and target_platform() == "cpu":  # decoding: the CPU kernel
        mask = attention_mask(*ids, causal, shared_segment)
        rows, heads = _row_and_head_specs(q.shape[0], k.shape[2])
        return _shard_rows_and_heads(functools.partial(single_query_attention, scale=scale), (q, k, v, mask),
                                     in_specs=(P(rows, None, heads, None),) * 3 + (P(rows, None, None),),
                                     out_spec=P(rows, None, heads, None))
    if impl == "xla":
        return run(q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids)
    return _per_shard(run, q, k, v, *ids)


def _per_shard(kernel, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Runs a Pallas kernel on each shard of the mesh set by `jax.set_mesh`.

    Mosaic kernels cannot be partitioned by XLA, so under a multi-device mesh they run inside `jax.shard_map`: the
    batch split over the data-parallel axes and KV heads (with their query-head groups) over `tensor`, as far as
    the sizes divide; every shard sees whole sequences.
    """

    def call(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
        return kernel(q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids)

    args = (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return call(*args)
    batch, _, kv_heads, _ = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, dict(mesh.shape),
                                            ACTIVATION_RULES)
    heads_spec, ids_spec = P(batch, None, kv_heads, None), P(batch, None)
    return jax.shard_map(call, mesh=mesh, in_specs=(heads_spec,) * 3 + (ids_spec,) * 4, out_specs=heads_spec,
                         check_vma=False)(*args)


def _row_and_head_specs(batch: int, kv_heads: int):
    """How rows and kv heads split over the mesh set by `jax.set_mesh` (None: not split)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    return tuple(logical_to_spec(("batch", "kv_heads"), (batch, kv_heads), dict(mesh.shape), ACTIVATION_RULES))


def _shard_rows_and_heads(kernel, args, *, in_specs, out_spec):
    """`kernel(*args)` on each shard of the mesh set by `jax.set_mesh` (rows over the data-parallel axes, kv heads
    with their query heads over `tensor`): XLA cannot partition a custom call (the CPU kernels) or a Mosaic kernel,
    and would gather every operand to every device instead."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*args)
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def decode_reads_pages_in_place(impl: str, q_dtype, cache_dtype, kv_dtype: str | None = None) -> bool:
    """Whether one-query decoding over the paged cache runs the CPU kernel with this impl, compute and cache dtype
    (or int8 / int4 `kv_dtype`). That kernel stops at each row's length, so neither the page-table width nor
    `row_widths` changes its cost."""
    return (resolve_impl(impl) == "xla" and target_platform() == "cpu"
            and paged_kernel_applies(q_dtype, cache_dtype, kv_dtype))


def chunked_prefill_attention(q, k_pages, v_pages, page_table, lengths, *, q_lengths=None, impl="auto", scale=None,
                              interpret: bool | None = None, row_widths: tuple[int, ...] | None = None) -> jax.Array:
    """Several new query tokens per sequence over the paged KV cache (their own keys already written to it).

    q [batch, chunk, heads, head_dim]; page_table [batch, max_pages] int32; lengths [batch] int32 tokens cached,
    the chunk included; q_lengths [batch] int32 valid queries per row (right-padded chunk; default all). Query i of
    row b has position lengths[b] - q_lengths[b] + i and attends causally; padded queries return zeros.
    `row_widths`: a static bound on the pages of groups of rows, which the XLA back end uses to gather less (see
    `paged_attention_reference`); the kernels need none, as they stop at each row's length.

    Quantized pages (model/kv_quant.QuantizedKV, int8 / int4) are read by the CPU decode kernel where it applies
    and otherwise by the XLA reference, which dequantizes the gathered pages only: the Pallas kernels read float
    pages, so `pallas_tpu` / `pallas_gpu` run the reference for a quantized cache.
    """
    impl = resolve_impl(impl)
    if q.shape[2] % k_pages.shape[0]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k_pages.shape[0]})")
    if page_table.shape[0] != q.shape[0] or lengths.shape != (q.shape[0],):
        raise ValueError(f"page_table {page_table.shape} and lengths {lengths.shape} must have q's batch "
                         f"({q.shape[0]}) as their first dimension")
    kv_dtype = pages_kv_dtype(k_pages)
    cache_dtype = jnp.result_type(pages_dtype(k_pages), pages_dtype(v_pages))
    if q.shape[1] == 1 and decode_reads_pages_in_place(impl, q.dtype, cache_dtype, kv_dtype):
        kernel = functools.partial(paged_single_query_attention, scale=scale, row_widths=row_widths)
    elif impl == "xla" or kv_dtype is not None:  # XLA partitions the gather itself
        return paged_attention_reference(q, k_pages, v_pages, page_table, lengths, q_lengths=q_lengths, scale=scale,
                                         row_widths=row_widths)
    else:
        kernel = functools.partial(paged_tpu.paged_attention if impl == "pallas_tpu" else paged_gpu.paged_attention,
                                   scale=scale, interpret=_interpret(impl, interpret))
    q_lengths = jnp.full(lengths.shape, q.shape[1], jnp.int32) if q_lengths is None else q_lengths
    rows, heads = _row_and_head_specs(q.shape[0], k_pages.shape[0])
    pages = P(heads, None, None, None)  # each kv head's pages on its shard, whole on every data replica
    return _shard_rows_and_heads(lambda q, k, v, t, n, m: kernel(q, k, v, t, n, q_lengths=m),
                                 (q, k_pages, v_pages, page_table, lengths, q_lengths),
                                 in_specs=(P(rows, None, heads, None), pages, pages, P(rows, None), P(rows), P(rows)),
                                 out_spec=P(rows, None, heads, None))


def decode_attention(q, k_pages, v_pages, page_table, lengths, *, impl="auto", scale=None,
                     interpret: bool | None = None) -> jax.Array:
    """One new token per sequence: q [batch, heads, head_dim] at position lengths[b] - 1 over the paged cache."""
    out = chunked_prefill_attention(q[:, None], k_pages, v_pages, page_table, lengths, impl=impl, scale=scale,
                                    interpret=interpret)
    return out[:, 0]
