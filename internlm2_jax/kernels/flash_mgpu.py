"""Flash attention for Hopper GPUs (Pallas, Mosaic GPU backend): the forward kernel (the FlashAttention-3 schedule)
and the `attention(...)` contract over it and the backward kernels of flash_mgpu_bwd.py.

Why a second GPU kernel: the Triton kernel (flash_gpu.py) is the FlashAttention-2 schedule, where every warp both
loads and computes. On Hopper the tensor cores are fed by TMA copies and asynchronous warpgroup MMAs (wgmma), which
Triton reaches only partly; Mosaic GPU exposes them directly. One CTA per (query head, block_q query rows, batch row)
runs three warpgroups:
- a producer warpgroup that streams K and V blocks into a ring of shared-memory slots with TMA,
- two compute warpgroups of `block_q / 2` query rows each, running QK^T and PV as wgmma (P from registers) with the
  online softmax in fp32 (base 2, the scale folded into one multiply).
Masking follows reference.py (positions and segment ids). Each CTA walks only its live kv blocks (tiling.py) and
applies the mask only on tiles that are not provably fully visible: for causal packed data those are the diagonal and
the blocks where a document starts or ends; the rest run an unmasked loop. The q tiles run longest (last) first.

The forward saves the log-sum-exp [batch, heads, seq] (natural log, as the Triton kernel) for the backward.
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

from internlm2_jax.kernels import flash_mgpu_bwd, tiling
from internlm2_jax.kernels.mgpu_pipeline import (COL, COMPUTE_WGS, LOG2E, ROW, TRANSFORMS, add_matmul, launch,
                                                 lhs_operand, load_vector, mask_ranges, matmul, produce,
                                                 staging_buffer, visible, walk)

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
    ping_pong: bool  # take turns on the tensor cores: one warpgroup's softmax runs under the other's matmuls


def _forward(st: _Static, q, k, v, q_meta, kv_meta, ranges):
    batch, q_len, heads, head_dim = q.shape
    dtype = q.dtype
    rows = st.block_q // COMPUTE_WGS
    bkv, stages = st.block_kv, st.stages
    scale = st.scale * LOG2E  # scores in base 2: exp2 instead of exp

    def kernel(ranges_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref, lse_ref, scoped):
        (q_smem, k_smem, v_smem, meta_smem, p_smem, lse_smem), ready, (k_free, v_free), turn = scoped
        q_ready, k_ready, v_ready = ready
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        # Last q tiles first: under a causal mask they are the longest, so the wave's tail is made of short ones.
        t = q_len // st.block_q - 1 - lax.axis_index("q_tile")
        blocks = tuple(ranges_ref[b, t, i] for i in range(4))
        lo, hi = blocks[0], blocks[3]

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            row0 = t * st.block_q + wg * rows
            qo = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, rows), h], qo, q_ready.at[wg])
            q_pos = load_vector(qm_ref.at[b, 0, pl.ds(row0, rows)], ROW)
            q_seg = load_vector(qm_ref.at[b, 1, pl.ds(row0, rows)], ROW)
            plgpu.barrier_wait(q_ready.at[wg])

            def take_turns():  # both compute warpgroups meet here (FlashAttention-3's ping-pong schedule)
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

            def step(j, carry, masked):
                acc, m, total = carry
                slot = lax.rem(j - lo, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                s = matmul(qo, k_smem.at[slot].transpose((1, 0)), (rows, bkv),
                           take_turns if st.ping_pong else None) * scale
                if masked:
                    mask = visible(q_pos, q_seg, plgpu.load(meta_smem.at[slot, 0], layout=COL),
                                   plgpu.load(meta_smem.at[slot, 1], layout=COL), s.shape, 0, st.causal)
                    s = jnp.where(mask, s, tiling.MASKED)
                plgpu.barrier_arrive(k_free.at[slot])  # K and the keys' positions and segment ids are read
                m_next = jnp.maximum(m, s.max(axis=1))
                p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
                if masked:  # rows with no visible key yet have s == m_next == MASKED, so p would be 1
                    p = jnp.where(mask, p, 0.0)
                alpha = jnp.exp2(m - m_next)
                total = total * alpha + p.sum(axis=1)
                p_operand = lhs_operand(p, None if p_smem is None else p_smem.at[wg], dtype)
                if st.ping_pong:  # softmax done: the other warpgroup may issue its QK^T; PV waits for its turn
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                if st.ping_pong:
                    plgpu.barrier_wait(turn)
                acc = add_matmul(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p_operand, v_smem.at[slot],
                                 st.interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_next, total

            carry = (plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA),
                     plgpu.layout_cast(jnp.full((rows,), tiling.MASKED, jnp.float32), ROW),
                     plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), ROW))
            if st.ping_pong:  # warpgroup 1 starts a turn behind; warpgroup 0 closes the last turn after its loop
                pl.when(wg == 1)(take_turns)
            acc, m, total = walk(blocks, step, carry)
            if st.ping_pong:
                pl.when(wg == 0)(take_turns)
            # Rows that saw no key keep total == 0: zeros out and an lse of 0, as in the Triton kernel.
            seen = total > 0
            inv = jnp.where(seen, 1.0 / jnp.where(seen, total, 1.0), 0.0)
            qo[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(seen, (m + jnp.log2(jnp.where(seen, total, 1.0))) / LOG2E, 0.0)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, o_ref.at[b, pl.ds(row0, rows), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, rows)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            keys = lambda i: pl.ds((lo + i) * bkv, bkv)
            kv_head = lax.div(h, st.group)

            def issue_k(i, slot):
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys(i), kv_head], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(km_ref.at[b, :, keys(i)], meta_smem.at[slot], k_ready.at[slot])

            produce(hi - lo, stages, [
                (k_free, issue_k),
                (v_free, lambda i, slot: plgpu.copy_gmem_to_smem(v_ref.at[b, keys(i), kv_head], v_smem.at[slot],
                                                                 v_ready.at[slot])),
            ])

    def entry(*refs):
        smem = (plgpu.SMEM((COMPUTE_WGS, rows, head_dim), dtype, transforms=TRANSFORMS),
                plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=TRANSFORMS),
                plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=TRANSFORMS),
                plgpu.SMEM((stages, 2, bkv), jnp.int32),
                staging_buffer(st.interpret, (COMPUTE_WGS, rows, bkv), dtype),
                plgpu.SMEM((COMPUTE_WGS, rows), jnp.float32))
        # A K slot's barrier completes when both its copies (K, and the keys' positions and segment ids) have landed.
        ready = (plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                 plgpu.Barrier(num_barriers=stages))
        free = (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2
        turn = plgpu.Barrier(num_arrivals=COMPUTE_WGS) if st.ping_pong else None
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, ready, free, turn, collective_axes="wg")

    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32))
    return launch(entry, out_type, (heads, q_len // st.block_q, batch), ("heads", "q_tile", "batch"), st.interpret,
                  ranges, q, k, v, q_meta, kv_meta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(st, bwd, q, k, v, meta, ranges):
    return _forward(st, q, k, v, *meta, ranges)[0]


def _flash_fwd(st, bwd, q, k, v, meta, ranges):
    o, lse = _forward(st, q, k, v, *meta, ranges)
    return o, (q, k, v, meta, o, lse)


def _flash_bwd(st, bwd, res, do):
    q, k, v, meta, o, lse = res
    return *flash_mgpu_bwd.backward(bwd, q, k, v, meta, o, lse, do), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_supported(q, k, block_sizes: tiling.BlockSizes) -> None:
    """Raises ValueError naming the constraint when the Hopper kernels cannot take these operands."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        raise ValueError(f"the Mosaic GPU flash kernel takes bfloat16 or float16 q/k/v (wgmma operands), got "
                         f"q {q.dtype}, k {k.dtype}")
    if q.shape[-1] % 64:
        raise ValueError(f"the Mosaic GPU flash kernel needs head_dim to be a multiple of 64, got {q.shape[-1]}")
    if block_sizes.block_q % (64 * COMPUTE_WGS):
        raise ValueError(f"the Mosaic GPU flash kernel needs block_q to be a multiple of {64 * COMPUTE_WGS} "
                         f"(64 rows per compute warpgroup), got {block_sizes.block_q}")
    if block_sizes.block_kv % 64:
        raise ValueError(f"the Mosaic GPU flash kernel needs block_kv to be a multiple of 64, got "
                         f"{block_sizes.block_kv}")


def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, scale=None,
                    block_sizes: tiling.BlockSizes | None = None, stages: int = 2, ping_pong: bool = False,
                    interpret=False):
    """The `attention(...)` contract (layout [batch, seq, heads, head_dim]) as Hopper kernels: this forward and the
    dq and dk/dv kernels of flash_mgpu_bwd.py. `block_sizes` sets the forward's tile; `stages` the shared-memory
    slots each producer keeps in flight; `ping_pong` makes the forward's two compute warpgroups take turns on the
    tensor cores (FlashAttention-3's schedule; off until a GPU has timed it).

    `interpret=True` (or InterpretGPUParams) runs all three in Mosaic GPU's interpret mode: a CPU simulation of the
    warpgroups, shared memory, TMA copies and barriers.
    """
    block_sizes = block_sizes or DEFAULT_BLOCKS
    check_supported(q, k, block_sizes)
    if stages < 2:
        raise ValueError(f"stages must be at least 2 (one slot loading while one is read), got {stages}")
    batch, q_len, heads, head_dim = q.shape
    # Whole blocks for the forward and for both backward kernels (128-row resident slabs, 64-wide streamed blocks).
    q_unit = math.lcm(block_sizes.block_q, flash_mgpu_bwd.RESIDENT_BLOCK)
    kv_unit = math.lcm(block_sizes.block_kv, flash_mgpu_bwd.RESIDENT_BLOCK)
    q_pad, kv_pad = -(-q_len // q_unit) * q_unit, -(-k.shape[1] // kv_unit) * kv_unit
    q_pos, q_seg = (tiling.pad_to(jnp.asarray(x, jnp.int32), 1, q_pad) for x in (q_positions, q_segment_ids))
    kv_pos, kv_seg = (tiling.pad_to(jnp.asarray(x, jnp.int32), 1, kv_pad) for x in (kv_positions, kv_segment_ids))
    q, k, v = tiling.pad_to(q, 1, q_pad), tiling.pad_to(k, 1, kv_pad), tiling.pad_to(v, 1, kv_pad)
    scale = float(head_dim ** -0.5 if scale is None else scale)
    group = heads // k.shape[2]
    st = _Static(causal=causal, scale=scale, block_q=block_sizes.block_q, block_kv=block_sizes.block_kv,
                 group=group, stages=stages, interpret=interpret, ping_pong=ping_pong)
    bwd = flash_mgpu_bwd.Static(causal=causal, scale=scale, group=group, stages=stages, interpret=interpret)
    ranges = mask_ranges(q_pos, kv_pos, q_seg, kv_seg, st.block_q, st.block_kv, causal)
    meta = (jnp.stack([q_pos, q_seg], axis=1), jnp.stack([kv_pos, kv_seg], axis=1))  # [B, 2, T]: TMA-able rows
    return _flash(st, bwd, q, k, v, meta, ranges)[:, :q_len]
