"""Flash attention forward for Hopper GPUs (Pallas, Mosaic GPU backend): the FlashAttention-3 schedule under the
`attention(...)` contract.

Why a second GPU kernel: the Triton kernel (flash_gpu.py) is the FlashAttention-2 schedule, where every warp both
loads and computes. On Hopper the tensor cores are fed by TMA copies and asynchronous warpgroup MMAs (wgmma), which
Triton reaches only partly; Mosaic GPU exposes them directly. One CTA per (kv-head group member, 2 * block_q rows,
batch row) runs three warpgroups:
- a producer warpgroup that streams K and V blocks into a ring of shared-memory slots with TMA,
- two compute warpgroups of `block_q / 2` query rows each, running QK^T and PV as wgmma from shared memory (P from
  registers) with the online softmax in fp32 (base 2, the scale folded into one multiply).
Masking follows reference.py (positions and segment ids). Each CTA walks only its live kv blocks (tiling.py) and
applies the mask only on tiles that are not provably fully visible: for causal packed data that is the diagonal and
the first block of each document, the rest runs the unmasked loop.

The backward pass reuses the Triton dq and dk/dv kernels, which take the same (out, log-sum-exp) residuals.
Inputs must be bf16 or fp16 with head_dim a multiple of 64 (wgmma and the 128-byte swizzle); sequences are padded to
whole blocks.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from internlm2_jax.kernels import flash_gpu, tiling

_LOG2E = math.log2(math.e)
_COMPUTE_WGS = 2
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row of a wgmma accumulator
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per key column

# 128 query rows (64 per compute warpgroup) x 128 keys: the FlashAttention-3 forward tile for head_dim 128.
DEFAULT_BLOCKS = tiling.BlockSizes(block_q=128, block_kv=128)


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    block_q: int  # rows per CTA; each compute warpgroup takes half
    block_kv: int
    group: int
    stages: int  # K/V shared-memory slots in flight
    interpret: bool | plgpu.InterpretGPUParams  # True: the default simulation; params e.g. to detect races


def mask_ranges(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal):
    """Per (batch, q block) int32 [lo, full_lo, full_hi, hi]: the kv blocks [lo, hi) are live, and those in
    [full_lo, full_hi) need no mask (every query sees every key). Blocks outside [full_lo, full_hi) but inside
    [lo, hi) run masked. If the fully visible blocks are not contiguous the whole range runs masked."""
    live = tiling.live_tiles(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal)
    batch, nq, nk = live.shape
    qp, qs = (x.reshape(batch, nq, block_q) for x in (q_pos, q_seg))
    kp, ks = (x.reshape(batch, nk, block_kv) for x in (kv_pos, kv_seg))
    # One real segment on both sides: every segment id of the q block equals every one of the kv block.
    q_one = (qs.min(-1) == qs.max(-1)) & (qs.min(-1) != 0)
    kv_one = (ks.min(-1) == ks.max(-1)) & (ks.min(-1) != 0)
    full = q_one[:, :, None] & kv_one[:, None, :] & (qs[:, :, 0][:, :, None] == ks[:, :, 0][:, None, :])
    if causal:
        full &= kp.max(-1)[:, None, :] <= qp.min(-1)[:, :, None]
    lo, hi = tiling.block_ranges(live)
    lo, hi = lo.reshape(batch, nq), hi.reshape(batch, nq) + 1
    f_lo, f_hi = tiling.block_ranges(full)
    f_lo, f_hi = f_lo.reshape(batch, nq), f_hi.reshape(batch, nq) + 1
    contiguous = full.sum(-1) == f_hi - f_lo
    f_lo = jnp.where(contiguous & (f_hi > f_lo), f_lo, hi)
    f_hi = jnp.where(contiguous & (f_hi > f_lo), f_hi, hi)
    return jnp.stack([lo, f_lo, f_hi, hi], axis=-1).astype(jnp.int32)


def _forward(st: _Static, q, k, v, q_pos, q_seg, kv_pos, kv_seg, ranges):
    batch, q_len, heads, head_dim = q.shape
    dtype = q.dtype
    rows = st.block_q // _COMPUTE_WGS
    bkv, stages = st.block_kv, st.stages
    scale = st.scale * _LOG2E

    def kernel(ranges_ref, q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_ref, lse_ref, scoped):
        (q_smem, k_smem, v_smem, p_smem, lse_smem), (q_ready, k_ready, v_ready), (k_free, v_free) = scoped
        b, h, t = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tile")
        wg = lax.axis_index("wg")
        lo, f_lo, f_hi, hi = (ranges_ref[b, t, i] for i in range(4))

        @pl.when(wg < _COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            row0 = t * st.block_q + wg * rows
            qo = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, rows), h], qo, q_ready.at[wg])
            q_pos = plgpu.load(qp_ref.at[b, pl.ds(row0, rows)], layout=_ROW, optimized=False)
            q_seg = plgpu.load(qs_ref.at[b, pl.ds(row0, rows)], layout=_ROW, optimized=False)
            plgpu.barrier_wait(q_ready.at[wg])

            def step(j, carry, masked):
                acc, m, total = carry
                slot = lax.rem(j - lo, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo, k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((rows, bkv), jnp.float32)) * scale
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    kv_p = plgpu.load(kp_ref.at[b, pl.ds(j * bkv, bkv)], layout=_COL, optimized=False)
                    kv_s = plgpu.load(ks_ref.at[b, pl.ds(j * bkv, bkv)], layout=_COL, optimized=False)
                    col = lambda x: lax.broadcast_in_dim(x, (rows, bkv), [1])
                    row = lambda x: lax.broadcast_in_dim(x, (rows, bkv), [0])
                    mask = (row(q_seg) == col(kv_s)) & (row(q_seg) != 0)
                    if st.causal:
                        mask &= col(kv_p) <= row(q_pos)
                    s = jnp.where(mask, s, tiling.MASKED)
                m_next = jnp.maximum(m, s.max(axis=1))
                p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
                if masked:  # rows with no visible key yet have s == m_next == MASKED, so p would be 1
                    p = jnp.where(mask, p, 0.0)
                alpha = jnp.exp2(m - m_next)
                total = total * alpha + p.sum(axis=1)
                plgpu.barrier_wait(v_ready.at[slot])

                p_smem.at[wg][...] = p.astype(dtype)
                plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
                    return acc_ref[...]

                update = pl.run_scoped(pv, plgpu.ACC((rows, head_dim), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + update, m_next, total

            carry = (plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA),
                     plgpu.layout_cast(jnp.full((rows,), tiling.MASKED, jnp.float32), _ROW),
                     plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), _ROW))
            carry = lax.fori_loop(lo, f_lo, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(f_lo, f_hi, functools.partial(step, masked=False), carry)
            acc, m, total = lax.fori_loop(f_hi, hi, functools.partial(step, masked=True), carry)
            # Rows that saw no key keep total == 0: zeros out and an lse of 0, as in the Triton kernel.
            seen = total > 0
            inv = jnp.where(seen, 1.0 / jnp.where(seen, total, 1.0), 0.0)
            qo[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(seen, (m + jnp.log2(jnp.where(seen, total, 1.0))) / _LOG2E, 0.0)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, o_ref.at[b, pl.ds(row0, rows), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, rows)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(h, st.group)

            @pl.loop(0, hi - lo)
            def _(i):
                slot = lax.rem(i, stages)
                blk = (b, pl.ds((lo + i) * bkv, bkv), kv_head)

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                plgpu.copy_gmem_to_smem(k_ref.at[blk], k_smem.at[slot], k_ready.at[slot])

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                plgpu.copy_gmem_to_smem(v_ref.at[blk], v_smem.at[slot], v_ready.at[slot])

            # Wait for the last slots to be released too, so no barrier phase is left unobserved when the scratch
            # goes out of scope (the next CTA on this SM reuses the shared memory).
            @pl.loop(jnp.maximum(hi - lo - stages, 0), hi - lo)
            def _(i):
                plgpu.barrier_wait(k_free.at[lax.rem(i, stages)])
                plgpu.barrier_wait(v_free.at[lax.rem(i, stages)])

    def entry(*refs):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (plgpu.SMEM((_COMPUTE_WGS, rows, head_dim), dtype, transforms=transforms),
                plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=transforms),
                plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=transforms),
                plgpu.SMEM((_COMPUTE_WGS, rows, bkv), dtype, transforms=transforms),
                plgpu.SMEM((_COMPUTE_WGS, rows), jnp.float32))
        ready = (plgpu.Barrier(num_barriers=_COMPUTE_WGS), plgpu.Barrier(num_barriers=stages),
                 plgpu.Barrier(num_barriers=stages))
        free = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, ready, free, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
        grid=(heads, q_len // st.block_q, batch), grid_names=("heads", "q_tile", "batch"),
        num_threads=_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=(st.interpret if isinstance(st.interpret, plgpu.InterpretGPUParams)
                   else plgpu.InterpretGPUParams() if st.interpret else None),
    )(ranges, q, k, v, q_pos, q_seg, kv_pos, kv_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(st, bwd, q, k, v, meta, ranges, live):
    return _forward(st, q, k, v, *meta, ranges)[0]


def _flash_fwd(st, bwd, q, k, v, meta, ranges, live):
    o, lse = _forward(st, q, k, v, *meta, ranges)
    return o, (q, k, v, meta, live, o, lse)


def _flash_bwd(st, bwd, res, do):
    q, k, v, meta, live, o, lse = res
    return *flash_gpu.backward(bwd, q, k, v, meta, live, o, lse, do), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_supported(q, k, block_sizes: tiling.BlockSizes) -> None:
    """Raises ValueError naming the constraint when the Hopper kernel cannot take these operands."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        raise ValueError(f"the Mosaic GPU flash kernel takes bfloat16 or float16 q/k/v (wgmma operands), got "
                         f"q {q.dtype}, k {k.dtype}")
    if q.shape[-1] % 64:
        raise ValueError(f"the Mosaic GPU flash kernel needs head_dim to be a multiple of 64, got {q.shape[-1]}")
    if block_sizes.block_q % (64 * _COMPUTE_WGS):
        raise ValueError(f"the Mosaic GPU flash kernel needs block_q to be a multiple of {64 * _COMPUTE_WGS} "
                         f"(64 rows per compute warpgroup), got {block_sizes.block_q}")
    if block_sizes.block_kv % 64:
        raise ValueError(f"the Mosaic GPU flash kernel needs block_kv to be a multiple of 64, got "
                         f"{block_sizes.block_kv}")


def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, scale=None,
                    block_sizes: tiling.BlockSizes | None = None, stages: int = 2, interpret=False):
    """The `attention(...)` contract (layout [batch, seq, heads, head_dim]) with the Hopper forward kernel; the
    backward runs flash_gpu's Triton kernels on the same residuals.

    `interpret=True` runs the forward in Mosaic GPU's interpret mode (a CPU simulation of the warpgroups, shared
    memory, TMA and barriers) and the backward in the generic Pallas interpreter.
    """
    block_sizes = block_sizes or DEFAULT_BLOCKS
    check_supported(q, k, block_sizes)
    if stages < 2:
        raise ValueError(f"stages must be at least 2 (one K/V slot loading while one is read), got {stages}")
    batch, q_len, heads, head_dim = q.shape
    # Whole blocks for both kernels: the Triton backward's blocks divide the forward's.
    bwd_blocks = flash_gpu.DEFAULT_BLOCKS
    q_unit = math.lcm(block_sizes.block_q, bwd_blocks.block_q)
    kv_unit = math.lcm(block_sizes.block_kv, bwd_blocks.block_kv)
    q_pad, kv_pad = -(-q_len // q_unit) * q_unit, -(-k.shape[1] // kv_unit) * kv_unit
    q_pos, q_seg = (tiling.pad_to(jnp.asarray(x, jnp.int32), 1, q_pad) for x in (q_positions, q_segment_ids))
    kv_pos, kv_seg = (tiling.pad_to(jnp.asarray(x, jnp.int32), 1, kv_pad) for x in (kv_positions, kv_segment_ids))
    q, k, v = tiling.pad_to(q, 1, q_pad), tiling.pad_to(k, 1, kv_pad), tiling.pad_to(v, 1, kv_pad)
    scale = float(head_dim ** -0.5 if scale is None else scale)
    group = heads // k.shape[2]
    st = _Static(causal=causal, scale=scale, block_q=block_sizes.block_q, block_kv=block_sizes.block_kv,
                 group=group, stages=stages, interpret=interpret)
    bwd = flash_gpu.Static(causal=causal, scale=scale, block_q=bwd_blocks.block_q, block_kv=bwd_blocks.block_kv,
                           group=group, interpret=bool(interpret))
    ranges = mask_ranges(q_pos, kv_pos, q_seg, kv_seg, st.block_q, st.block_kv, causal)
    live = tiling.live_tiles(q_pos, kv_pos, q_seg, kv_seg, bwd.block_q, bwd.block_kv, causal)
    return _flash(st, bwd, q, k, v, (q_pos, q_seg, kv_pos, kv_seg), ranges, live)[:, :q_len]
