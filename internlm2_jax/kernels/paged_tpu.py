"""Attention over the paged KV cache for TPU (Pallas/Mosaic): decode and chunked prefill, GQA-native.

Grid (batch, kv_head, page). One grid step reads one page of K and V for one kv head; the page id comes from the
scalar-prefetched page table inside the BlockSpec index map, so Pallas' pipeline double-buffers the (non-contiguous)
pages like any other block. All query heads of a kv head's group and all queries of the chunk are the rows of one
tile ([chunk * group, head_dim]), so each page is read from HBM once per kv head, never once per query head.
Pages past a sequence's length are neither computed (`pl.when`) nor fetched (the index map repeats the last page).
One page per grid step keeps the kernel simple; pages of 128+ tokens keep the per-step overhead small.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from internlm2_jax.kernels.flash_tpu import online_softmax_init, online_softmax_result, online_softmax_step, scores
from internlm2_jax.kernels.reference import paged_query_positions


def _kernel(table_ref, len_ref, q_ref, k_ref, v_ref, qm_ref, o_ref, m_sc, l_sc, acc_sc, *, scale, page_size):
    b, p = pl.program_id(0), pl.program_id(2)

    @pl.when(p == 0)
    def _init():
        online_softmax_init(m_sc, l_sc, acc_sc)

    @pl.when(p * page_size < len_ref[b])
    def _compute():
        # Keys of this page sit at positions p * page_size + [0, page_size); all belong to the one sequence (segment
        # 1), and a query (segment 1, or 0 when it is chunk padding) sees keys up to its own position.
        kv_pos = p * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
        kv_meta = jnp.concatenate([kv_pos, jnp.ones_like(kv_pos)], axis=0)
        s, mask = scores(q_ref[...], k_ref[...], qm_ref[...], kv_meta, True, scale)
        online_softmax_step(s, mask, v_ref[...], m_sc, l_sc, acc_sc)

    @pl.when(p == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = online_softmax_result(m_sc, l_sc, acc_sc)[0].astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, q_lengths=None, scale=None, interpret=False):
    """The chunked-prefill contract of reference.paged_attention_reference, as a TPU kernel; q [B, C, H, D]."""
    batch, chunk, heads, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    max_pages = page_table.shape[1]
    group = heads // kv_heads
    rows = chunk * group
    lengths = jnp.asarray(lengths, jnp.int32)
    q_lengths = jnp.full((batch,), chunk, jnp.int32) if q_lengths is None else jnp.asarray(q_lengths, jnp.int32)
    # Entries past a sequence's pages may be anything; clipping keeps even those reads inside the pool.
    table = jnp.clip(jnp.asarray(page_table, jnp.int32), 0, num_pages - 1).reshape(-1)
    # Rows ordered (chunk, group): the row layout of one kv head's [rows, head_dim] tile.
    q_rows = q.reshape(batch, chunk, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, kv_heads, rows, head_dim)
    q_pos = jnp.repeat(paged_query_positions(lengths, q_lengths, chunk), group, axis=1)
    q_meta = jnp.stack([q_pos, (q_pos >= 0).astype(jnp.int32)], axis=-1)  # [B, rows, 2]

    def page_block(h, b, p, table, lens):
        last = jax.lax.div(jnp.maximum(lens[b] - 1, 0), page_size)
        return (h, table[b * max_pages + jnp.minimum(p, last)], 0, 0)

    kv_spec = pl.BlockSpec((None, None, page_size, head_dim), lambda b, h, p, table, lens: page_block(h, b, p, table,
                                                                                                     lens))
    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, p, table, lens: (b, h, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, kv_heads, max_pages),
        in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((None, rows, 2), lambda b, h, p, table, lens: (b, 0, 0))],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, head_dim), jnp.float32)])
    out = pl.pallas_call(
        functools.partial(_kernel, scale=float(head_dim ** -0.5 if scale is None else scale), page_size=page_size),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(table, lengths, q_rows, k_pages, v_pages, q_meta)
    return out.reshape(batch, kv_heads, chunk, group, head_dim).transpose(0, 2, 1, 3, 4).reshape(q.shape)
