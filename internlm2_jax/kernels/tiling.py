"""What the TPU and GPU flash kernels share outside the kernel body: block sizes, padding and block skipping.

Masking is defined by positions and segment ids (see reference.py), not by array indices, so which tiles are fully
masked cannot be read off the grid coordinates. Instead each block is summarised by the range of its positions and of
its non-padding segment ids; a (q block, kv block) tile is skipped when those ranges prove every pair masked. From the
tile table each q block gets the contiguous range of kv blocks it must visit (and each kv block its range of q
blocks, for the dk/dv kernel). Packed documents and causal order both make the live blocks contiguous, so a range
loses almost nothing against a per-tile table and needs only two scalars per block.
"""

import dataclasses

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so fully masked rows keep finite running maxima and give zeros instead of NaNs
_BIG = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key/value block lengths of the flash kernels (forward and both backward kernels).

    512 is what MaxText and levanter use on TPU; blocks are shrunk to the (padded) sequence when it is shorter.
    """

    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if value <= 0 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8 (the TPU sublane count), got {value}")


def fit_block(block: int, length: int, power_of_two: bool = False) -> int:
    """The block actually used: the configured one, or the whole sequence rounded up when that is shorter: to 8 rows
    on TPU, to a power of two of at least 16 for Triton (its tiles are powers of two, its dots at least 16 wide)."""
    whole = max(16, 1 << (length - 1).bit_length()) if power_of_two else -(-length // 8) * 8
    return min(block, whole)


def pad_to(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
    """Pads `axis` at the end to `length`; padded tokens get segment id 0 from the caller, so they are masked."""
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _summaries(positions, segment_ids, block):
    """Per block [batch, n_blocks]: min and max position, min and max non-padding segment id."""
    batch, length = positions.shape
    pos = positions.reshape(batch, length // block, block)
    seg = segment_ids.reshape(batch, length // block, block)
    real = seg != 0
    # An all-padding block gets an empty segment range (min > max), which no other range overlaps.
    seg_min = jnp.where(real, seg, _BIG).min(-1)
    seg_max = jnp.where(real, seg, -1).max(-1)
    return pos.min(-1), pos.max(-1), seg_min, seg_max


def live_tiles(q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_q, block_kv, causal):
    """[batch, n_q_blocks, n_kv_blocks] bool: False only where every (query, key) pair of the tile is masked."""
    _, q_pos_max, q_seg_min, q_seg_max = _summaries(q_positions, q_segment_ids, block_q)
    kv_pos_min, _, kv_seg_min, kv_seg_max = _summaries(kv_positions, kv_segment_ids, block_kv)
    live = (q_seg_min[:, :, None] <= kv_seg_max[:, None, :]) & (kv_seg_min[:, None, :] <= q_seg_max[:, :, None])
    if causal:
        live &= kv_pos_min[:, None, :] <= q_pos_max[:, :, None]
    return live


def block_ranges(live: jax.Array):
    """First and last live index along the last axis, flattened to [batch * rows] int32 for SMEM prefetch.

    A row with nothing live gets (0, -1): the kernel computes nothing and writes zeros.
    """
    n = live.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    any_live = live.any(-1)
    lo = jnp.where(any_live, jnp.where(live, idx, n).min(-1), 0)
    hi = jnp.where(any_live, jnp.where(live, idx, -1).max(-1), -1)
    return lo.reshape(-1).astype(jnp.int32), hi.reshape(-1).astype(jnp.int32)


def clamp(i, lo, hi):
    """Block index to fetch at grid step i: inside [lo, hi], so skipped steps repeat a neighbour's block and the
    pipeline issues no new copy for them."""
    return jnp.minimum(jnp.maximum(i, lo), jnp.maximum(hi, lo))


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Padded operands (still [batch, seq, heads, head_dim]) and the block metadata every flash kernel takes."""

    q: jax.Array  # [B, T, H, D]
    k: jax.Array  # [B, S, KV, D]
    v: jax.Array
    q_meta: jax.Array  # [B, T, 2] int32: (position, segment) per query, as columns
    kv_meta: jax.Array  # [B, 2, S] int32: (position, segment) per key, as rows
    live: jax.Array  # [B, nq, nk] bool
    block_q: int
    block_kv: int


def prepare(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_sizes: BlockSizes, causal,
            power_of_two: bool = False):
    """Pads every sequence to a whole number of blocks and builds the metadata and the live-tile table."""
    q_len, kv_len = q.shape[1], k.shape[1]
    block_q = fit_block(block_sizes.block_q, q_len, power_of_two)
    block_kv = fit_block(block_sizes.block_kv, kv_len, power_of_two)
    q_pad, kv_pad = -(-q_len // block_q) * block_q, -(-kv_len // block_kv) * block_kv
    q_pos, q_seg = (pad_to(jnp.asarray(x, jnp.int32), 1, q_pad) for x in (q_positions, q_segment_ids))
    kv_pos, kv_seg = (pad_to(jnp.asarray(x, jnp.int32), 1, kv_pad) for x in (kv_positions, kv_segment_ids))
    return Prepared(
        q=pad_to(q, 1, q_pad), k=pad_to(k, 1, kv_pad), v=pad_to(v, 1, kv_pad),
        q_meta=jnp.stack([q_pos, q_seg], axis=-1), kv_meta=jnp.stack([kv_pos, kv_seg], axis=1),
        live=live_tiles(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal),
        block_q=block_q, block_kv=block_kv)


@dataclasses.dataclass(frozen=True)
class KernelStatic:
    """The static parameters of a flash kernel call (hashable, so they can close over the Pallas kernel bodies).
    Each back end subclasses it with its own `call` (how it invokes `pl.pallas_call`)."""

    causal: bool
    scale: float
    block_q: int
    block_kv: int
    group: int
    interpret: bool
