"""What the 4-bit weight formats share: codes packed two per byte along the inputs of an input-major [in, out]
matrix (or of a stack of them, stack axes first), and the projection's own shape beside it (model/nf4.py,
model/int4.py; the int4 KV cache packs its codes the same way). Each format adds its scales and
`dequantize_matrix`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


class PackedMatrix:
    """Mixed into a `flax.struct` weight with `codes` [..., in/2, out], `dims` (the projection's shape when it was
    reshaped to [in, out], else None) and `contracted` (how many of `dims` are inputs)."""

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"a {type(self).__name__} is read whole (`param[...]`)")
        return self

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(in, out) of one layer's matrix."""
        return (2 * self.codes.shape[-2], self.codes.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """The projection's shape, stack axes first, as the float parameter's was."""
        return (*self.codes.shape[:-2], *(self.dims or self.matrix_shape))

    def dequantize(self, dtype=jnp.float32):
        """The weight in its own `shape` in `dtype`."""
        return self.dequantize_matrix(dtype).reshape(self.shape)


def pack_nibbles(q: jax.Array) -> jax.Array:
    """uint8 [..., in/2, out] of 4-bit values [..., in, out]: element 2j in the high nibble, 2j+1 in the low."""
    q = q.astype(jnp.uint8)
    return (q[..., 0::2, :] << 4) | q[..., 1::2, :]


def unpack_nibbles(codes: jax.Array) -> jax.Array:
    """uint8 [..., in, out] from `pack_nibbles`' [..., in/2, out]."""
    *lead, half, n_out = codes.shape
    return jnp.stack([codes >> 4, codes & 0xF], axis=-2).reshape(*lead, 2 * half, n_out)
