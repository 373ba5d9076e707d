"""Flash attention for TPU (Pallas/Mosaic): forward and backward, GQA-native, masked by positions and segment ids.

Three kernels, all over padded head-major operands (tiling.prepare):
- forward, grid (batch, q_head, q_block, kv_block): online softmax in fp32 VMEM scratch; saves the log-sum-exp.
- dq, same grid: recomputes probabilities from the saved log-sum-exp and accumulates dq over kv blocks.
- dk/dv, grid (batch, kv_head, kv_block, group, q_block): a kv block accumulates over every query head of its group
  and every q block, so dk/dv come out per kv head without repeating K/V or summing per-head copies afterwards.
GQA: query head h reads kv head h // group (the [kv_heads, group] order of the reference); K/V are never repeated.
Block skipping: the scalar-prefetched block ranges of tiling.py gate the compute with `pl.when`, and the index maps
clamp the block index into the range so that skipped steps issue no DMA either.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from internlm2_jax.kernels import tiling

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


class _Static(tiling.KernelStatic):
    def call(self, kernel, **kw):
        # TPU interpret mode (not the generic one) is needed on CPU: the kernels use scalar prefetch into SMEM.
        return pl.pallas_call(kernel, interpret=pltpu.InterpretParams() if self.interpret else False, **kw)


def scores(q, k, q_meta, kv_meta, causal, scale):
    """Scaled fp32 scores [bq, bkv] with masked entries at MASKED, and the mask. q_meta [bq, 2], kv_meta [2, bkv]."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    q_pos, q_seg = q_meta[:, 0:1], q_meta[:, 1:2]
    kv_pos, kv_seg = kv_meta[0:1, :], kv_meta[1:2, :]
    mask = (q_seg == kv_seg) & (q_seg != 0)
    if causal:
        mask &= kv_pos <= q_pos
    return jnp.where(mask, s, tiling.MASKED), mask


def online_softmax_init(m_sc, l_sc, acc_sc):
    m_sc[...] = jnp.full(m_sc.shape, tiling.MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def online_softmax_step(s, mask, v, m_sc, l_sc, acc_sc):
    """Folds one tile of masked scores [rows, keys] and its values into the running max, sum and output (fp32)."""
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    # The where matters for rows with no unmasked key yet: there s - m_next is 0, not -inf.
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    m_sc[...] = m_next
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def online_softmax_result(m_sc, l_sc, acc_sc):
    """Normalised output [rows, head_dim] and log-sum-exp [rows, 1], both fp32.

    Rows that saw no key keep l == 0: they output zeros and their lse is never used (their probabilities are masked).
    """
    total = l_sc[...]
    return (acc_sc[...] * jnp.where(total > 0, 1.0 / total, 0.0),
            jnp.where(total > 0, m_sc[...] + jnp.log(total), 0.0))


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qm_ref, kvm_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, st):
    b, qi, ki, nq, nk = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.num_programs(2), pl.num_programs(3)
    row = b * nq + qi

    @pl.when(ki == 0)
    def _init():
        online_softmax_init(m_sc, l_sc, acc_sc)

    @pl.when((ki >= lo_ref[row]) & (ki <= hi_ref[row]))
    def _compute():
        s, mask = scores(q_ref[...], k_ref[...], qm_ref[...], kvm_ref[...], st.causal, st.scale)
        online_softmax_step(s, mask, v_ref[...], m_sc, l_sc, acc_sc)

    @pl.when(ki == nk - 1)
    def _finish():
        o, lse = online_softmax_result(m_sc, l_sc, acc_sc)
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse.T


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qm_ref, kvm_ref, dq_ref, dq_sc, *, st):
    b, qi, ki, nq, nk = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.num_programs(2), pl.num_programs(3)
    row = b * nq + qi

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when((ki >= lo_ref[row]) & (ki <= hi_ref[row]))
    def _compute():
        k = k_ref[...]
        s, mask = scores(q_ref[...], k, qm_ref[...], kvm_ref[...], st.causal, st.scale)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...].T), 0.0)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[...].T)
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(ki == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qm_ref, kvm_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, st):
    b, ki, g, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    nk, groups, nq = pl.num_programs(2), pl.num_programs(3), pl.num_programs(4)
    row = b * nk + ki

    @pl.when((g == 0) & (qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when((qi >= lo_ref[row]) & (qi <= hi_ref[row]))
    def _compute():
        q, do = q_ref[...], do_ref[...]
        s, mask = scores(q, k_ref[...], qm_ref[...], kvm_ref[...], st.causal, st.scale)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...].T), 0.0)
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[...].T)
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)

    @pl.when((g == groups - 1) & (qi == nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _forward(st: _Static, q, k, v, q_meta, kv_meta, kv_lo, kv_hi):
    batch, heads, q_len, head_dim = q.shape
    nq, nk = q_len // st.block_q, k.shape[2] // st.block_kv
    bq, bkv, group = st.block_q, st.block_kv, st.group
    kv_block = lambda b, i, j, lo, hi: tiling.clamp(j, lo[b * nq + i], hi[b * nq + i])
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, heads, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, lo, hi: (b, h, i, 0)),
            pl.BlockSpec((None, None, bkv, head_dim), lambda b, h, i, j, lo, hi: (b, jax.lax.div(h, group),
                                                                                   kv_block(b, i, j, lo, hi), 0)),
            pl.BlockSpec((None, None, bkv, head_dim), lambda b, h, i, j, lo, hi: (b, jax.lax.div(h, group),
                                                                                   kv_block(b, i, j, lo, hi), 0)),
            pl.BlockSpec((None, bq, 2), lambda b, h, i, j, lo, hi: (b, i, 0)),
            pl.BlockSpec((None, 2, bkv), lambda b, h, i, j, lo, hi: (b, 0, kv_block(b, i, j, lo, hi))),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, lo, hi: (b, h, i, 0)),
            pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, lo, hi: (b, h, 0, i)),
        ],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, head_dim), jnp.float32)])
    return st.call(
        functools.partial(_fwd_kernel, st=st), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, 1, q_len), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(kv_lo, kv_hi, q, k, v, q_meta, kv_meta)


def _dq(st: _Static, q, k, v, do, lse, di, q_meta, kv_meta, kv_lo, kv_hi):
    batch, heads, q_len, head_dim = q.shape
    nq, nk = q_len // st.block_q, k.shape[2] // st.block_kv
    bq, bkv, group = st.block_q, st.block_kv, st.group
    kv_block = lambda b, i, j, lo, hi: tiling.clamp(j, lo[b * nq + i], hi[b * nq + i])
    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, lo, hi: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bkv, head_dim),
                           lambda b, h, i, j, lo, hi: (b, jax.lax.div(h, group), kv_block(b, i, j, lo, hi), 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, lo, hi: (b, h, 0, i))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, heads, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                  pl.BlockSpec((None, bq, 2), lambda b, h, i, j, lo, hi: (b, i, 0)),
                  pl.BlockSpec((None, 2, bkv), lambda b, h, i, j, lo, hi: (b, 0, kv_block(b, i, j, lo, hi)))],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)])
    return st.call(
        functools.partial(_dq_kernel, st=st), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(kv_lo, kv_hi, q, k, v, do, lse, di, q_meta, kv_meta)


def _dkv(st: _Static, q, k, v, do, lse, di, q_meta, kv_meta, q_lo, q_hi):
    batch, kv_heads, kv_len, head_dim = k.shape
    nq, nk = q.shape[2] // st.block_q, kv_len // st.block_kv
    bq, bkv, group = st.block_q, st.block_kv, st.group
    q_block = lambda b, j, i, lo, hi: tiling.clamp(i, lo[b * nk + j], hi[b * nk + j])
    q_spec = pl.BlockSpec((None, None, bq, head_dim),
                          lambda b, h, j, g, i, lo, hi: (b, h * group + g, q_block(b, j, i, lo, hi), 0))
    kv_spec = pl.BlockSpec((None, None, bkv, head_dim), lambda b, h, j, g, i, lo, hi: (b, h, j, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq),
                            lambda b, h, j, g, i, lo, hi: (b, h * group + g, 0, q_block(b, j, i, lo, hi)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, kv_heads, nk, group, nq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                  pl.BlockSpec((None, bq, 2), lambda b, h, j, g, i, lo, hi: (b, q_block(b, j, i, lo, hi), 0)),
                  pl.BlockSpec((None, 2, bkv), lambda b, h, j, g, i, lo, hi: (b, 0, j))],
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bkv, head_dim), jnp.float32), pltpu.VMEM((bkv, head_dim), jnp.float32)])
    return st.call(
        functools.partial(_dkv_kernel, st=st), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    )(q_lo, q_hi, q, k, v, do, lse, di, q_meta, kv_meta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, q_meta, kv_meta, live):
    return _flash_fwd(st, q, k, v, q_meta, kv_meta, live)[0]


def _flash_fwd(st, q, k, v, q_meta, kv_meta, live):
    o, lse = _forward(st, q, k, v, q_meta, kv_meta, *tiling.block_ranges(live))
    return o, (q, k, v, q_meta, kv_meta, live, o, lse)


def _flash_bwd(st, res, do):
    q, k, v, q_meta, kv_meta, live, o, lse = res
    # di = rowsum(dO * O) is the softmax-backward correction; one fused XLA reduction, stored as rows like lse.
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[:, :, None, :]
    dq = _dq(st, q, k, v, do, lse, di, q_meta, kv_meta, *tiling.block_ranges(live))
    dk, dv = _dkv(st, q, k, v, do, lse, di, q_meta, kv_meta, *tiling.block_ranges(live.transpose(0, 2, 1)))
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, scale=None,
                    block_sizes: tiling.BlockSizes | None = None, interpret=False):
    """The `attention(...)` contract (layout [batch, seq, heads, head_dim]) as TPU Pallas kernels.

    Sequences that are not a multiple of the block are padded with segment id 0 (masked) and sliced back. head_dim
    is always one whole block, which Mosaic accepts at any size (128-multiples use the MXU fully).
    `interpret=True` runs the kernels in TPU interpret mode on CPU.
    """
    batch, q_len, heads, head_dim = q.shape
    p = tiling.prepare(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                       block_sizes or tiling.BlockSizes(), causal)
    st = _Static(causal=causal, scale=float(head_dim ** -0.5 if scale is None else scale), block_q=p.block_q,
                 block_kv=p.block_kv, group=heads // k.shape[2], interpret=interpret)
    # Mosaic wants the two minor dims of a block to be (seq, head_dim), hence head-major operands inside.
    head_major = lambda x: x.transpose(0, 2, 1, 3)
    out = _flash(st, head_major(p.q), head_major(p.k), head_major(p.v), p.q_meta, p.kv_meta, p.live)
    return head_major(out)[:, :q_len]
