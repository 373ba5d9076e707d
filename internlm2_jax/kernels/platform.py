"""The platform a trace compiles for, which picks the back ends: CPU-only speed paths (the C++ FFI kernels, the
custom-VJP matmul and causal attention written for XLA:CPU) are chosen only when it is "cpu".

It is the platform of the devices of the mesh set by `jax.set_mesh` (abstract TPU devices in an ahead-of-time
compile on a CPU machine), else JAX's default backend, so a TPU or GPU program never gets a CPU path even when it is
traced on a CPU host. The CPU kernels are also wrapped in `jax.lax.platform_dependent`, so a program lowered for
another platform falls back to XLA's form whatever was chosen at trace time.
"""

from __future__ import annotations

import jax


def target_platform() -> str:
    """"cpu", "gpu", "tpu", ...: the platform being compiled for (see the module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)  # an abstract GPU device may name its toolkit


def compiling_for_cpu() -> bool:
    """Whether CPU-only speed paths may be chosen for the program being traced."""
    return target_platform() == "cpu"
