"""The plain-XLA attention that every kernel is checked against.

Grouped-query attention without materialising repeated K/V: queries are viewed as [kv_heads, q_per_kv] so each KV
head is read once. Masking is by positions and segment ids rather than array indices, which is what lets packed
documents (positions restart at 0, one segment id each) and cached decoding share one definition.
"""

import functools

import jax
import jax.numpy as jnp

from internlm2_jax.kernels.platform import compiling_for_cpu

_MASKED = -1e30  # finite, so a fully masked row gives zeros instead of NaNs


def attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal: bool,
                   shared_segment: int | None = None):
    """[batch, q_len, kv_len] boolean: same non-padding segment and, if causal, key position <= query position.
    Keys of `shared_segment` are also seen by the queries of every other non-padding segment: a tree mask, where
    segments 2, 3, ... branch off a shared prefix (segment 1) without seeing each other."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if shared_segment is not None:
        same |= kv_segment_ids[:, None, :] == shared_segment
    mask = same & (q_segment_ids[:, :, None] != 0)
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


def xla_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, scale=None,
                  shared_segment: int | None = None):
    """q [B, T, H, D]; k, v [B, S, KV, D]; returns [B, T, H, D] in q's dtype. Softmax in fp32. `shared_segment`:
    see `attention_mask`."""
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal, shared_segment)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if not causal or q.shape[1] <= _query_block(q.shape[1]) or not compiling_for_cpu():
        return dense_attention(scale, q, kt, vt, mask)
    return _causal_attention(scale, q, kt, vt, mask)  # a speed path for XLA:CPU only


def _query_block(q_len: int) -> int:
    return max(64, q_len // 8)


def _by_query_blocks(scale, q, kt, vt, mask):
    """Query block [a, b) reads keys [0, b) only: about (n + 1) / 2n of the dense work for n blocks. Exact only when
    no query attends a key at a later index."""
    q_len, block = q.shape[1], _query_block(q.shape[1])
    out = [dense_attention(scale, q[:, a:a + block], kt[:, :, :a + block], vt[:, :, :a + block],
                            mask[:, a:a + block, :a + block]) for a in range(0, q_len, block)]
    return jnp.concatenate(out, axis=1)


def _attends_later_keys(mask):
    return jnp.any(mask & (jnp.arange(mask.shape[2])[None, :] > jnp.arange(mask.shape[1])[:, None]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _causal_attention(scale, q, kt, vt, mask):
    """Causal attention that skips the keys after each query block whenever that is exact: when positions increase
    along each segment (packed and padded rows, a cache's first write), checked at run time, so any other input
    still gets the dense attention. Chosen on CPU only, where it was measured (benchmarks/RESULTS.md, eval
    section). The backward recomputes the forward under the same choice: differentiating through lax.cond kept the
    residuals of both branches and was no faster than the dense backward."""
    return jax.lax.cond(_attends_later_keys(mask), dense_attention, _by_query_blocks, scale, q, kt, vt, mask)


def _causal_attention_fwd(scale, q, kt, vt, mask):
    return _causal_attention(scale, q, kt, vt, mask), (q, kt, vt, mask)


def _causal_attention_bwd(scale, residuals, g):
    q, kt, vt, mask = residuals

    def backward(attend):
        return lambda q, kt, vt: jax.vjp(lambda q, kt, vt: attend(scale, q, kt, vt, mask), q, kt, vt)[1](g)

    grads = jax.lax.cond(_attends_later_keys(mask), backward(dense_attention), backward(_by_query_blocks), q, kt, vt)
    return (*grads, None)


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def dense_attention(scale, q, kt, vt, mask):
    """q [B, T, H, D]; kt, vt [B, KV, S, D] (head-major); mask [B, T, S] boolean."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = kt.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    # Head-major operands ([batch, kv_heads, group, seq, head_dim]) make both matmuls plain batched GEMMs; the
    # sequence-major einsum ran several times slower on XLA:CPU (benchmarks/RESULTS.md, forward_throughput).
    qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, kt, preferred_element_type=jnp.float32) * scale
    mask = mask[:, None, None]
    # Masking by adding 0 or _MASKED gives the same scores as jnp.where(mask, scores, _MASKED) (finite scores are
    # far below _MASKED's ulp), but its backward is the identity instead of a select: under jnp.where the mask was
    # recomputed inside the fusion that transposes the fp32 score gradient for dK, and that strided fusion was the
    # slowest op of the attention backward on XLA:CPU (benchmarks/RESULTS.md, train_throughput; same bits). The
    # gradient at masked keys is zero either way: their probabilities are exactly 0.
    scores = scores + jnp.where(mask, 0.0, _MASKED)
    # The softmax is normalised after the PV matmul, as flash attention does ([T, D] divisions instead of [T, S]):
    # one pass less over the scores (benchmarks/RESULTS.md, eval_throughput). Masked keys get exactly 0 (exp of
    # about -1e30); a fully masked query row (padding) would average V, so it is zeroed.
    unnormalised = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bkgts,bksd->bkgtd", unnormalised.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    out = jnp.where(mask.any(axis=-1)[..., None], out / unnormalised.sum(axis=-1, keepdims=True), 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def paged_query_positions(lengths, q_lengths, chunk: int):
    """[batch, chunk] positions of a chunk's queries: the last q_lengths[b] tokens of a sequence of lengths[b]
    tokens, right-padded to `chunk`; padded queries get -1, which no key position satisfies."""
    offsets = jnp.arange(chunk, dtype=jnp.int32)[None, :]
    positions = lengths[:, None] - q_lengths[:, None] + offsets
    return jnp.where(offsets < q_lengths[:, None], positions, -1).astype(jnp.int32)


def paged_attention_reference(q, k_pages, v_pages, page_table, lengths, *, q_lengths=None, scale=None,
                              row_widths: tuple[int, ...] | None = None):
    """Attention of a chunk of queries over the paged KV cache, by gathering the pages: xla_attention's math.

    q [batch, chunk, heads, head_dim]; k_pages, v_pages [kv_heads, num_pages, page_size, head_dim] (or quantized
    pages, dequantized after the gather: `_gather_pages`); page_table [batch, max_pages] int32; lengths [batch] int32
    tokens in the cache (the chunk's own keys included); q_lengths [batch] int32 valid queries per row (default: the
    whole chunk). Query i of row b sits at position lengths[b] - q_lengths[b] + i and attends causally to cache
    positions up to its own.

    `row_widths` (static) splits the rows into len(row_widths) equal groups of consecutive rows, group g gathering
    only the first row_widths[g] pages of its rows' page tables: a caller that sorts a ragged batch by length reads
    about the pages its rows hold instead of rows x the longest row's. Each group's rows must fit their width (the
    pages left out must hold no key of the row); XLA cannot check that without reading them.
    """
    batch = q.shape[0]
    q_lengths = jnp.full((batch,), q.shape[1], jnp.int32) if q_lengths is None else jnp.asarray(q_lengths, jnp.int32)
    args = (q, page_table, jnp.asarray(lengths, jnp.int32), q_lengths)
    if row_widths is None:
        return _gathered_attention(scale, k_pages, v_pages, *args)
    if batch % len(row_widths) or max(row_widths) > page_table.shape[1]:
        raise ValueError(f"row_widths {row_widths}: the batch ({batch} rows) must split into {len(row_widths)} equal "
                         f"groups, each at most the page table's width ({page_table.shape[1]})")
    group = batch // len(row_widths)
    return jnp.concatenate([_gathered_attention(scale, k_pages, v_pages, *(x[g * group:(g + 1) * group] for x in args),
                                                width=width) for g, width in enumerate(row_widths)])


def _gathered_attention(scale, k_pages, v_pages, q, page_table, lengths, q_lengths, width=None):
    batch, chunk = q.shape[:2]
    kv_heads = k_pages.shape[0]
    page_table = page_table[:, :width]
    # Gathered head by head and stacked into head-major [batch, kv_heads, seq, head_dim]. A gather of all heads
    # then transposed (whether to xla_attention's [batch, seq, kv_heads, head_dim] or to head-major) left XLA:CPU
    # running the score matmul on a strided operand, much slower (benchmarks/RESULTS.md, serving).
    kt, vt = (_gather_pages(pages, page_table, kv_heads, q.dtype) for pages in (k_pages, v_pages))
    kv_positions = jnp.broadcast_to(jnp.arange(kt.shape[2], dtype=jnp.int32), (batch, kt.shape[2]))
    q_positions = paged_query_positions(lengths, q_lengths, chunk)
    mask = attention_mask(q_positions, kv_positions, (q_positions >= 0).astype(jnp.int32),
                          (kv_positions < lengths[:, None]).astype(jnp.int32), causal=True)
    return dense_attention(scale, q, kt, vt, mask)


def _gather_pages(pages, page_table, kv_heads: int, dtype):
    """[batch, kv_heads, width * page_size, head_dim]: each row's pages, head by head. Quantized pages (a pytree of
    [kv_heads, num_pages, page_size, ...] leaves whose `astype` dequantizes, model/kv_quant.QuantizedKV) are
    gathered as codes and scales, then dequantized to `dtype`: only the rows' pages, never the whole cache."""
    batch = page_table.shape[0]

    def head(h):
        rows = jax.tree.map(lambda leaf: leaf[h][page_table].reshape(batch, -1, leaf.shape[-1]), pages)
        return rows if isinstance(rows, jax.Array) else rows.astype(dtype)

    return jnp.stack([head(h) for h in range(kv_heads)], axis=1)
