"""Attention of one query token per sequence (decoding) over the static or the paged KV cache: C++ XLA FFI
kernels on CPU.

XLA:CPU runs a decode step's two small attention products as batched library matmuls at a fixed cost per (row, kv
head) whatever their size (a large part of an int8 decode step: benchmarks/RESULTS.md, decode), and the paged
reference first gathers every row's pages into a copy. `decode_attention_cpu.cc` reads each (row, kv head)'s keys
and values once, in place, for all its query heads. The kernels are built at first use (`cpu_build.py`) and chosen
only when compiling for the CPU (`platform.py`); where they can't be, on other platforms, for more than one query or
for non-fp32 operands, these are the XLA references. The static-cache form has the reference's gradient; the paged
one is for inference only. The paged kernel also reads quantized pages (int8 / int4 codes with an fp32 scale and zero
per (token, kv head): model/kv_quant.py's `QuantizedKV`, which this module knows only by its fields `codes`,
`scale_zero` and `kv_dtype`), dequantizing a block of rows at a time as the XLA reference dequantizes them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.kernels.cpu_build import register_cpu_kernel
from internlm2_jax.kernels.platform import compiling_for_cpu
from internlm2_jax.kernels.reference import dense_attention, paged_attention_reference

TARGET = "internlm2_decode_attention"
PAGED_TARGET = "internlm2_paged_decode_attention"
QUANTIZED_PAGED_TARGET = "internlm2_paged_decode_attention_quantized"
_BITS = {"int8": 8, "int4": 4}


def cpu_kernel_available() -> bool:
    return register_cpu_kernel("decode_attention_cpu.cc", "DecodeAttention", TARGET)


def paged_cpu_kernel_available() -> bool:
    return register_cpu_kernel("decode_attention_cpu.cc", "PagedDecodeAttention", PAGED_TARGET)


def quantized_paged_cpu_kernel_available() -> bool:
    return register_cpu_kernel("decode_attention_cpu.cc", "PagedDecodeAttentionQuantized", QUANTIZED_PAGED_TARGET)


def paged_kernel_applies(q_dtype, cache_dtype, kv_dtype: str | None = None) -> bool:
    """Whether one-query decoding over the paged cache runs the CPU kernel here: fp32 queries over an fp32 cache,
    or over an int8 / int4 one (`kv_dtype`; `cache_dtype` then plays no part)."""
    if jnp.dtype(q_dtype) != jnp.float32 or not compiling_for_cpu():
        return False
    if kv_dtype is not None:
        return kv_dtype in _BITS and quantized_paged_cpu_kernel_available()
    return jnp.dtype(cache_dtype) == jnp.float32 and paged_cpu_kernel_available()


def pages_kv_dtype(pages) -> str | None:
    """The kv_dtype of paged K or V: None for a float array, else the quantized pages' own."""
    return None if isinstance(pages, jax.Array) else pages.kv_dtype


def pages_dtype(pages):
    """The dtype of float pages; for quantized pages the dtype they dequantize to (fp32)."""
    return pages.dtype if isinstance(pages, jax.Array) else jnp.float32


def _on_cpu_in_fp32(*arrays) -> bool:
    return compiling_for_cpu() and all(a.dtype == jnp.float32 for a in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(scale, q, kt, vt, mask):
    batch, _, heads, head_dim = q.shape
    out = jax.ShapeDtypeStruct((batch, heads, head_dim), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(q[:, 0], kt, vt, mask[:, 0], scale=np.float32(scale))[:, None]


def _kernel_fwd(scale, q, kt, vt, mask):
    return _kernel(scale, q, kt, vt, mask), (q, kt, vt, mask)


def _kernel_bwd(scale, residuals, g):
    q, kt, vt, mask = residuals
    _, pullback = jax.vjp(lambda q, kt, vt: dense_attention(scale, q, kt, vt, mask), q, kt, vt)
    return (*pullback(g), None)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def single_query_attention(q, k, v, mask, scale=None) -> jax.Array:
    """q [B, 1, H, D]; k, v [B, S, KV, D]; mask [B, 1, S] boolean; returns [B, 1, H, D] in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # head-major: the cache's own layout
    if q.shape[1] == 1 and _on_cpu_in_fp32(q, k, v) and cpu_kernel_available():
        return jax.lax.platform_dependent(q, kt, vt, mask, cpu=functools.partial(_kernel, scale),
                                          default=functools.partial(dense_attention, scale))
    return dense_attention(scale, q, kt, vt, mask)


def paged_single_query_attention(q, k_pages, v_pages, page_table, lengths, *, q_lengths=None, scale=None,
                                 row_widths=None) -> jax.Array:
    """`paged_attention_reference`'s arguments and result (q [B, chunk, H, D], k_pages, v_pages [KV, P, page, D],
    float or both quantized alike); the CPU kernel for one query per row (q_lengths 1, or 0 for a padding row),
    which needs no `row_widths`: it stops at each row's length."""
    kv_dtype = pages_kv_dtype(k_pages)
    if kv_dtype != pages_kv_dtype(v_pages):
        raise ValueError(f"K and V pages must be stored alike, got kv_dtype {kv_dtype!r} and "
                         f"{pages_kv_dtype(v_pages)!r}")
    cache_dtype = jnp.result_type(pages_dtype(k_pages), pages_dtype(v_pages))
    if q.shape[1] != 1 or not paged_kernel_applies(q.dtype, cache_dtype, kv_dtype):
        return paged_attention_reference(q, k_pages, v_pages, page_table, lengths, q_lengths=q_lengths, scale=scale,
                                         row_widths=row_widths)
    batch, _, heads, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    q_lengths = jnp.ones((batch,), jnp.int32) if q_lengths is None else jnp.asarray(q_lengths, jnp.int32)
    args = (q, k_pages, v_pages, jnp.asarray(page_table, jnp.int32), jnp.asarray(lengths, jnp.int32), q_lengths)

    def kernel(q, k_pages, v_pages, page_table, lengths, q_lengths):
        out = jax.ShapeDtypeStruct((batch, heads, head_dim), jnp.float32)
        if kv_dtype is None:
            call = jax.ffi.ffi_call(PAGED_TARGET, out, vmap_method="sequential")
            return call(q[:, 0], k_pages, v_pages, page_table, lengths, q_lengths, scale=np.float32(scale))[:, None]
        call = jax.ffi.ffi_call(QUANTIZED_PAGED_TARGET, out, vmap_method="sequential")
        return call(q[:, 0], k_pages.codes, k_pages.scale_zero, v_pages.codes, v_pages.scale_zero, page_table,
                    lengths, q_lengths, scale=np.float32(scale), bits=np.int32(_BITS[kv_dtype]))[:, None]

    def reference(q, k_pages, v_pages, page_table, lengths, q_lengths):
        return paged_attention_reference(q, k_pages, v_pages, page_table, lengths, q_lengths=q_lengths, scale=scale,
                                         row_widths=row_widths)

    return jax.lax.platform_dependent(*args, cpu=kernel, default=reference)
