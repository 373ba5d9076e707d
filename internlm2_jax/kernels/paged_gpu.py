"""Attention over the paged KV cache for GPU (Pallas, Triton backend): decode and chunked prefill, GQA-native.

One program per (sequence, kv head) loops over the sequence's pages, gathering `pages_per_step` pages per iteration
into one [pages_per_step * page_size, head_dim] tile (so small pages still give tensor-core-sized dots). The rows
of the tile are all query heads of the kv head's group times all queries of the chunk, so every page is read once
per kv head. The loop stops at the sequence's length: pages past it are never read.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from internlm2_jax.kernels import tiling
from internlm2_jax.kernels.reference import paged_query_positions

_NT = (((1,), (1,)), ((), ()))


def _kernel(len_ref, table_ref, q_ref, qp_ref, k_ref, v_ref, o_ref, *, scale, page_size, pages_per_step):
    q, q_pos = q_ref[...], qp_ref[...]
    tokens = pages_per_step * page_size

    def body(step, carry):
        acc, m_prev, l_prev = carry
        pages = table_ref[pl.ds(step * pages_per_step, pages_per_step)]
        k = k_ref[pages].reshape(tokens, q.shape[1])
        v = v_ref[pages].reshape(tokens, q.shape[1])
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        # Positions of these keys; a query (padding rows have position -1) sees keys up to its own position, which
        # is below the sequence's length, so stale tokens in the last page are masked too.
        mask = step * tokens + jnp.arange(tokens)[None, :] <= q_pos[:, None]
        s = jnp.where(mask, s, tiling.MASKED)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        acc = alpha[:, None] * acc + jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                         preferred_element_type=jnp.float32)
        return acc, m_next, alpha * l_prev + p.sum(axis=1)

    rows, head_dim = q.shape
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), tiling.MASKED, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, total = jax.lax.fori_loop(0, pl.cdiv(len_ref[0], tokens), body, init)
    o_ref[...] = (acc * jnp.where(total > 0, 1.0 / total, 0.0)[:, None]).astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, q_lengths=None, scale=None, interpret=False,
                    tokens_per_step: int = 64):
    """The chunked-prefill contract of reference.paged_attention_reference, as a Triton kernel; q [B, C, H, D]."""
    batch, chunk, heads, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    group = heads // kv_heads
    for name, value in (("head_dim", head_dim), ("page_size", page_size)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"the Triton paged kernel needs {name} to be a power of two >= 16, got {value}")
    pages_per_step = max(1, tokens_per_step // page_size)
    lengths = jnp.asarray(lengths, jnp.int32)
    q_lengths = jnp.full((batch,), chunk, jnp.int32) if q_lengths is None else jnp.asarray(q_lengths, jnp.int32)
    # Whole steps of pages; entries past a sequence's pages may be anything, so clip them into the pool.
    max_pages = -(-page_table.shape[1] // pages_per_step) * pages_per_step
    table = jnp.clip(tiling.pad_to(jnp.asarray(page_table, jnp.int32), 1, max_pages), 0, num_pages - 1)
    # Rows ordered (chunk, group), padded to a power of two >= 16 (Triton tiles); padded rows have position -1.
    rows = tiling.fit_block(1 << 30, chunk * group, power_of_two=True)
    q_rows = q.reshape(batch, chunk, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = tiling.pad_to(q_rows.reshape(batch, kv_heads, chunk * group, head_dim), 2, rows)
    q_pos = jnp.repeat(paged_query_positions(lengths, q_lengths, chunk), group, axis=1)
    q_pos = tiling.pad_to(q_pos, 1, rows, value=-1)

    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0))
    pool_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, h: (h, 0, 0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, scale=float(head_dim ** -0.5 if scale is None else scale), page_size=page_size,
                          pages_per_step=pages_per_step),
        grid=(batch, kv_heads),
        in_specs=[pl.BlockSpec((1,), lambda b, h: (b,)), pl.BlockSpec((None, max_pages), lambda b, h: (b, 0)),
                  q_spec, pl.BlockSpec((None, rows), lambda b, h: (b, 0)), pool_spec, pool_spec],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(lengths, table, q_rows, q_pos, k_pages, v_pages)
    out = out[:, :, :chunk * group].reshape(batch, kv_heads, chunk, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape)
