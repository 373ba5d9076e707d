"""Builds and registers the C++ XLA FFI kernels for CPU (`*_cpu.cc` here, sharing `cpu_parallel.h`).

Each is compiled from source with the system C++ compiler the first time it is needed (`-march=native`, a few
seconds) and cached under `$XDG_CACHE_HOME/internlm2_jax`, keyed by its sources, the jaxlib version (the FFI
headers) and the CPU. Without a compiler, or if a build fails, `register_cpu_kernel` warns once and returns False:
callers then run their XLA form, the same numbers, only slower.
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
import jaxlib

KERNELS = Path(__file__).parent
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


def _build(source: Path, compiler: str) -> Path:
    parts = [source.read_bytes(), *(h.read_bytes() for h in sorted(KERNELS.glob("*.h"))), jaxlib.__version__.encode(),
             " ".join(_FLAGS).encode(), _cpu_fingerprint().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "internlm2_jax"
    library = cache / f"{source.stem}_{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: concurrent builds never clash
        built = Path(tmp) / library.name
        subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{KERNELS}", str(source), "-o",
                        str(built)], check=True, capture_output=True, text=True)
        built.replace(library)
    return library


@functools.lru_cache(maxsize=None)
def register_cpu_kernel(source: str, symbol: str, target: str) -> bool:
    """Builds `source` (once per machine) and registers its handler `symbol` as the FFI target `target` on CPU;
    False, with a warning saying why, if it can't."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        library = ctypes.cdll.LoadLibrary(str(_build(KERNELS / source, compiler)))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        return True
    except (OSError, RuntimeError, AttributeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"{target} falls back to XLA on CPU (slower): the C++ kernel {source} could not be built: "
                      f"{detail}", RuntimeWarning, stacklevel=2)
        return False
