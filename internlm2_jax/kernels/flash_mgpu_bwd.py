"""Flash attention backward for Hopper GPUs (Pallas, Mosaic GPU): dq and dk/dv kernels on the forward's residuals
(output and log-sum-exp), GQA-native, with the block skipping and mask-free interior of mgpu_pipeline.py.

- dq: one CTA per (query head, 128 query rows, batch row), two compute warpgroups of 64 rows; the producer streams
  K and V blocks of the live range. Per block: S = Q K^T, P = exp(S - lse), dP = dO V^T, dS = P (dP - delta),
  dQ += dS K into a wgmma accumulator that lives across the whole loop.
- dk/dv: one CTA per (kv head, 128 key rows, batch row), two compute warpgroups of 64 key rows; the producer streams
  Q and dO blocks of every query head of the group over the live query range, so dk/dv come out per kv head (no
  repeated K/V, no per-head partial sums). Per block: S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q.
P and dS are wgmma operands from registers (mgpu_pipeline.lhs_operand). delta = rowsum(dO * O) comes from one XLA
reduction.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from internlm2_jax.kernels.mgpu_pipeline import (COL, COMPUTE_WGS, LOG2E, ROW, ROWS, TRANSFORMS, launch, lhs_operand,
                                                 load_vector, matmul, produce, staging_buffer, tile_ranges,
                                                 tile_tables, visible, walk)

# dq: 128 query rows x 64 keys; dk/dv: 128 key rows x 64 queries. The 64-wide streamed blocks keep both kernels'
# shared memory (the resident slabs and two slots of K/V or Q/dO) at about 130 KB at head_dim 128.
STREAMED_BLOCK = 64
RESIDENT_BLOCK = ROWS * COMPUTE_WGS


@dataclasses.dataclass(frozen=True)
class Static:
    causal: bool
    scale: float
    group: int
    stages: int
    interpret: bool | plgpu.InterpretGPUParams


def _accumulate(acc_ref, a, b):
    """acc += a @ b, finished before returning: the operands' shared memory may be reused or released next."""
    plgpu.wgmma(acc_ref, a, b)
    plgpu.wgmma_wait(0)


def _load_resident(slabs, ready, wg):
    """A compute warpgroup's two resident 64-row slabs ((source, shared memory) pairs: Q and dO, or K and V), copied
    with TMA and waited for; `ready` holds one barrier per (slab, warpgroup)."""
    for i, (source, smem) in enumerate(slabs):
        plgpu.copy_gmem_to_smem(source, smem.at[wg], ready.at[i * COMPUTE_WGS + wg])
    for i in range(len(slabs)):
        plgpu.barrier_wait(ready.at[i * COMPUTE_WGS + wg])


def _dq(st: Static, q, k, v, do, lse, delta, q_meta, kv_meta, ranges):
    batch, q_len, heads, head_dim = q.shape
    dtype, bkv, stages = q.dtype, STREAMED_BLOCK, st.stages

    def kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qm_ref, km_ref, dq_ref, scoped):
        (q_smem, do_smem, k_smem, v_smem, meta_smem, ds_smem), (q_ready, k_ready, v_ready), free = scoped
        b, h, wg = (lax.axis_index(name) for name in ("batch", "heads", "wg"))
        t = q_len // RESIDENT_BLOCK - 1 - lax.axis_index("q_tile")  # the longest (causal) tiles first
        blocks = tuple(ranges_ref[b, t, i] for i in range(4))
        lo, hi = blocks[0], blocks[3]

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            rows = pl.ds(t * RESIDENT_BLOCK + wg * ROWS, ROWS)
            _load_resident([(q_ref.at[b, rows, h], q_smem), (do_ref.at[b, rows, h], do_smem)], q_ready, wg)
            q_pos, q_seg = load_vector(qm_ref.at[b, 0, rows], ROW), load_vector(qm_ref.at[b, 1, rows], ROW)
            row_lse, row_delta = load_vector(lse_ref.at[b, h, rows], ROW), load_vector(delta_ref.at[b, h, rows], ROW)
            on_rows = lambda x: lax.broadcast_in_dim(x, (ROWS, bkv), [0])

            def with_accumulator(dq_acc):
                def step(j, carry, masked):
                    slot = lax.rem(j - lo, stages)
                    plgpu.barrier_wait(k_ready.at[slot])
                    p = jnp.exp2(matmul(q_smem.at[wg], k_smem.at[slot].transpose((1, 0)), (ROWS, bkv))
                                 * (st.scale * LOG2E) - on_rows(row_lse * LOG2E))
                    if masked:
                        p = jnp.where(visible(q_pos, q_seg, plgpu.load(meta_smem.at[slot, 0], layout=COL),
                                              plgpu.load(meta_smem.at[slot, 1], layout=COL), p.shape, 0, st.causal),
                                      p, 0.0)
                    plgpu.barrier_wait(v_ready.at[slot])
                    dp = matmul(do_smem.at[wg], v_smem.at[slot].transpose((1, 0)), (ROWS, bkv))
                    ds = lhs_operand(p * (dp - on_rows(row_delta)), None if ds_smem is None else ds_smem.at[wg], dtype)
                    _accumulate(dq_acc, ds, k_smem.at[slot])
                    plgpu.barrier_arrive(free.at[slot])
                    return carry

                walk(blocks, step, None)
                return dq_acc[...]

            dq = pl.run_scoped(with_accumulator, plgpu.ACC((ROWS, head_dim), jnp.float32))
            q_smem.at[wg][...] = (dq * st.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(h, st.group)

            def issue(i, slot):
                keys = pl.ds((lo + i) * bkv, bkv)
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(km_ref.at[b, :, keys], meta_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_ready.at[slot])

            produce(hi - lo, stages, [(free, issue)])

    def entry(*refs):
        smem = (plgpu.SMEM((COMPUTE_WGS, ROWS, head_dim), dtype, transforms=TRANSFORMS),
                plgpu.SMEM((COMPUTE_WGS, ROWS, head_dim), dtype, transforms=TRANSFORMS),
                plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=TRANSFORMS),
                plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=TRANSFORMS),
                plgpu.SMEM((stages, 2, bkv), jnp.int32),
                staging_buffer(st.interpret, (COMPUTE_WGS, ROWS, bkv), dtype))
        # K slots: K and the keys' positions and segment ids, two copies on one barrier.
        ready = (plgpu.Barrier(num_barriers=2 * COMPUTE_WGS), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                 plgpu.Barrier(num_barriers=stages))
        free = plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, ready, free, collective_axes="wg")

    return launch(entry, jax.ShapeDtypeStruct(q.shape, dtype), (heads, q_len // RESIDENT_BLOCK, batch),
                  ("heads", "q_tile", "batch"), st.interpret, ranges, q, k, v, do, lse, delta, q_meta, kv_meta)


def _dkv(st: Static, q, k, v, do, lse, delta, q_meta, kv_meta, ranges):
    batch, kv_len, kv_heads, head_dim = k.shape
    dtype, bq, stages, group = q.dtype, STREAMED_BLOCK, st.stages, st.group

    def kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qm_ref, km_ref, dk_ref, dv_ref, scoped):
        (k_smem, v_smem, q_smem, do_smem, meta_smem, stat_smem, p_smem, ds_smem), ready, free = scoped
        kv_ready, q_ready, do_ready = ready
        b, g, t, wg = (lax.axis_index(name) for name in ("batch", "kv_heads", "kv_tile", "wg"))
        blocks = tuple(ranges_ref[b, t, i] for i in range(4))
        lo, hi = blocks[0], blocks[3]
        per_head = hi - lo

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            rows = pl.ds(t * RESIDENT_BLOCK + wg * ROWS, ROWS)
            _load_resident([(k_ref.at[b, rows, g], k_smem), (v_ref.at[b, rows, g], v_smem)], kv_ready, wg)
            kv_pos, kv_seg = load_vector(km_ref.at[b, 0, rows], ROW), load_vector(km_ref.at[b, 1, rows], ROW)
            on_cols = lambda x: lax.broadcast_in_dim(x, (ROWS, bq), [1])

            def with_accumulators(dk_acc, dv_acc):
                def over_heads(head, carry):
                    def step(i, carry, masked):
                        slot = lax.rem(head * per_head + i - lo, stages)
                        plgpu.barrier_wait(q_ready.at[slot])
                        col_lse = plgpu.load(stat_smem.at[slot, 0], layout=COL)
                        p = jnp.exp2(matmul(k_smem.at[wg], q_smem.at[slot].transpose((1, 0)), (ROWS, bq))
                                     * (st.scale * LOG2E) - on_cols(col_lse * LOG2E))
                        if masked:
                            p = jnp.where(visible(plgpu.load(meta_smem.at[slot, 0], layout=COL),
                                                  plgpu.load(meta_smem.at[slot, 1], layout=COL), kv_pos, kv_seg,
                                                  p.shape, 1, st.causal), p, 0.0)
                        p_operand = lhs_operand(p, None if p_smem is None else p_smem.at[wg], dtype)
                        plgpu.barrier_wait(do_ready.at[slot])
                        plgpu.wgmma(dv_acc, p_operand, do_smem.at[slot])
                        dp = matmul(v_smem.at[wg], do_smem.at[slot].transpose((1, 0)), (ROWS, bq))
                        col_delta = plgpu.load(stat_smem.at[slot, 1], layout=COL)
                        ds = lhs_operand(p * (dp - on_cols(col_delta)), None if ds_smem is None else ds_smem.at[wg],
                                         dtype)
                        _accumulate(dk_acc, ds, q_smem.at[slot])
                        plgpu.barrier_arrive(free.at[slot])
                        return carry

                    return walk(blocks, step, carry)

                lax.fori_loop(0, group, over_heads, None)
                return dk_acc[...], dv_acc[...]

            acc = plgpu.ACC((ROWS, head_dim), jnp.float32)
            dk, dv = pl.run_scoped(with_accumulators, acc, acc)
            k_smem.at[wg][...] = (dk * st.scale).astype(dtype)
            v_smem.at[wg][...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, rows, g])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, rows, g])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")

            def issue(n, slot):
                head = g * group + lax.div(n, per_head)
                cols = pl.ds((lo + lax.rem(n, per_head)) * bq, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[b, cols, head], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(qm_ref.at[b, :, cols], meta_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, head, cols], stat_smem.at[slot, 0], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, cols, head], do_smem.at[slot], do_ready.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, head, cols], stat_smem.at[slot, 1], do_ready.at[slot])

            produce(group * per_head, stages, [(free, issue)])

    def entry(*refs):
        resident = plgpu.SMEM((COMPUTE_WGS, ROWS, head_dim), dtype, transforms=TRANSFORMS)
        streamed = plgpu.SMEM((stages, bq, head_dim), dtype, transforms=TRANSFORMS)
        staged = staging_buffer(st.interpret, (COMPUTE_WGS, ROWS, bq), dtype)
        smem = (resident, resident, streamed, streamed, plgpu.SMEM((stages, 2, bq), jnp.int32),
                plgpu.SMEM((stages, 2, bq), jnp.float32), staged, staged)
        # Per slot, what the first half of a step reads (Q, the queries' positions and segment ids, lse) and what
        # the second half reads (dO, delta): one barrier each, completing when all of its copies have landed.
        ready = (plgpu.Barrier(num_barriers=2 * COMPUTE_WGS), plgpu.Barrier(num_arrivals=3, num_barriers=stages),
                 plgpu.Barrier(num_arrivals=2, num_barriers=stages))
        free = plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, ready, free, collective_axes="wg")

    out = jax.ShapeDtypeStruct(k.shape, dtype)
    return launch(entry, (out, out), (kv_heads, kv_len // RESIDENT_BLOCK, batch), ("kv_heads", "kv_tile", "batch"),
                  st.interpret, ranges, q, k, v, do, lse, delta, q_meta, kv_meta)


def backward(st: Static, q, k, v, meta, o, lse, do):
    """dq, dk, dv on padded operands: q/o/do [B, T, H, D] with T a multiple of 128, k/v [B, S, KV, D] with S a
    multiple of 128, meta the padded (q_meta [B, 2, T], kv_meta [B, 2, S]) of (positions, segment ids) rows, lse
    [B, H, T] from the forward."""
    q_meta, kv_meta = meta
    (q_pos, q_seg), (kv_pos, kv_seg) = (q_meta[:, 0], q_meta[:, 1]), (kv_meta[:, 0], kv_meta[:, 1])
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    args = (q, k, v, do, lse, delta, q_meta, kv_meta)
    live, full = tile_tables(q_pos, kv_pos, q_seg, kv_seg, RESIDENT_BLOCK, STREAMED_BLOCK, st.causal)
    dq = _dq(st, *args, tile_ranges(live, full))
    live, full = tile_tables(q_pos, kv_pos, q_seg, kv_seg, STREAMED_BLOCK, RESIDENT_BLOCK, st.causal)
    dk, dv = _dkv(st, *args, tile_ranges(live.transpose(0, 2, 1), full.transpose(0, 2, 1)))
    return dq, dk, dv
