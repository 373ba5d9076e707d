"""What the Hopper (Mosaic GPU) flash kernels share: which blocks each CTA visits and which of them need a mask, the
mask of a tile, the producer warpgroup's TMA ring, and the masked / unmasked / masked walk over a block range.

Every kernel has the same shape: one producer warpgroup streams blocks of the "other" sequence (K/V for the forward
and dq kernels, Q/dO for dk/dv) through `stages` shared-memory slots; two compute warpgroups each own a 64-row slab of
their own sequence and consume every streamed block. A slot is released by both compute warpgroups arriving on its
"free" barrier, and the producer waits for that before refilling it.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from internlm2_jax.kernels import tiling

COMPUTE_WGS = 2
ROWS = 64  # rows per compute warpgroup: the M of one wgmma
LOG2E = 1.4426950408889634
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma accumulator
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column
# 8-row tiles with the 128-byte swizzle: the shared-memory layout wgmma and TMA read without bank conflicts.
TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def tile_tables(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal):
    """[batch, n_q_blocks, n_kv_blocks] bools: `live` (some pair visible, tiling.py) and `full` (every pair visible:
    one real segment on both sides and, if causal, every key at or before every query)."""
    live = tiling.live_tiles(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal)
    batch, nq, nk = live.shape
    qp, qs = (x.reshape(batch, nq, block_q) for x in (q_pos, q_seg))
    kp, ks = (x.reshape(batch, nk, block_kv) for x in (kv_pos, kv_seg))
    q_one = (qs.min(-1) == qs.max(-1)) & (qs.min(-1) != 0)
    kv_one = (ks.min(-1) == ks.max(-1)) & (ks.min(-1) != 0)
    full = q_one[:, :, None] & kv_one[:, None, :] & (qs[:, :, 0][:, :, None] == ks[:, :, 0][:, None, :])
    if causal:
        full &= kp.max(-1)[:, None, :] <= qp.min(-1)[:, :, None]
    return live, full


def tile_ranges(live, full):
    """Per row of the tables, int32 [lo, full_lo, full_hi, hi] along the last axis: blocks [lo, hi) are live and
    those in [full_lo, full_hi) need no mask. If the fully visible blocks are not contiguous, all run masked."""
    batch, n = live.shape[:2]
    (lo, last), (f_lo, f_last) = tiling.block_ranges(live), tiling.block_ranges(full)
    lo, hi, f_lo, f_hi = (x.reshape(batch, n) for x in (lo, last + 1, f_lo, f_last + 1))
    usable = (f_hi > f_lo) & (full.sum(-1) == f_hi - f_lo)
    return jnp.stack([lo, jnp.where(usable, f_lo, hi), jnp.where(usable, f_hi, hi), hi], axis=-1).astype(jnp.int32)


def mask_ranges(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal):
    """Per (batch, q block): the kv block ranges of tile_ranges (what the forward and dq kernels walk)."""
    return tile_ranges(*tile_tables(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal))


def visible(q_pos, q_seg, kv_pos, kv_seg, shape, q_axis, causal):
    """The mask of reference.py for one register tile; q_axis is the tile axis the query vectors run along."""
    on_q = lambda x: lax.broadcast_in_dim(x, shape, [q_axis])
    on_kv = lambda x: lax.broadcast_in_dim(x, shape, [1 - q_axis])
    mask = (on_q(q_seg) == on_kv(kv_seg)) & (on_q(q_seg) != 0)
    if causal:
        mask &= on_kv(kv_pos) <= on_q(q_pos)
    return mask


def load_vector(ref, layout):
    """A 1-D slice of positions, segment ids or row statistics straight from global memory, in a wgmma row/column
    layout: once per CTA for the resident rows. (A strided register load; what changes every step comes through the
    producer's TMA copies into shared memory instead, whence `plgpu.load` reads it in the same layouts.)"""
    return plgpu.load(ref, layout=layout, optimized=False)


def produce(steps, stages, transfers):
    """The producer warpgroup: for step i in [0, steps), slot i % stages; each transfer is (free barriers,
    issue(i, slot)) and waits for its slot's previous contents to be released before copying. Afterwards it waits
    for the last releases too, so no barrier phase is left unobserved when the scratch goes out of scope."""

    def reuse(free):
        plgpu.barrier_wait(free)
        # The consumers read some of a slot (positions, statistics) with ordinary loads; the TMA copy that overwrites
        # it goes through the async proxy, which a proxy fence orders after them (the race detector of Mosaic GPU's
        # interpret mode reports the overwrite otherwise).
        plgpu.commit_smem()

    @pl.loop(0, steps)
    def _(i):
        slot = lax.rem(i, stages)
        for free, issue in transfers:
            pl.when(i >= stages)(functools.partial(reuse, free.at[slot]))
            issue(i, slot)

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _(i):
        for free, _ in transfers:
            plgpu.barrier_wait(free.at[lax.rem(i, stages)])


def walk(ranges, step, carry):
    """step(j, carry, masked) over the blocks [lo, hi) of `ranges`, without the mask on [full_lo, full_hi)."""
    lo, f_lo, f_hi, hi = ranges
    carry = lax.fori_loop(lo, f_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(f_lo, f_hi, functools.partial(step, masked=False), carry)
    return lax.fori_loop(f_hi, hi, functools.partial(step, masked=True), carry)


def matmul(a, b, shape, while_running=None):
    """a @ b in fp32 registers (WGMMA layout), from a fresh wgmma accumulator; `while_running()` is called after the
    wgmma is issued and before it is waited for."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if while_running is not None:
            while_running()
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def add_matmul(acc, a, b, interpret):
    """acc + a @ b. Compiled, the wgmma accumulates onto `acc` itself (pl.run_state with it as the accumulator's
    initial value, which also waits for the wgmma): no second fp32 tile in registers, which at 64 x 128 would cost a
    compute warpgroup 64 of its registers per thread. Mosaic GPU's interpret mode has no run_state, so there the
    product is added after a fresh accumulation; the values are the same."""
    if interpret:
        return acc + matmul(a, b, acc.shape)
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def lhs_operand(value, staging, dtype):
    """A register tile (P or dS) as the left operand of a wgmma: from registers on a GPU, as FlashAttention-3 keeps
    P; through `staging` in shared memory when one is given, which Mosaic GPU's interpret mode needs (it has no
    register-operand wgmma). The kernels allocate staging buffers in interpret mode only."""
    if staging is None:
        return value.astype(dtype)
    staging[...] = value.astype(dtype)
    plgpu.commit_smem()
    return staging


def staging_buffer(interpret, shape, dtype):
    """Shared memory for lhs_operand in interpret mode; None (no allocation) when compiling for a GPU."""
    return plgpu.SMEM(shape, dtype, transforms=TRANSFORMS) if interpret else None


def launch(kernel, out_type, grid, grid_names, interpret, *args):
    """Runs a kernel of this shape: compute warpgroups plus the producer, over `grid`. `interpret`: False (compile),
    True (the default simulation) or InterpretGPUParams."""
    if interpret and not isinstance(interpret, plgpu.InterpretGPUParams):
        interpret = plgpu.InterpretGPUParams()
    return plgpu.kernel(kernel, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=COMPUTE_WGS + 1,
                        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=interpret or None)(*args)
