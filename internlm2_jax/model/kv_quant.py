"""KV cache quantization (int8 and int4, LMDeploy's `quant_policy` 8 / 4): asymmetric per (token, kv head) over
head_dim, quantized when K/V are written to a cache and dequantized when attention reads them.

    scale = max(max - min, 1e-6) / L,   zero = -min / scale,   q = clamp(floor(x / scale + zero + 0.5), 0, L)
    x ~ (q - zero) * scale,   L = 255 (int8) or 15 (int4)

as LMDeploy's `_quant_int8` / `_quant_int4` compute them (theirs truncates; the same after the clamp at 0), with
three differences. The code is computed as floor((x - min) / scale + 0.5), the same number without the fp32
rounding of x / scale + zero, which is large for a vector far from 0 against its range (|zero| >> L). The range has
a 1e-6 guard (LMDeploy has none; MaxText's absmax divides by 0 on a zero row). A constant vector (max == min, e.g.
padding's zeros) is stored with scale |value| and zero -sign(value), so it decodes to exactly its value: with the
guarded scale, (value / scale) * scale misses by an ulp in ~5% of rows. Decoding keeps the format's own rounding:
(q - zero) in fp32 is exact to about |zero| * 2^-24 steps.

Codes are uint8: int8 one per element, int4 two per byte along head_dim, element 2j in the high nibble and 2j + 1 in
the low (model/int4.py's order, along the last axis here). LMDeploy pairs element d with d + D/2 instead; the bytes
differ, the values do not. Scale and zero are fp32 pairs `scale_zero [..., 2]` beside the codes: fp16 would match
LMDeploy's 4 bytes per (token, head), bf16's 8-bit mantissa is as coarse as an int8 step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from internlm2_jax.model.packed_weight import pack_nibbles, unpack_nibbles

KV_DTYPES = ("int8", "int4")
LEVELS = {"int8": 255, "int4": 15}
MIN_RANGE = 1e-6  # the guard on max - min


def check_kv_dtype(kv_dtype, where: str) -> None:
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"{where}: kv_dtype must be None (the float cache), 'int8' or 'int4', got {kv_dtype!r}")


@struct.dataclass
class QuantizedKV:
    """Quantized K or V: codes and their per-vector scale and zero, sharing every axis but the last.

    It reads like the float array it stands for where a cache is read: `shape` is the float shape, indexing and
    `swapaxes` act on the leading axes of both leaves, and `astype(dtype)` dequantizes, so a reader written for a
    float cache (`kv.k[layer].swapaxes(1, 2).astype(q.dtype)`) reads a quantized one unchanged."""

    codes: jax.Array  # uint8 [..., head_dim] (int8) or [..., head_dim / 2] (int4)
    scale_zero: jax.Array  # fp32 [..., 2]: scale, zero
    kv_dtype: str = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        per_byte = 2 if self.kv_dtype == "int4" else 1
        return (*self.codes.shape[:-1], per_byte * self.codes.shape[-1])

    def __getitem__(self, index) -> QuantizedKV:
        if isinstance(index, tuple) or index is Ellipsis:
            raise IndexError(f"quantized K/V are indexed on their first axis only, got {index!r}")
        return self.replace(codes=self.codes[index], scale_zero=self.scale_zero[index])

    def swapaxes(self, a: int, b: int) -> QuantizedKV:
        last = len(self.shape) - 1
        if last in (a % len(self.shape), b % len(self.shape)):
            raise ValueError("quantized K/V swap their leading axes only (head_dim is the quantized axis)")
        return self.replace(codes=self.codes.swapaxes(a, b), scale_zero=self.scale_zero.swapaxes(a, b))

    def astype(self, dtype) -> jax.Array:
        return kv_dequantize(self, dtype)


def kv_quantize(x: jax.Array, kv_dtype: str) -> QuantizedKV:
    """`x` [..., head_dim] quantized per vector (one (token, kv head) each)."""
    check_kv_dtype(kv_dtype, "kv_quantize")
    if kv_dtype == "int4" and x.shape[-1] % 2:
        raise ValueError(f"int4 K/V pack two codes per byte: head_dim must be even, got {x.shape[-1]}")
    return _quantize(x, kv_dtype)


@functools.partial(jax.jit, static_argnums=1)
def _quantize(x: jax.Array, kv_dtype: str) -> QuantizedKV:
    levels = LEVELS[kv_dtype]
    x = x.astype(jnp.float32)
    low, high = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    span = high - low
    constant_scale = jnp.where(low != 0, jnp.abs(low), MIN_RANGE / levels)
    scale = jnp.where(span > 0, jnp.maximum(span, MIN_RANGE) / levels, constant_scale)
    zero = -low / scale
    q = jnp.clip(jnp.floor((x - low) / scale + 0.5), 0, levels).astype(jnp.uint8)
    codes = pack_nibbles(q[..., None])[..., 0] if kv_dtype == "int4" else q
    return QuantizedKV(codes, jnp.concatenate([scale, zero], axis=-1), kv_dtype)


def kv_codes(kv: QuantizedKV) -> jax.Array:
    """uint8 [..., head_dim]: one code per element (int4 unpacked)."""
    return unpack_nibbles(kv.codes[..., None])[..., 0] if kv.kv_dtype == "int4" else kv.codes


def kv_dequantize(kv: QuantizedKV, dtype=jnp.float32) -> jax.Array:
    """[..., head_dim] in `dtype`: (q - zero) * scale in fp32, then cast."""
    scale, zero = kv.scale_zero[..., 0:1], kv.scale_zero[..., 1:2]
    return ((kv_codes(kv).astype(jnp.float32) - zero) * scale).astype(dtype)


def stored_as(like, x: jax.Array):
    """`x` [..., head_dim] in the form of the cache buffer `like`: quantized for a `QuantizedKV`, else cast."""
    if isinstance(like, QuantizedKV):
        return kv_quantize(x, like.kv_dtype)
    return x.astype(like.dtype)


def map_kv(fn, buffer, axes: tuple[str | None, ...]):
    """`fn(array, logical axes)` on a float K/V buffer whose last axis is head_dim, or on both leaves of a quantized
    one: the codes take the buffer's axes, the scales the same axes with a replicated pair in place of head_dim."""
    if isinstance(buffer, QuantizedKV):
        return buffer.replace(codes=fn(buffer.codes, axes), scale_zero=fn(buffer.scale_zero, (*axes[:-1], None)))
    return fn(buffer, axes)


def kv_zeros(shape: tuple[int, ...], kv_dtype: str) -> QuantizedKV:
    """An empty quantized buffer of float shape `shape`: zero codes, scales and zeros, which decode to 0."""
    check_kv_dtype(kv_dtype, "kv_zeros")
    per_byte = 2 if kv_dtype == "int4" else 1
    return QuantizedKV(jnp.zeros((*shape[:-1], shape[-1] // per_byte), jnp.uint8),
                       jnp.zeros((*shape[:-1], 2), jnp.float32), kv_dtype)


def vector_bytes(head_dim: int, dtype, kv_dtype: str | None) -> int:
    """Bytes of one (token, kv head) K or V vector: head_dim elements of `dtype`, or codes plus fp32 scale and zero."""
    check_kv_dtype(kv_dtype, "vector_bytes")
    if kv_dtype is None:
        return head_dim * jnp.dtype(dtype).itemsize
    return head_dim // (2 if kv_dtype == "int4" else 1) + 2 * 4
