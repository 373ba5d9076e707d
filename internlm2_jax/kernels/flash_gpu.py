"""Flash attention for GPU (Pallas, Triton backend): forward and backward, GQA-native, the `attention(...)` contract.

Unlike the TPU kernels these work on the entry point's [batch, seq, heads, head_dim] layout directly (Triton blocks
are strided pointers, so no head-major copies). One program per (q block, batch, head) loops over its kv blocks in
registers, the FlashAttention-2 schedule:
- forward: online softmax in fp32, saving the log-sum-exp [batch, heads, seq].
- dq: one program per q block, looping over kv blocks.
- dk/dv: one program per (kv block, kv head), looping over every query head of the group and every q block, so
  dk/dv come out per kv head (no repeated K/V, no per-head copies to sum).
Loops run only over the live block range of tiling.py (block skipping for causal masks and packed documents).
Triton needs power-of-two tiles: block sizes and head_dim must be powers of two; sequences are padded.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from internlm2_jax.kernels import tiling

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b

# 128 x 64 is the FlashAttention-2 Triton forward tile for head_dim 128 on A100/H100.
DEFAULT_BLOCKS = tiling.BlockSizes(block_q=128, block_kv=64)


class _Static(tiling.KernelStatic):
    def call(self, kernel, *, head_dim, **kw):
        params = plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
        return pl.pallas_call(kernel, compiler_params=params, interpret=self.interpret, **kw)


def _tile(q, k, q_pos, q_seg, kv_pos, kv_seg, st):
    """Scaled fp32 scores [bq, bkv] with masked entries at MASKED, and the mask (same rule as reference.py)."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * st.scale
    mask = (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] != 0)
    if st.causal:
        mask &= kv_pos[None, :] <= q_pos[:, None]
    return jnp.where(mask, s, tiling.MASKED), mask


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_ref, lse_ref, *, st):
    q, q_pos, q_seg = q_ref[...], qp_ref[...], qs_ref[...]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        kv = pl.ds(j * st.block_kv, st.block_kv)
        s, mask = _tile(q, k_ref[kv, :], q_pos, q_seg, kp_ref[kv], ks_ref[kv], st)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        # The where matters for rows with no unmasked key yet: there s - m_next is 0, not -inf.
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        v = v_ref[kv, :]
        acc = alpha[:, None] * acc + jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                         preferred_element_type=jnp.float32)
        return acc, m_next, alpha * l_prev + p.sum(axis=1)

    block_q, head_dim = q.shape
    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), tiling.MASKED, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, total = jax.lax.fori_loop(lo_ref[0], hi_ref[0] + 1, body, init)
    # Rows that saw no key keep l == 0: zeros out, and an lse that is never used (their probabilities are masked).
    o_ref[...] = (acc * jnp.where(total > 0, 1.0 / total, 0.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(total > 0, m + jnp.log(total), 0.0)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qp_ref, qs_ref, kp_ref, ks_ref, dq_ref,
               *, st):
    q, do, lse, di, q_pos, q_seg = q_ref[...], do_ref[...], lse_ref[...], di_ref[...], qp_ref[...], qs_ref[...]

    def body(j, dq):
        kv = pl.ds(j * st.block_kv, st.block_kv)
        k = k_ref[kv, :]
        s, mask = _tile(q, k, q_pos, q_seg, kp_ref[kv], ks_ref[kv], st)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = jax.lax.dot_general(do, v_ref[kv, :], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di[:, None])
        return dq + jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(lo_ref[0], hi_ref[0] + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qp_ref, qs_ref, kp_ref, ks_ref,
                dk_ref, dv_ref, *, st):
    # q_ref, do_ref [T, group, D] and lse_ref, di_ref [group, T]: every query head of this kv head's group.
    k, v, kv_pos, kv_seg = k_ref[...], v_ref[...], kp_ref[...], ks_ref[...]

    def over_q_blocks(g, carry):
        def body(i, carry):
            dk, dv = carry
            rows = pl.ds(i * st.block_q, st.block_q)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            s, mask = _tile(q, k, qp_ref[rows], qs_ref[rows], kv_pos, kv_seg, st)
            p = jnp.where(mask, jnp.exp(s - lse_ref[g, rows][:, None]), 0.0)
            dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
            dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - di_ref[g, rows][:, None])
            return dk + jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32), dv

        return jax.lax.fori_loop(lo_ref[0], hi_ref[0] + 1, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, st.group, over_q_blocks, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _scalar_spec(n_inner):
    """Block (1,) of a flattened [batch * n_inner] range array, for the program of (block i, batch b)."""
    return pl.BlockSpec((1,), lambda i, b, h: (b * n_inner + i,))


def _forward(st, q, k, v, meta, kv_lo, kv_hi):
    batch, q_len, heads, head_dim = q.shape
    kv_len, nq = k.shape[1], q_len // st.block_q
    q_spec = pl.BlockSpec((None, st.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, jax.lax.div(h, st.group), 0))
    q_row = pl.BlockSpec((None, st.block_q), lambda i, b, h: (b, i))
    kv_row = pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))
    return st.call(
        functools.partial(_fwd_kernel, st=st), head_dim=head_dim, grid=(nq, batch, heads),
        in_specs=[_scalar_spec(nq), _scalar_spec(nq), q_spec, kv_spec, kv_spec, q_row, q_row, kv_row, kv_row],
        out_specs=[q_spec, pl.BlockSpec((None, None, st.block_q), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
    )(kv_lo, kv_hi, q, k, v, *meta)


def _dq(st, q, k, v, do, lse, di, meta, kv_lo, kv_hi):
    batch, q_len, heads, head_dim = q.shape
    kv_len, nq = k.shape[1], q_len // st.block_q
    q_spec = pl.BlockSpec((None, st.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, jax.lax.div(h, st.group), 0))
    row = pl.BlockSpec((None, None, st.block_q), lambda i, b, h: (b, h, i))
    q_row = pl.BlockSpec((None, st.block_q), lambda i, b, h: (b, i))
    kv_row = pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))
    return st.call(
        functools.partial(_dq_kernel, st=st), head_dim=head_dim, grid=(nq, batch, heads),
        in_specs=[_scalar_spec(nq), _scalar_spec(nq), q_spec, kv_spec, kv_spec, q_spec, row, row,
                  q_row, q_row, kv_row, kv_row],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(kv_lo, kv_hi, q, k, v, do, lse, di, *meta)


def _dkv(st, q, k, v, do, lse, di, meta, q_lo, q_hi):
    batch, kv_len, kv_heads, head_dim = k.shape
    q_len, nk, group = q.shape[1], kv_len // st.block_kv, st.group
    # Free reshapes: a kv head's query heads are contiguous ([kv_heads, group] order of the reference).
    grouped = lambda x: x.reshape(batch, q_len, kv_heads, group, head_dim)
    rows = lambda x: x.reshape(batch, kv_heads, group, q_len)
    q_spec = pl.BlockSpec((None, q_len, None, group, head_dim), lambda j, b, h: (b, 0, h, 0, 0))
    kv_spec = pl.BlockSpec((None, st.block_kv, None, head_dim), lambda j, b, h: (b, j, h, 0))
    row = pl.BlockSpec((None, None, group, q_len), lambda j, b, h: (b, h, 0, 0))
    q_row = pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0))
    kv_row = pl.BlockSpec((None, st.block_kv), lambda j, b, h: (b, j))
    return st.call(
        functools.partial(_dkv_kernel, st=st), head_dim=head_dim, grid=(nk, batch, kv_heads),
        in_specs=[_scalar_spec(nk), _scalar_spec(nk), q_spec, kv_spec, kv_spec, q_spec, row, row,
                  q_row, q_row, kv_row, kv_row],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q_lo, q_hi, grouped(q), k, v, grouped(do), rows(lse), rows(di), *meta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, meta, live):
    return _flash_fwd(st, q, k, v, meta, live)[0]


def _flash_fwd(st, q, k, v, meta, live):
    o, lse = _forward(st, q, k, v, meta, *tiling.block_ranges(live))
    return o, (q, k, v, meta, live, o, lse)


def _flash_bwd(st, res, do):
    q, k, v, meta, live, o, lse = res
    # di = rowsum(dO * O) is the softmax-backward correction; one fused XLA reduction, [batch, heads, seq] like lse.
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    dq = _dq(st, q, k, v, do, lse, di, meta, *tiling.block_ranges(live))
    dk, dv = _dkv(st, q, k, v, do, lse, di, meta, *tiling.block_ranges(live.transpose(0, 2, 1)))
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, scale=None,
                    block_sizes: tiling.BlockSizes | None = None, interpret=False):
    """The `attention(...)` contract (layout [batch, seq, heads, head_dim]) as GPU Pallas (Triton) kernels.

    `interpret=True` runs the kernels in the generic Pallas interpreter (CPU).
    """
    block_sizes = block_sizes or DEFAULT_BLOCKS
    batch, q_len, heads, head_dim = q.shape
    for name, value in (("head_dim", head_dim), ("block_q", block_sizes.block_q),
                        ("block_kv", block_sizes.block_kv)):
        if not _is_power_of_two(value) or value < 16:
            raise ValueError(f"the Triton flash kernel needs {name} to be a power of two >= 16, got {value}")
    p = tiling.prepare(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_sizes, causal,
                       power_of_two=True)
    st = _Static(causal=causal, scale=float(head_dim ** -0.5 if scale is None else scale), block_q=p.block_q,
                 block_kv=p.block_kv, group=heads // k.shape[2], interpret=interpret)
    meta = (p.q_meta[..., 0], p.q_meta[..., 1], p.kv_meta[:, 0], p.kv_meta[:, 1])
    return _flash(st, p.q, p.k, p.v, meta, p.live)[:, :q_len]
