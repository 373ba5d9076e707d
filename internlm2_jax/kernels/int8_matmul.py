"""Weight-only int8 matmul `(x @ w) * scale` with fp32 activations: a C++ XLA FFI kernel on CPU, XLA elsewhere.

On XLA:CPU the int8 -> fp32 conversion in front of a matmul runs as a slow generic loop, so int8 decoding read a
quarter of the bytes and still ran slower than fp32. `int8_matmul_cpu.cc` converts the weights in registers as it
streams them, from the strip layout of `pack` (timings: benchmarks/RESULTS.md, decode). The kernel is built at
first use (`cpu_build.py`) and chosen only when compiling for the CPU (`platform.py`); where it can't be, and on GPU
and TPU, `int8_matmul` runs XLA's matmul of the unpacked weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from internlm2_jax.kernels.cpu_build import register_cpu_kernel
from internlm2_jax.kernels.platform import compiling_for_cpu

TARGET = "internlm2_int8_matmul"


def cpu_kernel_available() -> bool:
    return register_cpu_kernel("int8_matmul_cpu.cc", "Int8Matmul", TARGET)


STRIP = 64  # output columns per strip of a packed weight (the kernel's unit of work)


def pack(values: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The kernel's layout of an int8 [K, N] weight (N a multiple of 64): [N / 64, K, 64] strips, each read front
    to back; the [N] scales as they are."""
    k, n = values.shape
    if n % STRIP:
        raise ValueError(f"the CPU int8 kernel needs output channels in multiples of {STRIP}, got {n}")
    return values.reshape(k, n // STRIP, STRIP).transpose(1, 0, 2), scale.astype(jnp.float32)


def unpack(packed: jax.Array) -> jax.Array:
    """The int8 [K, N] weight of `pack`'s strips."""
    strips, k, _ = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, strips * STRIP)


def int8_matmul_xla(x: jax.Array, packed: jax.Array, scale: jax.Array) -> jax.Array:
    """The reference form: XLA's matmul of the unpacked weight."""
    return jnp.dot(x, unpack(packed).astype(jnp.float32), preferred_element_type=jnp.float32) * scale


def _int8_matmul_ffi(x, packed, scale):
    out = jax.ShapeDtypeStruct((x.shape[0], scale.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, packed, scale)


# Above this many rows (a long prefill) the product is compute-bound and XLA's conversion, done once for all rows,
# costs little: XLA's form is then as fast or faster (benchmarks/RESULTS.md, decode).
KERNEL_MAX_ROWS = 256


def int8_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array) -> jax.Array:
    """fp32 [M, N] = (x [M, K] @ weight) * scale for a weight and scales `pack`ed: the C++ kernel on CPU
    when it builds, XLA's matmul otherwise. Inference only: the kernel has no gradient."""
    x = x.astype(jnp.float32)
    if x.shape[0] <= KERNEL_MAX_ROWS and compiling_for_cpu() and cpu_kernel_available():
        return jax.lax.platform_dependent(x, packed, scale, cpu=_int8_matmul_ffi, default=int8_matmul_xla)
    return int8_matmul_xla(x, packed, scale)
