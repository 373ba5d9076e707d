"""Attention of one query token per sequence (decoding with the static KV cache): a C++ XLA FFI kernel on CPU.

XLA:CPU runs a decode step's two small attention products as batched library matmuls that cost about 9 us per
(row, kv head) whatever their size, half of an int8 decode step at 16 rows. `decode_attention_cpu.cc` reads each
(row, kv head)'s keys and values once for all its query heads. The kernel is built at first use (`cpu_build.py`);
where it can't be, on other platforms, for more than one query or for non-fp32 operands, this is the XLA
reference's `dense_attention`. Its gradient is the reference's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.kernels.cpu_build import register_cpu_kernel
from internlm2_jax.kernels.reference import dense_attention

TARGET = "internlm2_decode_attention"


def cpu_kernel_available() -> bool:
    return register_cpu_kernel("decode_attention_cpu.cc", "DecodeAttention", TARGET)


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
    fp32 = all(a.dtype == jnp.float32 for a in (q, k, v))
    if q.shape[1] == 1 and fp32 and jax.default_backend() == "cpu" and cpu_kernel_available():
        return jax.lax.platform_dependent(q, kt, vt, mask, cpu=functools.partial(_kernel, scale),
                                          default=functools.partial(dense_attention, scale))
    return dense_attention(scale, q, kt, vt, mask)
