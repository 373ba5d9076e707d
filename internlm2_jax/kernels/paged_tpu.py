"""Attention over the paged KV cache for TPU (Pallas/Mosaic): decode and chunked prefill, GQA-native.

Grid (batch, kv_head, query block, kv block). All query heads of a kv head's group and the chunk's queries are the
rows of one tile ([tokens * group, head_dim]), so each page is read from HBM once per kv head and query block,
never once per query head; a long prefill chunk is cut into query blocks of at most `MAX_Q_ROWS` rows, which keeps
the tiles within the scoped VMEM (a 2K-token chunk of InternLM2-7B would be 8192 rows).

A kv block is `pages_per_block` pages: K and V are passed once per page of the block, each with its own BlockSpec
whose index map reads the page id from the scalar-prefetched page table, so Pallas' pipeline double-buffers the
(non-contiguous) pages like any other block and the kernel computes over their concatenation. The engine's pages
are small (16 tokens, which keeps the pool's waste and prefix-sharing granularity low); one page per grid step would
make the fixed cost of a step (about 0.35 us) dominate reading 8 KB, so by default a kv block holds about
`KV_BLOCK_TOKENS` keys whatever the page size. Blocks past a sequence's length, or past the last query of the
query block (causal), are neither computed (`pl.when`) nor fetched (the index map repeats the last needed page,
whose keys are then all masked by position).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from internlm2_jax.kernels.flash_tpu import online_softmax_init, online_softmax_result, online_softmax_step, scores
from internlm2_jax.kernels.reference import paged_query_positions

MAX_Q_ROWS = 512  # query rows (tokens x group) per tile
KV_BLOCK_TOKENS = 256  # keys per grid step by default
MAX_PAGES_PER_BLOCK = 16  # each page is its own pipelined input: bound their number (and the DMAs in flight)


def default_pages_per_block(page_size: int, max_pages: int) -> int:
    return max(1, min(KV_BLOCK_TOKENS // page_size, MAX_PAGES_PER_BLOCK, max_pages))


def _last_query(b, qi, lens, qlens, tokens):
    """The last position queried by query block qi of row b (>= 0; never past the row's cached keys)."""
    return jnp.maximum(lens[b] - qlens[b] + jnp.minimum((qi + 1) * tokens, qlens[b]) - 1, 0)


def _kernel(table_ref, len_ref, qlen_ref, q_ref, *refs, scale, page_size, pages, tokens):
    k_refs, v_refs, (qm_ref, o_ref, m_sc, l_sc, acc_sc) = refs[:pages], refs[pages:2 * pages], refs[2 * pages:]
    b, qi, p = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_keys = pages * page_size
    last_q = _last_query(b, qi, len_ref, qlen_ref, tokens)

    @pl.when(p == 0)
    def _init():
        online_softmax_init(m_sc, l_sc, acc_sc)

    @pl.when((qi * tokens < qlen_ref[b]) & (p * block_keys <= last_q))  # a query block of padding computes nothing
    def _compute():
        # Keys of this block sit at positions p * block_keys + [0, block_keys); all belong to the one sequence
        # (segment 1), and a query (segment 1, or 0 when it is chunk padding) sees keys up to its own position.
        kv_pos = p * block_keys + jax.lax.broadcasted_iota(jnp.int32, (1, block_keys), 1)
        kv_meta = jnp.concatenate([kv_pos, jnp.ones_like(kv_pos)], axis=0)
        k = k_refs[0][...] if pages == 1 else jnp.concatenate([r[...] for r in k_refs], axis=0)
        v = v_refs[0][...] if pages == 1 else jnp.concatenate([r[...] for r in v_refs], axis=0)
        s, mask = scores(q_ref[...], k, qm_ref[...], kv_meta, True, scale)
        online_softmax_step(s, mask, v, m_sc, l_sc, acc_sc)

    @pl.when(p == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = online_softmax_result(m_sc, l_sc, acc_sc)[0].astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, q_lengths=None, scale=None, interpret=False,
                    pages_per_block: int | None = None):
    """The chunked-prefill contract of reference.paged_attention_reference, as a TPU kernel; q [B, C, H, D].
    `pages_per_block`: pages per kv block (default: `default_pages_per_block`)."""
    batch, chunk, heads, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    max_pages = page_table.shape[1]
    group = heads // kv_heads
    pages = pages_per_block or default_pages_per_block(page_size, max_pages)
    # Query tokens per tile: the largest power of two whose rows fit MAX_Q_ROWS (then a multiple of 8 rows, as a
    # partial tile must be), or the whole chunk; the chunk is padded to whole tiles with padding queries.
    tokens = 1 << max(1, MAX_Q_ROWS // group).bit_length() - 1
    tokens = chunk if chunk <= tokens else tokens
    padded = -(-chunk // tokens) * tokens
    rows = tokens * group
    lengths = jnp.asarray(lengths, jnp.int32)
    q_lengths = jnp.full((batch,), chunk, jnp.int32) if q_lengths is None else jnp.asarray(q_lengths, jnp.int32)
    # Entries past a sequence's pages may be anything; clipping keeps even those reads inside the pool.
    table = jnp.clip(jnp.asarray(page_table, jnp.int32), 0, num_pages - 1).reshape(-1)
    q = jnp.pad(q, ((0, 0), (0, padded - chunk), (0, 0), (0, 0)))
    # Rows ordered (chunk, group): the row layout of one kv head's [rows, head_dim] tile.
    q_rows = q.reshape(batch, padded, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, kv_heads, padded * group, head_dim)
    q_pos = jnp.repeat(paged_query_positions(lengths, q_lengths, padded), group, axis=1)
    q_meta = jnp.stack([q_pos, (q_pos >= 0).astype(jnp.int32)], axis=-1)  # [B, padded * group, 2]

    def page_index(j):
        def index(b, h, qi, p, table, lens, qlens):
            # lax.div, not //: the index is >= 0, and floor division's sign fix-up asks for the chip's kind, which
            # an ahead-of-time compile outside a TPU mesh does not have.
            last = jnp.minimum(jax.lax.div(_last_query(b, qi, lens, qlens, tokens), page_size), max_pages - 1)
            return (h, table[b * max_pages + jnp.minimum(p * pages + j, last)], 0, 0)
        return index

    kv_specs = [pl.BlockSpec((None, None, page_size, head_dim), page_index(j)) for j in range(pages)]
    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, qi, p, *_: (b, h, qi, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(batch, kv_heads, padded // tokens, -(-max_pages // pages)),
        in_specs=[q_spec, *kv_specs, *kv_specs,
                  pl.BlockSpec((None, rows, 2), lambda b, h, qi, p, *_: (b, qi, 0))],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, head_dim), jnp.float32)])
    out = pl.pallas_call(
        functools.partial(_kernel, scale=float(head_dim ** -0.5 if scale is None else scale), page_size=page_size,
                          pages=pages, tokens=tokens),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(table, lengths, q_lengths, q_rows, *[k_pages] * pages, *[v_pages] * pages, q_meta)
    out = out.reshape(batch, kv_heads, padded, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, padded, heads, head_dim)[:, :chunk]
