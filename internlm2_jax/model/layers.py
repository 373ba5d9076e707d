"""Building blocks of the InternLM2 decoder: parameters with logical axes, the dense matmul, RMSNorm, rotary embedding.

Every parameter carries `logical_axes` metadata (names like `embed`, `mlp`, `kv_heads`); the sharding rules table
in `internlm2_jax.parallel` maps them to mesh axes, so the model itself never names a mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from internlm2_jax.config import ModelConfig
from internlm2_jax.kernels.platform import compiling_for_cpu
from internlm2_jax.model.int4 import Int4Weight, int4_dense
from internlm2_jax.model.nf4 import NF4Weight, nf4_dense
from internlm2_jax.model.quantize import Int8Weight, int8_dense


def normal_param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


def constant_param(value: float, shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)


# Name of every dense output, so remat policies can save projections by name (see transformer._REMAT_POLICIES).
DENSE_OUTPUT = "dense_output"


def _transposed_equations(equation: str) -> tuple[str, str]:
    """The einsums of the two cotangents of `lhs,rhs->out` (no dimension shared by lhs and rhs alone is kept)."""
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


def contract(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(equation, x, w)` with fp32 accumulation, contracting in x's dimension order.

    einsum lists several contracted dimensions in its own order (`bthd,hde->bte` contracts (d, h)), and XLA then
    transposes both operands to match: on XLA:CPU a copy of the whole weight at every decode step. When the output
    is x's kept dimensions then w's (every projection here), this is one dot_general in x's order instead."""
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    shared = [c for c in lhs if c in rhs]
    if any(c in out for c in shared) or out != "".join(c for c in lhs + rhs if c not in shared):
        return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
    dims = ((tuple(lhs.index(c) for c in shared), tuple(rhs.index(c) for c in shared)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _rounded_matmul(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """The product in fp32, rounded to x's (low-precision) dtype; differentiated by autodiff."""
    return contract(equation, x, w).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_matmul(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`_rounded_matmul` with a backward written out for XLA:CPU (CPU only: see `dense`)."""
    return _rounded_matmul(equation, x, w)


def _low_precision_matmul_fwd(equation, x, w):
    return _low_precision_matmul(equation, x, w), (x, w)


def _low_precision_matmul_bwd(equation, residuals, g):
    # Autodiff of the einsum above would turn the bf16 cotangent back into fp32 (the transpose of the final cast)
    # and run both backward matmuls as fp32 x fp32 (the bf16 operand upcast), which XLA:CPU runs much slower than
    # bf16 operands (benchmarks/RESULTS.md), for the same values, since bf16 -> fp32 is exact and both accumulate
    # in fp32. So the backward is written out with bf16 operands and fp32 accumulation, each result rounded to its
    # operand's dtype exactly as autodiff rounds it (dw included: the weight was cast to bf16 before the matmul).
    x, w = residuals
    dx_equation, dw_equation = _transposed_equations(equation)
    dx = contract(dx_equation, g, w).astype(x.dtype)
    dw = contract(dw_equation, x, g).astype(w.dtype)
    return dx, dw


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _int8_product(equation: str, x: jax.Array, w: Int8Weight) -> jax.Array:
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    contracted = sum(c in lhs for c in rhs)
    kept = len(lhs) - contracted
    if lhs[kept:] == rhs[:contracted] and out == lhs[:kept] + rhs[contracted:]:  # x's last dims against w's first
        return int8_dense(x, w, contracted)
    return contract(equation, x.astype(jnp.float32), w.dequantize())


def _packed_product(equation: str, x: jax.Array, w: NF4Weight | Int4Weight, product) -> jax.Array:
    """x's trailing dimensions against a packed 4-bit weight's inputs: `product(rows, w)` (`nf4_dense`, whose
    backward keeps the packed weight; `int4_dense`) on x and w reshaped to [..., in] and [in, out]; in x's dtype."""
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    contracted = sum(c in lhs for c in rhs)
    kept = len(lhs) - contracted
    if contracted != w.contracted or lhs[kept:] != rhs[:contracted] or out != lhs[:kept] + rhs[contracted:]:
        raise ValueError(f"an {type(w).__name__} of shape {w.shape} ({w.contracted} input dimensions) contracts "
                         f"x's trailing dimensions in order; equation {equation!r} does not")
    rows = x.reshape(*x.shape[:kept], w.matrix_shape[0])
    return product(rows, w).reshape(*x.shape[:kept], *w.shape[contracted:])


def dense(equation: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """A matmul with `dtype` operands and fp32 accumulation (conventions: bf16 compute).

    `equation` contracts x with w and keeps x's other dimensions and w's (no batch dimension shared by both).
    In a low-precision dtype the backward is written out for XLA:CPU (`_low_precision_matmul`) when compiling for
    the CPU only; TPU and GPU get autodiff's. The output is tagged `DENSE_OUTPUT`: the CPU form's custom_vjp hides
    its matmul from `checkpoint_dots`-style policies.
    """
    dtype = jnp.dtype(dtype)
    if isinstance(w, Int8Weight):  # output channels are w's trailing dimensions, and so the output's
        out = _int8_product(equation, x, w).astype(dtype)
    elif isinstance(w, NF4Weight):  # QLoRA's frozen base: dequantized in `dtype` inside its own custom_vjp
        out = _packed_product(equation, x.astype(dtype), w, nf4_dense)
    elif isinstance(w, Int4Weight):  # W4A16 decoding: unpacked and dequantized in `dtype` in front of the dot
        out = _packed_product(equation, x.astype(dtype), w, int4_dense)
    elif dtype == jnp.float32:
        out = contract(equation, x.astype(dtype), w.astype(dtype))
    else:
        matmul = _low_precision_matmul if compiling_for_cpu() else _rounded_matmul
        out = matmul(equation, x.astype(dtype), w.astype(dtype))
    return checkpoint_name(out, DENSE_OUTPUT)


class RMSNorm(nnx.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)); statistics in fp32, then cast back before the weight (as HF does)."""

    def __init__(self, cfg: ModelConfig):
        self.eps = cfg.rms_norm_eps
        self.weight = constant_param(1.0, (cfg.hidden_size,), ("embed",), jnp.dtype(cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


# ---- rotary position embedding ---------------------------------------------------------------------------------

def dynamic_ntk_base(theta: float, factor: float, max_positions: int, head_dim: int, length):
    """Dynamic-NTK base for a sequence of total length L (spec §1.3); unchanged for L <= max_positions."""
    length = jnp.asarray(length, jnp.float32)
    scaled = theta * ((factor * length / max_positions) - (factor - 1.0)) ** (head_dim / (head_dim - 2))
    return jnp.where(length > max_positions, scaled, jnp.float32(theta))


def segment_max(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per token [batch, seq], the largest of `values` over the tokens of its row that share its segment id.

    A reduction over segment ids, not over runs of neighbours, so it holds in any token order (a zigzag layout over
    mesh.sequence moves a document's pieces apart). Segment ids name documents within a row, from 0 (padding) to at
    most the row's length, as the packers number them.
    """
    batch, length = segment_ids.shape
    slots = length + 1
    ids = jnp.clip(segment_ids, 0, length) + slots * jnp.arange(batch, dtype=segment_ids.dtype)[:, None]
    largest = jax.ops.segment_max(values.reshape(-1), ids.reshape(-1), num_segments=batch * slots)
    return largest[ids]


def document_lengths(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per token, the length L of its own document: the largest position in its segment, plus one.

    Dynamic NTK must follow each packed document's own length, not the row's, or packing would change the logits.
    """
    return segment_max(positions, segment_ids) + 1


def rotary_tables(cfg: ModelConfig, positions: jax.Array, segment_ids: jax.Array,
                  lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [batch, seq, head_dim] in fp32 for rotate-half RoPE (spec §1.3).

    `lengths` [batch, seq] overrides the length L behind each token's dynamic-NTK base (default: its document's
    length in this call); chunked prefill passes the whole prompt's length, as a one-shot prefill would see it."""
    d = cfg.head_dim
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    pos = positions.astype(jnp.float32)
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.type == "dynamic":
        base = dynamic_ntk_base(cfg.rope_theta, scaling.factor, cfg.max_position_embeddings, d,
                                document_lengths(positions, segment_ids) if lengths is None else lengths)
        inv_freq = 1.0 / base[..., None] ** exponents  # [B, T, D/2]: the base differs per document
    else:
        inv_freq = 1.0 / jnp.float32(cfg.rope_theta) ** exponents
        if scaling is not None:  # linear: positions are divided by the factor
            pos = pos / scaling.factor
    freqs = pos[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, D] rotated in fp32 (rotate-half layout), returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
