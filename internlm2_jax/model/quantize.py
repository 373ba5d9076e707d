"""Weight-only int8 quantization for decoding: the projection matrices as int8 with one fp32 scale per output
channel (symmetric, absmax / 127), dequantized inside the matmul. Embeddings, norms and biases stay in floating
point (the embedding is a gather, and a tied head shares it). For inference only: `token_logprobs` and the train
step expect floating-point weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from internlm2_jax.kernels.int8_matmul import STRIP, cpu_kernel_available, int8_matmul, pack, unpack
from internlm2_jax.kernels.platform import compiling_for_cpu
from internlm2_jax.parallel.mesh import mesh_of

# Parameter name -> how many leading dimensions its matmul contracts (the rest are output channels).
QUANTIZED = {"wqkv": 1, "wo": 2, "w1": 1, "w3": 1, "w2": 1, "output": 1}


@struct.dataclass
class Int8Weight:
    values: jax.Array  # int8: the weight's shape, or the CPU kernel's strips when packed (kernels/int8_matmul.py)
    scale: jax.Array  # fp32: the weight's shape with the contracted dimensions 1 (packed: [output channels])
    packed_shape: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)  # the weight's, if packed
    packed_contracted: int = struct.field(pytree_node=False, default=0)

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("an int8 weight is read whole (`param[...]`)")
        return self

    @property
    def shape(self):
        return self.values.shape if self.packed_shape is None else self.packed_shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        if self.packed_shape is None:
            return (self.values.astype(jnp.float32) * self.scale).astype(dtype)
        dense = unpack(self.values).astype(jnp.float32) * self.scale
        return dense.reshape(self.packed_shape).astype(dtype)


def int8_dense(x: jax.Array, w: Int8Weight, contracted: int) -> jax.Array:
    """fp32 product of x's last `contracted` dimensions with w's first ones: through the CPU kernel when w is
    packed for it, else XLA's matmul of the converted weight."""
    k, n = math.prod(w.shape[:contracted]), math.prod(w.shape[contracted:])
    rows = x.reshape(-1, k)
    if w.packed_shape is not None and w.packed_contracted == contracted:
        out = int8_matmul(rows, w.values, w.scale)
    else:  # XLA's matmul of the weight converted to fp32
        out = jnp.dot(rows.astype(jnp.float32), w.dequantize().reshape(k, n), preferred_element_type=jnp.float32)
    return out.reshape(*x.shape[:x.ndim - contracted], *w.shape[contracted:])


def packable(shape, contracted: int, leading: int = 0) -> bool:
    """Whether the CPU kernel takes this weight: not a stacked layer axis (a scan slices it per layer), and output
    channels in whole strips (every projection of the released sizes; not all of the tiny test presets)."""
    return leading == 0 and math.prod(shape[contracted:]) % STRIP == 0


def quantize_weight(w: jax.Array, contracted: int, leading: int = 0, packed: bool = False) -> Int8Weight:
    """Int8 of `w` with per-output-channel scales; `leading` batch-like dimensions (a scanned layer stack) keep
    their own scales. `packed` lays it out for the CPU kernel (see `packable`)."""
    axes = tuple(range(leading, leading + contracted))
    absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    values = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
    if not packed:
        return Int8Weight(values, scale)
    if not packable(w.shape, contracted, leading):
        raise ValueError(f"a weight of shape {w.shape} ({leading} leading dimensions) can't be packed for the "
                         f"CPU kernel")
    k, n = math.prod(w.shape[:contracted]), math.prod(w.shape[contracted:])
    values, scale = pack(values.reshape(k, n), scale.reshape(n))
    return Int8Weight(values, scale, tuple(w.shape), contracted)


def quantize_int8(model: nnx.Module, packed: bool | None = None) -> nnx.Module:
    """A copy of an InternLM2 model with its projection weights as `Int8Weight`s (the other arrays shared).

    A copy, not in place: modules merged from one state share their Variables, so quantizing in place would also
    quantize every other model made from the same training state. `packed` lays the weights out for the CPU kernel
    (default: when JAX runs on CPU and the kernel builds), each weight `packable` for it."""
    if packed is None:  # the kernel is a custom call, which XLA cannot split over a mesh
        mesh = mesh_of(nnx.state(model))
        packed = compiling_for_cpu() and cpu_kernel_available() and (mesh is None or mesh.size == 1)
    model = nnx.clone(model)
    stacked = getattr(getattr(model, "cfg", None), "scan_layers", False)
    for path, var in nnx.iter_graph(model):
        if not (isinstance(var, nnx.Param) and path and path[-1] in QUANTIZED):
            continue
        if not isinstance(var.get_value(), Int8Weight):
            leading = 1 if stacked and "layers" in path else 0
            var.set_value(quantize_weight(var.get_value(), QUANTIZED[path[-1]], leading,
                                          packed and packable(var.shape, QUANTIZED[path[-1]], leading)))
    return model


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every parameter array (int8 values and their scales counted as stored)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
