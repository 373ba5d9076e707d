"""Weight-only int8 matmul `(x @ w) * scale` with fp32 activations: a C++ XLA FFI kernel on CPU, XLA elsewhere.

On XLA:CPU the int8 -> fp32 conversion in front of a matmul runs as a slow generic loop (a [1, 512] x [512, 32768]
product: fp32 1.5 ms, int8 weights 17 ms), so int8 decoding read a quarter of the bytes and still ran slower than
fp32. `int8_matmul_cpu.cc` converts the weights in registers as it streams them (0.4-0.8 ms for that product).

The kernel is compiled from source with the system C++ compiler the first time it is needed (`-march=native`, a
few seconds) and cached under `$XDG_CACHE_HOME/internlm2_jax` by source, jaxlib version and CPU. Without a
compiler (or if the build fails) `int8_matmul` warns once and runs the XLA form: the same numbers, only slower.
On GPU and TPU it always runs the XLA form, whose fused conversion is fast there.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_name("int8_matmul_cpu.cc")
TARGET = "internlm2_int8_matmul"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _cpu_fingerprint() -> str:
    """The CPU's feature flags: a -march=native build cached on a shared home must not run on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "internlm2_jax"
    library = cache / f"int8_matmul_{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: concurrent builds never clash
        built = Path(tmp) / library.name
        subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                       check=True, capture_output=True, text=True)
        built.replace(library)
    return library


@functools.lru_cache(maxsize=None)
def cpu_kernel_available() -> bool:
    """Builds (once per machine) and registers the CPU kernel; False, with a warning saying why, if it can't."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Int8Matmul), platform="cpu")
        return True
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"int8 matmul falls back to XLA on CPU (several times slower than fp32 at batch 1): "
                      f"the C++ kernel could not be built: {detail}", RuntimeWarning, stacklevel=2)
        return False


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
# costs little: XLA's form is then as fast or faster (2048 rows x 512 x 1536: 12 ms against the kernel's 18 ms).
KERNEL_MAX_ROWS = 256


def int8_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array) -> jax.Array:
    """fp32 [M, N] = (x [M, K] @ weight) * scale for a weight and scales `pack`ed: the C++ kernel on CPU
    when it builds, XLA's matmul otherwise. Inference only: the kernel has no gradient."""
    x = x.astype(jnp.float32)
    if x.shape[0] <= KERNEL_MAX_ROWS and jax.default_backend() == "cpu" and cpu_kernel_available():
        return jax.lax.platform_dependent(x, packed, scale, cpu=_int8_matmul_ffi, default=int8_matmul_xla)
    return int8_matmul_xla(x, packed, scale)
