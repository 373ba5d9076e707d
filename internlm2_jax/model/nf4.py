"""NF4 weights with double quantization: the frozen base of QLoRA (Dettmers et al. 2023), in bitsandbytes' format.

A weight is the project's input-major `[in, out]` matrix. Its 4-bit codes index the 16-value NormalFloat code book,
scaled per block of `block` (64) consecutive *input* elements by the block's absmax. The blocks run along `in`, the
contracted axis, because bitsandbytes blocks the row-major HF `[out, in]` matrix, i.e. along `in` too: the codes and
first-level absmax are then bit-comparable with `bitsandbytes.functional.quantize_4bit(W.T, quant_type="nf4")`.
(A multi-dimensional projection reshapes to `[in, out]` first; with blocks that divide its last contracted dimension,
e.g. head_dim 128 for wo, no block straddles two heads, so the blocks are those of bitsandbytes as well.)

Double quantization (QLoRA §3) stores the fp32 absmax as 8-bit codes into bitsandbytes' signed dynamic map, after
subtracting their per-tensor mean, with one fp32 scale per `absmax_block` (256) absmax codes: 4 + 8/64 + 32/(64*256)
= 4.127 bits per parameter instead of 4.5. Deliberate difference from bitsandbytes: its 256-blocks run along its
flattened `[out, in/64]` absmax, ours along `out`, so the second level shards with the weight (fsdp over the in-blocks,
tensor over the outputs); the double-quantized absmax is therefore equal to bitsandbytes' only statistically.

`nf4_dense` is the QLoRA product: its `custom_vjp` keeps the packed weight, not its dequantized float copy, for the
backward (which needs only dx = g Wᵀ: the base is frozen and gets no gradient).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from internlm2_jax.model.packed_weight import PackedMatrix, pack_nibbles, unpack_nibbles

# bitsandbytes `get_4bit_type("nf4")` (= QLoRA appendix E = qwix `get_nf4_buckets`): the 16 float32 values, sorted.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# Nearest code by its midpoints, computed in float32 as bitsandbytes' `(code[:-1] + code[1:]) / 2`; a value on a
# midpoint goes to the lower code (`torch.bucketize`, and the CUDA kernel's strict `>` tree).
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)` (8 bits, 7 exponent bits): 256 sorted float32 values in
    [-0.99, 1], the code book of the double-quantized absmax. Rebuilt in float32 as torch computes it."""
    def linspace(start, end, steps):
        # torch.linspace in float32 as its CPU kernel runs it: from both ends towards the middle, each element one
        # fused multiply-add (emulated in float64, where a float32 product is exact; checked against bitsandbytes).
        start, end = np.float32(start), np.float32(end)
        step = (end - start) / np.float32(steps - 1)
        i = np.arange(steps)
        from_start = np.float64(step) * i + np.float64(start)
        from_end = np.float64(end) - np.float64(step) * (steps - 1 - i)
        return np.where(i < steps // 2, from_start, from_end).astype(np.float32)

    values = []
    for i in range(7):
        bounds = linspace(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10 ** (-6 + i))
        values += [scale * means, -scale * means]
    values += [np.zeros(1, np.float32), np.ones(1, np.float32)]
    return np.sort(np.concatenate(values)).astype(np.float32)


DYNAMIC8_CODE = dynamic_map()
DYNAMIC8_MIDPOINTS = (DYNAMIC8_CODE[:-1] + DYNAMIC8_CODE[1:]) / np.float32(2)

# bitsandbytes divides by absmax.clamp(min=1e-38); 1e-38 is subnormal in float32 and XLA's CPU flushes those to
# zero, so we clamp at the smallest normal. Only an all-zero block reaches it, and its values scale to 0 either way.
_TINY = np.finfo(np.float32).tiny


@struct.dataclass
class NF4Weight(PackedMatrix):
    """NF4 codes and block scales of an [in, out] matrix, or of a stack of them (a scanned layer axis leads every
    leaf, so `lax.scan` slices out one layer's weight). `dims` is the projection's own shape when it was reshaped
    to [in, out] (wqkv [embed, kv_heads, groups, head_dim] -> [embed, kv_heads*groups*head_dim]), its first
    `contracted` dimensions the inputs; `shape` is that shape, stack axes first, as the float parameter's was."""

    codes: jax.Array  # uint8 [..., in/2, out]: input element 2j in the high nibble, 2j+1 in the low (bnb's order)
    absmax: jax.Array  # fp32 [..., in/block, out]; with double quantization uint8 codes into DYNAMIC8_CODE
    absmax_scale: jax.Array | None = None  # fp32 [..., in/block, out/absmax_block], double quantization only
    absmax_offset: jax.Array | None = None  # fp32 [...]: the absmax mean, subtracted before double quantization
    block: int = struct.field(pytree_node=False, default=64)
    absmax_block: int = struct.field(pytree_node=False, default=256)
    dims: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)  # None: (in, out)
    contracted: int = struct.field(pytree_node=False, default=1)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def block_absmax(self) -> jax.Array:
        """fp32 [..., in/block, out]: each block's scale, decoded from the second level when double-quantized."""
        if not self.double_quant:
            return self.absmax
        *lead, rows, outs = self.absmax.shape
        centered = jnp.asarray(DYNAMIC8_CODE)[self.absmax].reshape(*lead, rows, outs // self.absmax_block,
                                                                   self.absmax_block)
        scaled = (centered * self.absmax_scale[..., None]).reshape(*lead, rows, outs)
        return scaled + self.absmax_offset[..., None, None]

    def dequantize_matrix(self, dtype=jnp.float32) -> jax.Array:
        """[..., in, out] in `dtype`: code value times block absmax, in fp32 as bitsandbytes does, then cast."""
        lead = self.codes.shape[:-2]
        n_in, n_out = self.matrix_shape
        codes = unpack_nibbles(self.codes).reshape(*lead, n_in // self.block, self.block, n_out)
        values = jnp.asarray(NF4_CODE)[codes] * self.block_absmax()[..., None, :]
        return values.reshape(*lead, n_in, n_out).astype(dtype)

    def leaf_axes(self, logical_axes) -> list[tuple]:
        """The logical axes of each leaf (in `jax.tree.leaves` order) of a weight whose own axes are
        `logical_axes` (its `shape`'s): the stack axes, then the first input axis for the [in, ...] rows and the
        first output axis for the columns, so the codes and scales shard with FSDP and tensor parallelism as the
        float matrix does (a dimension its mesh axes do not divide stays whole, as for any parameter)."""
        lead = len(self.codes.shape) - 2
        if len(logical_axes) != len(self.shape):
            raise ValueError(f"logical axes {logical_axes} do not fit an NF4 weight of shape {self.shape}")
        matrix = (*logical_axes[:lead], logical_axes[lead], logical_axes[lead + self.contracted])
        axes = [matrix, matrix]
        if self.double_quant:
            axes += [matrix, tuple(logical_axes[:lead])]
        return axes

    def bits_per_param(self) -> float:
        """Stored bits (codes, absmax and, when double-quantized, their scales and offset) per weight element."""
        leaves = jax.tree.leaves(self)
        return sum(leaf.size * leaf.dtype.itemsize * 8 for leaf in leaves) / math.prod(self.shape)


def nf4_encode(scaled: jax.Array) -> jax.Array:
    """uint8 index of the nearest NF4 value of each element of `scaled` (in [-1, 1]): the number of midpoints below
    it. Elementwise, 15 fused compares; qwix's argmin over the 16 values builds a [N, 16] temporary instead."""
    index = jnp.zeros(scaled.shape, jnp.uint8)
    for midpoint in NF4_MIDPOINTS:
        index += (scaled > midpoint).astype(jnp.uint8)
    return index


def _scale_by_absmax(blocks: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(absmax over `axis`, blocks multiplied by its reciprocal and clipped to [-1, 1]): bitsandbytes multiplies by
    `1 / absmax` rather than dividing, which moves a value on a midpoint by an ulp; we do the same to agree."""
    absmax = jnp.max(jnp.abs(blocks), axis=axis)
    scaled = blocks * jnp.expand_dims(1.0 / jnp.maximum(absmax, _TINY), axis)
    return absmax, jnp.clip(scaled, -1.0, 1.0)


def _check_shape(w: jax.Array, block: int, double_quant: bool, absmax_block: int) -> None:
    if w.ndim != 2:
        raise ValueError(f"NF4 quantizes an [in, out] matrix; got shape {w.shape} (reshape a projection to 2-D)")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"NF4 quantizes floating-point weights, not {w.dtype}")
    if block <= 0 or block % 2:
        raise ValueError(f"the NF4 block must be a positive even size (two codes per byte), not {block}")
    if w.shape[0] % block:
        raise ValueError(f"the NF4 block {block} must divide the input dimension: shape {w.shape}")
    if double_quant and w.shape[1] % absmax_block:
        raise ValueError(f"double quantization blocks the absmax by {absmax_block} along the outputs, which must "
                         f"divide the output dimension: shape {w.shape}")


def quantize_nf4(w: jax.Array, block: int = 64, double_quant: bool = True, absmax_block: int = 256) -> NF4Weight:
    """NF4 of an [in, out] weight, blocks of `block` along `in`; the absmax double-quantized in blocks of
    `absmax_block` along `out` (QLoRA's defaults: 64 and 256)."""
    _check_shape(w, block, double_quant, absmax_block)
    return _quantize(w, block, double_quant, absmax_block)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(w: jax.Array, block: int, double_quant: bool, absmax_block: int) -> NF4Weight:
    n_in, n_out = w.shape
    absmax, scaled = _scale_by_absmax(w.astype(jnp.float32).reshape(n_in // block, block, n_out), axis=1)
    index = nf4_encode(scaled).reshape(n_in, n_out)
    codes = pack_nibbles(index)
    if not double_quant:
        return NF4Weight(codes, absmax, block=block, absmax_block=absmax_block)
    # bitsandbytes' `quantize_4bit(compress_statistics=True)`: offset = absmax.mean(), then 8-bit dynamic-map
    # codes of absmax - offset, scaled per 256 by their absmax (`quantize_blockwise(..., blocksize=256)`).
    offset = jnp.mean(absmax)
    rows = n_in // block
    scale, centered = _scale_by_absmax((absmax - offset).reshape(rows, n_out // absmax_block, absmax_block), axis=2)
    absmax_codes = jnp.searchsorted(jnp.asarray(DYNAMIC8_MIDPOINTS), centered, side="left")  # ties to the lower
    return NF4Weight(codes, absmax_codes.astype(jnp.uint8).reshape(rows, n_out), scale, offset, block, absmax_block)


def quantize_projection(w: jax.Array, contracted: int, leading: int = 0, *, block: int = 64,
                        double_quant: bool = True, absmax_block: int = 256) -> NF4Weight:
    """NF4 (double-quantized) of a projection `w` [*stack, *inputs, *outputs] with `contracted` input dimensions
    after `leading` stack dimensions (a scanned layer axis): each layer's weight is reshaped to [in, out] and
    quantized on its own (its own absmax offset), and the stack axes lead every leaf."""
    dims = tuple(w.shape[leading:])
    n_in, n_out = math.prod(dims[:contracted]), math.prod(dims[contracted:])
    quantize = functools.partial(quantize_nf4, block=block, double_quant=double_quant, absmax_block=absmax_block)
    for _ in range(leading):
        quantize = jax.vmap(quantize)
    weight = quantize(w.reshape(*w.shape[:leading], n_in, n_out))
    return weight.replace(dims=dims if len(dims) > 2 else None, contracted=contracted)


def quantize_like(w: jax.Array, like: NF4Weight) -> NF4Weight:
    """`w` (float, `like.shape`) quantized as `like` is: its blocks, its stack axes, its projection shape."""
    if tuple(w.shape) != like.shape:
        raise ValueError(f"a weight of shape {tuple(w.shape)} cannot replace an NF4 weight of shape {like.shape}")
    return quantize_projection(w, like.contracted, like.codes.ndim - 2, block=like.block,
                               double_quant=like.double_quant, absmax_block=like.absmax_block)


@jax.custom_vjp
def nf4_dense(x: jax.Array, weight: NF4Weight) -> jax.Array:
    """x [..., in] @ the dequantized weight [in, out], in x's dtype with fp32 accumulation."""
    return _product(x, weight)


def _product(x: jax.Array, weight: NF4Weight) -> jax.Array:
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"nf4_dense takes an NF4Weight, not {type(weight).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"nf4_dense takes floating-point inputs, not {x.dtype}")
    if weight.codes.ndim != 2:
        raise ValueError(f"nf4_dense takes one [in, out] matrix, not a stack of shape {weight.shape} (scan slices "
                         "the layers)")
    if x.shape[-1] != weight.matrix_shape[0]:
        raise ValueError(f"input of shape {x.shape} does not match the NF4 weight's [in, out] = "
                         f"{weight.matrix_shape}")
    return jnp.dot(x, weight.dequantize_matrix(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _product_fwd(x: jax.Array, weight: NF4Weight):
    # The residual is the packed weight (4.127 bits per parameter); plain autodiff would keep the dequantized
    # [in, out] copy alive until the backward of every layer: 13 GiB of bf16 at 7B without remat.
    return _product(x, weight), weight


def _product_bwd(weight: NF4Weight, g: jax.Array):
    w = weight.dequantize_matrix(g.dtype)  # recomputed: one layer's dequantized weight lives at a time
    dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(g.dtype)
    return dx, None  # the frozen base gets a symbolic-zero cotangent: no gradient for its codes or scales


nf4_dense.defvjp(_product_fwd, _product_bwd)
