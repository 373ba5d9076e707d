"""Weight-only quantization for decoding. `quantize_int8`: the projection matrices and the output head as int8 with
one fp32 scale per output channel (symmetric, absmax / 127), dequantized inside the matmul. `quantize_int4_model`:
the decoder's projections as `Int4Weight` (model/int4.py: AWQ's asymmetric uint4 in groups of 128 inputs, W4A16).
Embeddings, norms and biases stay in floating point (the embedding is a gather, and a tied head shares it). For
inference only: `token_logprobs` and the train step expect floating-point weights. `quantize_nf4_model`: the same
projections in QLoRA's NF4 (model/nf4.py), to decode with or compare against the other formats.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from internlm2_jax.kernels.int8_matmul import STRIP, cpu_kernel_available, int8_matmul, pack, unpack
from internlm2_jax.kernels.platform import compiling_for_cpu
from internlm2_jax.model import nf4
from internlm2_jax.model.int4 import Int4Weight, quantize_projection
from internlm2_jax.parallel import DEFAULT_RULES
from internlm2_jax.parallel.mesh import mesh_of, state_shardings

# Parameter name -> how many leading dimensions its matmul contracts (the rest are output channels).
QUANTIZED = {"wqkv": 1, "wo": 2, "w1": 1, "w3": 1, "w2": 1, "output": 1}
# The decoder's projections, which int4 quantizes. The output head stays in floating point there, as AutoAWQ and
# LMDeploy keep it: the AWQ checkpoint format has no quantized head (so an int4 model saves and loads as AWQ), and
# the head is the projection most sensitive to rounding (all of the vocabulary's logits).
INT4_PROJECTIONS = ("wqkv", "wo", "w1", "w3", "w2")
QUANTIZE_MODES = ("int8", "int4", "nf4")  # `quantize_model`'s modes: what load_model(quantize=...) accepts


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
    """A copy of an InternLM2 model with its projection weights and output head as `Int8Weight`s (the other arrays
    shared; see `_quantize_projections`). `packed` lays the weights out for the CPU kernel (default: when JAX runs
    on CPU and the kernel builds), each weight `packable` for it."""
    if packed is None:  # the kernel is a custom call, which XLA cannot split over a mesh
        mesh = mesh_of(nnx.state(model))
        packed = compiling_for_cpu() and cpu_kernel_available() and (mesh is None or mesh.size == 1)

    def convert(value, contracted, leading):
        return quantize_weight(value, contracted, leading, packed and packable(value.shape, contracted, leading))

    return _quantize_projections(model, tuple(QUANTIZED), Int8Weight, convert)


def _projections(model: nnx.Module, names) -> list[tuple[tuple, nnx.Param, int]]:
    """(path, variable, leading stack dimensions) of every parameter named in `names`."""
    stacked = getattr(getattr(model, "cfg", None), "scan_layers", False)
    return [(path, var, 1 if stacked and "layers" in path else 0) for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param) and path and path[-1] in names]


def _quantize_projections(model: nnx.Module, names, kind: type, convert) -> nnx.Module:
    """A copy of `model` with each parameter named in `names` replaced by `convert(value, contracted, leading)`,
    a `kind`; one already a `kind` is kept, one in another quantized format is an error (it would be rounded twice).

    A copy, not in place: modules merged from one state share their Variables, so quantizing in place would also
    quantize every other model made from the same training state."""
    model = nnx.clone(model)
    for path, var, leading in _projections(model, names):
        value = var.get_value()
        if isinstance(value, kind):
            continue
        if not isinstance(value, jax.Array):
            raise ValueError(f"{'/'.join(map(str, path))} is quantized already ({type(value).__name__}): only "
                             f"floating-point weights become {kind.__name__}s")
        var.set_value(convert(value, QUANTIZED[path[-1]], leading))
    return model


def quantize_int4_model(model: nnx.Module, group: int = 128, rules=DEFAULT_RULES) -> nnx.Module:
    """A copy of an InternLM2 model with its decoder projections (`INT4_PROJECTIONS`) as `Int4Weight`s in groups
    of `group` inputs, rounded to nearest (AWQ calibration folds its scales into the float weights before); the rest
    shared, the output head in floating point. A sharded model's int4 leaves are placed by `rules` (each leaf's
    `leaf_axes`). A `group` that does not divide some weight's inputs is a ValueError naming the weights and a group
    that fits."""
    def convert(value, contracted, leading):
        return quantize_projection(value, contracted, leading, group)

    return _quantize_decoder(model, Int4Weight, convert, rules, label="int4", field="group", in_block=group)


def quantize_nf4_model(model: nnx.Module, block: int = 64, absmax_block: int = 256,
                       rules=DEFAULT_RULES) -> nnx.Module:
    """A copy of an InternLM2 model with its decoder projections as double-quantized `NF4Weight`s (QLoRA's frozen
    base format, model/nf4.py: blocks of `block` inputs, absmax codes in blocks of `absmax_block` outputs), for
    decoding or comparing formats; the head and the rest as `quantize_int4_model` leaves them."""
    def convert(value, contracted, leading):
        return nf4.quantize_projection(value, contracted, leading, block=block, absmax_block=absmax_block)

    return _quantize_decoder(model, nf4.NF4Weight, convert, rules, label="NF4", field="block", in_block=block,
                             out_block=absmax_block)


def _quantize_decoder(model, kind: type, convert, rules, *, label: str, field: str, in_block: int,
                      out_block: int | None = None):
    """`_quantize_projections` of the decoder's projections, after checking that `in_block` (the format's `field`)
    divides every weight's inputs (and `out_block` its outputs), with the packed leaves placed by `rules` on a
    sharded model."""
    misfits, fits = [], in_block
    for path, var, leading in _projections(model, INT4_PROJECTIONS):
        if isinstance(var.get_value(), kind):  # kept in its own blocks (an AWQ checkpoint's)
            continue
        contracted = QUANTIZED[path[-1]]
        inputs = math.prod(var.shape[leading:leading + contracted])
        outputs = math.prod(var.shape[leading + contracted:])
        fits = math.gcd(fits, inputs)
        if inputs % in_block or (out_block and outputs % out_block):
            misfits.append(f"{'/'.join(map(str, path))} ({inputs} inputs, {outputs} outputs)")
    if misfits:
        hint = f"; {field}={fits} divides every projection's inputs" if fits % 2 == 0 else ""
        more = f" and {len(misfits) - 4} more" if len(misfits) > 4 else ""
        outputs = f" (nor {out_block} their outputs)" if out_block else ""
        raise ValueError(f"{label} {field} {in_block}{outputs} does not divide {', '.join(misfits[:4])}{more}{hint}")
    mesh = mesh_of(nnx.state(model))
    quantized = _quantize_projections(model, INT4_PROJECTIONS, kind, convert)
    if mesh is not None:  # XLA's choice of output sharding for the packed leaves would be arbitrary
        for _, var, _ in _projections(quantized, INT4_PROJECTIONS):
            var.set_value(jax.device_put(var.get_value(), state_shardings(var, mesh, rules).get_value()))
    return quantized


def weight_format(model: nnx.Module) -> str:
    """"int8", "int4", "nf4" or "float": how the model's decoder projections are stored."""
    formats = {Int8Weight: "int8", Int4Weight: "int4", nf4.NF4Weight: "nf4"}
    found = {formats.get(type(var.get_value()), "float") for _, var, _ in _projections(model, INT4_PROJECTIONS)}
    if len(found) != 1:
        raise ValueError(f"the decoder's projections mix weight formats: {sorted(found)}")
    return found.pop()


def check_quantize_mode(mode: str | None) -> None:
    if mode not in (None, *QUANTIZE_MODES):
        raise ValueError(f"quantize must be one of {', '.join(map(repr, QUANTIZE_MODES))} (weight-only, for "
                         f"decoding) or None, got {mode!r}")


def quantize_model(model: nnx.Module, mode: str | None, rules=DEFAULT_RULES) -> nnx.Module:
    """`model` with weight-only `mode` quantization (`QUANTIZE_MODES`; None: as it is), for decoding; int4 in
    groups of 128, NF4 in blocks of 64 (double-quantized), placed by `rules` on a sharded model's mesh."""
    check_quantize_mode(mode)
    if mode is None:
        return model
    if mode == "int8":
        return quantize_int8(model)
    return quantize_int4_model(model, rules=rules) if mode == "int4" else quantize_nf4_model(model, rules=rules)


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every parameter array (int8 values and their scales counted as stored)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
