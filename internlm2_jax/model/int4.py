"""Int4 weight-only (W4A16) weights in the AWQ / LMDeploy format: asymmetric 4-bit codes in groups of `group` (128)
consecutive *input* elements, one scale and one zero point per (group, output channel).

    scale = max(max - min, 1e-5) / 15,   zero = clamp(-round(min / scale), 0, 15),   (min <= 0 <= max)
    q = clamp(round(w / scale) + zero, 0, 15),   w ~ (q - zero) * scale

as AutoAWQ's `pseudo_quantize_tensor` (zero_point=True) computes them. A weight is the project's input-major
`[in, out]` matrix (a multi-dimensional projection reshaped, its contracted dimensions first), so groups run along
`in` like AWQ's groups along the HF `[out, in]` matrix's rows: for wo (inputs heads x head_dim 128) a group is one
head. Codes are packed two per byte along `in`, input element 2j in the high nibble (NF4's order, model/nf4.py);
AWQ checkpoints' int32 words with their own nibble order are converted by the importer. Scales are stored in fp16
as AWQ stores them (an all-zero group's scale 1e-5/15 is an fp16 subnormal, still above 0), zeros as one uint8 each:
4 + 16/128 + 8/128 = 4.19 bits per parameter at group 128.

`int4_dense` is the W4A16 product for decoding: XLA unpacks the codes and dequantizes them ((q - zero) * scale in
fp32, cast to the compute dtype) in front of the dot (fused on GPU and TPU). It is for inference only: its gradient
rule refuses, naming NF4 as the format to train adapters on (QLoRA).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from internlm2_jax.model.packed_weight import PackedMatrix, pack_nibbles, unpack_nibbles

MAX_CODE = 15
MIN_RANGE = 1e-5  # AutoAWQ's clamp of max - min: a constant group gets a tiny positive scale, never 0


@struct.dataclass
class Int4Weight(PackedMatrix):
    """Packed int4 codes, scales and zeros of an [in, out] matrix, or of a stack of them (a scanned layer axis leads
    every leaf). `dims` is the projection's own shape when it was reshaped to [in, out], its first `contracted`
    dimensions the inputs; `shape` is that shape, stack axes first."""

    codes: jax.Array  # uint8 [..., in/2, out]: input element 2j in the high nibble, 2j+1 in the low
    scales: jax.Array  # fp16 [..., in/group, out]
    zeros: jax.Array  # uint8 [..., in/group, out], each in [0, 15]
    group: int = struct.field(pytree_node=False, default=128)
    dims: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)  # None: (in, out)
    contracted: int = struct.field(pytree_node=False, default=1)

    def dequantize_matrix(self, dtype=jnp.float32) -> jax.Array:
        """[..., in, out] in `dtype`: (q - zero) * scale in fp32, then cast."""
        lead = self.codes.shape[:-2]
        n_in, n_out = self.matrix_shape
        q = unpack_nibbles(self.codes).reshape(*lead, n_in // self.group, self.group, n_out)
        values = (q.astype(jnp.float32) - self.zeros[..., None, :]) * self.scales.astype(jnp.float32)[..., None, :]
        return values.reshape(*lead, n_in, n_out).astype(dtype)

    def leaf_axes(self, logical_axes) -> list[tuple]:
        """Logical axes of each leaf (`jax.tree.leaves` order: codes, scales, zeros) of a weight whose own axes are
        `logical_axes`: the stack axes, the first input axis for the rows and the first output axis for the columns,
        so all three shard as the float matrix does."""
        lead = len(self.codes.shape) - 2
        if len(logical_axes) != len(self.shape):
            raise ValueError(f"logical axes {logical_axes} do not fit an int4 weight of shape {self.shape}")
        matrix = (*logical_axes[:lead], logical_axes[lead], logical_axes[lead + self.contracted])
        return [matrix, matrix, matrix]

    def bits_per_param(self) -> float:
        leaves = jax.tree.leaves(self)
        return sum(leaf.size * leaf.dtype.itemsize * 8 for leaf in leaves) / math.prod(self.shape)


def group_scales(w: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """(scale fp32, zero fp32) [..., in/group, out] of an [..., in, out] weight, AutoAWQ's asymmetric rule."""
    *lead, n_in, n_out = w.shape
    groups = w.astype(jnp.float32).reshape(*lead, n_in // group, group, n_out)
    # The range is widened to hold 0, as zero in [0, 15] requires: a group of one sign (never a real weight's
    # 128 values, where this is AutoAWQ's rule exactly) then still rounds trip within scale / 2 instead of clipping.
    low = jnp.minimum(jnp.min(groups, axis=-2), 0.0)
    high = jnp.maximum(jnp.max(groups, axis=-2), 0.0)
    scale = jnp.maximum(high - low, MIN_RANGE) / MAX_CODE
    zero = jnp.clip(-jnp.round(low / scale), 0, MAX_CODE)
    return scale, zero


def encode(w: jax.Array, scale: jax.Array, zero: jax.Array, group: int) -> jax.Array:
    """uint8 codes [..., in, out] in [0, 15] of `w` under per-group `scale` and `zero` [..., in/group, out]."""
    *lead, n_in, n_out = w.shape
    groups = w.astype(jnp.float32).reshape(*lead, n_in // group, group, n_out)
    q = jnp.clip(jnp.round(groups / scale[..., None, :]) + zero[..., None, :], 0, MAX_CODE)
    return q.astype(jnp.uint8).reshape(*lead, n_in, n_out)


def fake_quantize(w: jax.Array, group: int = 128) -> jax.Array:
    """`w` [..., in, out] rounded to its int4 grid and back, in w's dtype, with fp32 scales (AWQ's search measures
    its loss on this, as AutoAWQ's `pseudo_quantize_tensor` does)."""
    check_group(w.shape, group)
    scale, zero = group_scales(w, group)
    q = encode(w, scale, zero, group).astype(jnp.float32)
    *lead, n_in, n_out = w.shape
    values = (q.reshape(*lead, n_in // group, group, n_out) - zero[..., None, :]) * scale[..., None, :]
    return values.reshape(w.shape).astype(w.dtype)


def check_group(shape, group: int) -> None:
    if group <= 0 or group % 2:
        raise ValueError(f"the int4 group must be a positive even size (two codes per byte), not {group}")
    if len(shape) < 2 or shape[-2] % group:
        raise ValueError(f"the int4 group {group} must divide the input dimension of an [..., in, out] weight; "
                         f"got shape {tuple(shape)}")


def quantize_int4(w: jax.Array, group: int = 128) -> Int4Weight:
    """Int4 of an [..., in, out] weight (leading axes: a stack quantized per matrix), groups of `group` along in."""
    check_group(w.shape, group)
    return _quantize(w, group)


@functools.partial(jax.jit, static_argnums=1)
def _quantize(w: jax.Array, group: int) -> Int4Weight:
    scale, zero = group_scales(w, group)
    scale16 = scale.astype(jnp.float16)
    # Codes are chosen against the fp16 scale actually stored, so the round trip's error stays within scale/2.
    q = encode(w, scale16.astype(jnp.float32), zero, group)
    return Int4Weight(pack_nibbles(q), scale16, zero.astype(jnp.uint8), group=group)


def quantize_projection(w: jax.Array, contracted: int, leading: int = 0, group: int = 128) -> Int4Weight:
    """Int4 of a projection `w` [*stack, *inputs, *outputs] with `contracted` input dimensions after `leading`
    stack dimensions: reshaped to [*stack, in, out], quantized per matrix."""
    dims = tuple(w.shape[leading:])
    n_in, n_out = math.prod(dims[:contracted]), math.prod(dims[contracted:])
    weight = quantize_int4(w.reshape(*w.shape[:leading], n_in, n_out), group)
    return weight.replace(dims=dims if len(dims) > 2 else None, contracted=contracted)


@jax.custom_vjp
def int4_dense(x: jax.Array, weight: Int4Weight) -> jax.Array:
    """x [..., in] @ the dequantized weight [in, out], in x's dtype with fp32 accumulation (one layer's matrix:
    scan slices a stack)."""
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"int4_dense takes an Int4Weight, not {type(weight).__name__}")
    if weight.codes.ndim != 2 or x.shape[-1] != weight.matrix_shape[0]:
        raise ValueError(f"int4_dense takes x [..., in] and one [in, out] weight; got x {x.shape} and a weight of "
                         f"shape {weight.shape} ([in, out] = {weight.matrix_shape})")
    return jnp.dot(x, weight.dequantize_matrix(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _dense_fwd(x, weight):
    return int4_dense(x, weight), None


def _dense_bwd(_, g):
    raise TypeError("int4 weights are for decoding only and have no gradient: train on float weights, or train LoRA "
                    "adapters over an NF4 base (model.lora.quantize_base='nf4')")


int4_dense.defvjp(_dense_fwd, _dense_bwd)
