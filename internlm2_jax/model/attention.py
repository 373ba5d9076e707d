"""The attention entry points of the codebase (conventions.md); back ends are chosen by `impl`.

- `attention`: training and prefill over packed rows.
- `decode_attention` / `chunked_prefill_attention`: one or several new query tokens per sequence over the paged
  KV cache (`k_pages`/`v_pages` [kv_heads, num_pages, page_size, head_dim]).

`impl="auto"` picks the Pallas kernel of the default backend (TPU or GPU) and the XLA reference elsewhere. A Pallas
impl asked for on a machine without that accelerator runs the kernel in interpret mode (how the tests check it on
CPU); pass `interpret=False` to force real lowering, e.g. when compiling ahead of time for a TPU topology.
"""

import jax

from internlm2_jax.config import ATTENTION_IMPLS
from internlm2_jax.kernels import flash_gpu, flash_tpu, paged_gpu, paged_tpu
from internlm2_jax.kernels.reference import paged_attention_reference, xla_attention
from internlm2_jax.kernels.tiling import BlockSizes

_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def resolve_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "xla")
    return impl


def _interpret(impl: str, interpret: bool | None) -> bool:
    return jax.default_backend() != _PLATFORM[impl] if interpret is None else interpret


def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, impl="auto",
              scale=None, block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """Causal grouped-query attention over packed rows.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] (never repeated to all heads).
    Positions and segment ids are int32 [batch, len]. Segment id 0 is padding and attends to nothing; a token attends
    only within its own segment and, if causal, to key positions <= its own. `block_sizes` tunes the Pallas kernels
    (default: kernels.flash_gpu.DEFAULT_BLOCKS on GPU, 512 x 512 on TPU).
    """
    impl = resolve_impl(impl)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    kw = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, causal=causal, scale=scale)
    if impl == "xla":
        return xla_attention(q, k, v, **kw)
    kernel = flash_tpu.flash_attention if impl == "pallas_tpu" else flash_gpu.flash_attention
    return kernel(q, k, v, **kw, block_sizes=block_sizes, interpret=_interpret(impl, interpret))


def chunked_prefill_attention(q, k_pages, v_pages, page_table, lengths, *, q_lengths=None, impl="auto", scale=None,
                              interpret: bool | None = None) -> jax.Array:
    """Several new query tokens per sequence over the paged KV cache (their own keys already written to it).

    q [batch, chunk, heads, head_dim]; page_table [batch, max_pages] int32; lengths [batch] int32 tokens cached,
    the chunk included; q_lengths [batch] int32 valid queries per row (right-padded chunk; default all). Query i of
    row b has position lengths[b] - q_lengths[b] + i and attends causally; padded queries return zeros.
    """
    impl = resolve_impl(impl)
    if q.shape[2] % k_pages.shape[0]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k_pages.shape[0]})")
    if page_table.shape[0] != q.shape[0] or lengths.shape != (q.shape[0],):
        raise ValueError(f"page_table {page_table.shape} and lengths {lengths.shape} must have q's batch "
                         f"({q.shape[0]}) as their first dimension")
    if impl == "xla":
        return paged_attention_reference(q, k_pages, v_pages, page_table, lengths, q_lengths=q_lengths, scale=scale)
    kernel = paged_tpu.paged_attention if impl == "pallas_tpu" else paged_gpu.paged_attention
    return kernel(q, k_pages, v_pages, page_table, lengths, q_lengths=q_lengths, scale=scale,
                  interpret=_interpret(impl, interpret))


def decode_attention(q, k_pages, v_pages, page_table, lengths, *, impl="auto", scale=None,
                     interpret: bool | None = None) -> jax.Array:
    """One new token per sequence: q [batch, heads, head_dim] at position lengths[b] - 1 over the paged cache."""
    out = chunked_prefill_attention(q[:, None], k_pages, v_pages, page_table, lengths, impl=impl, scale=scale,
                                    interpret=interpret)
    return out[:, 0]
