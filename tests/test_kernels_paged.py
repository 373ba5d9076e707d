"""Paged-cache decode and chunked-prefill kernels (TPU and GPU, interpret mode) against the gathered reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.kernels.reference import paged_attention_reference
from internlm2_jax.model.attention import chunked_prefill_attention, decode_attention


def paged_case(seed, *, heads=6, kv_heads=2, chunk=3, page_size=16, max_pages=5, dtype=jnp.float32):
    """Three sequences of different lengths over shuffled pages; the last page of each is partly stale."""
    rng = np.random.default_rng(seed)
    batch, head_dim, pool = 3, 16, 20
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    return dict(
        q=normal(batch, chunk, heads, head_dim),
        k_pages=normal(kv_heads, pool, page_size, head_dim), v_pages=normal(kv_heads, pool, page_size, head_dim),
        page_table=jnp.asarray(rng.permutation(pool)[:batch * max_pages].reshape(batch, max_pages), jnp.int32),
        lengths=jnp.asarray([chunk + 2, 2 * page_size + 5, max_pages * page_size], jnp.int32))


def _check(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=tol)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4)])
def test_chunked_prefill_with_ragged_chunks_matches_reference(impl, heads, kv_heads):
    c = paged_case(heads, heads=heads, kv_heads=kv_heads)
    q_lengths = jnp.asarray([1, 3, 2], jnp.int32)  # right-padded chunks; padded queries give zeros
    args = (c["q"], c["k_pages"], c["v_pages"], c["page_table"], c["lengths"])
    got = chunked_prefill_attention(*args, q_lengths=q_lengths, impl=impl)
    want = paged_attention_reference(*args, q_lengths=q_lengths)
    _check(got, want, 2e-5)
    assert np.all(np.asarray(got)[0, 1:] == 0)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_decode_bf16_matches_reference(impl):
    c = paged_case(1, chunk=1, dtype=jnp.bfloat16)
    args = (c["q"][:, 0], c["k_pages"], c["v_pages"], c["page_table"], c["lengths"])
    want = decode_attention(*args, impl="xla")
    f32 = (args[0].astype(jnp.float32), *(a.astype(jnp.float32) for a in args[1:3]), *args[3:])
    _check(decode_attention(*args, impl=impl), decode_attention(*f32, impl="xla"), 3e-2)
    assert want.shape == args[0].shape


def test_decode_reference_is_the_last_row_of_full_attention():
    """The paged reference agrees with plain causal attention over the gathered sequence (an independent check)."""
    c = paged_case(2, chunk=1)
    b, length = 1, int(c["lengths"][1])
    keys = c["k_pages"][:, c["page_table"][b]].reshape(2, -1, 16)[:, :length]
    vals = c["v_pages"][:, c["page_table"][b]].reshape(2, -1, 16)[:, :length]
    q = np.asarray(c["q"][b, 0]).reshape(2, 3, 16)
    s = np.einsum("kgd,ksd->kgs", q, np.asarray(keys)) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("kgs,ksd->kgd", p / p.sum(-1, keepdims=True), np.asarray(vals)).reshape(6, 16)
    got = decode_attention(c["q"][:, 0], c["k_pages"], c["v_pages"], c["page_table"], c["lengths"], impl="xla")
    np.testing.assert_allclose(np.asarray(got[b]), want, atol=1e-5)


def test_reference_row_widths_gather_only_the_pages_rows_hold():
    """Rows sorted longest first, in groups of stepped-down widths, give what the whole page table gives; a width
    under a group's need drops keys (so the groups really read only their first pages)."""
    rng = np.random.default_rng(4)
    batch, kv_heads, heads, page_size, pool, width = 8, 2, 4, 4, 70, 8
    k_pages = jnp.asarray(rng.standard_normal((kv_heads, pool, page_size, 16)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((kv_heads, pool, page_size, 16)), jnp.float32)
    lengths = jnp.asarray([31, 29, 20, 17, 8, 7, 3, 0], jnp.int32)  # the last row is padding
    table = jnp.asarray(rng.permutation(np.arange(1, pool))[:batch * width].reshape(batch, width), jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, 2, heads, 16)), jnp.float32)
    args = (q, k_pages, v_pages, table, lengths)
    q_lengths = jnp.asarray([2, 2, 1, 2, 2, 1, 2, 0], jnp.int32)
    want = paged_attention_reference(*args, q_lengths=q_lengths)
    got = chunked_prefill_attention(*args, q_lengths=q_lengths, impl="xla", row_widths=(8, 5, 2, 1))
    _check(got, want, 1e-6)
    short = paged_attention_reference(*args, q_lengths=q_lengths, row_widths=(8, 5, 1, 1))
    assert not np.allclose(short[4:6], want[4:6], atol=1e-3) and np.allclose(short[:4], want[:4], atol=1e-6)
    with pytest.raises(ValueError, match="3 equal groups"):
        paged_attention_reference(*args, row_widths=(8, 4, 2))


def test_paged_errors_name_the_constraint():
    c = paged_case(3, page_size=8)
    with pytest.raises(ValueError, match="page_size to be a power of two >= 16"):
        chunked_prefill_attention(c["q"], c["k_pages"], c["v_pages"], c["page_table"], c["lengths"],
                                  impl="pallas_gpu")
    with pytest.raises(ValueError, match="first dimension"):
        chunked_prefill_attention(c["q"], c["k_pages"], c["v_pages"], c["page_table"][:2], c["lengths"])


@pytest.mark.parametrize("pages_per_block, max_q_rows", [(2, 8), (1, 512)])
def test_tpu_kernel_blocks_of_pages_and_of_queries_match_reference(monkeypatch, pages_per_block, max_q_rows):
    """Several pages per kv block (5 pages in blocks of 2: the last block half past the table, its extra page the
    repeated last one) and a chunk cut into query blocks (3 queries x 3 heads per kv head in tiles of 2 queries:
    the chunk is padded to 4), with rows whose query blocks are all padding."""
    from internlm2_jax.kernels import paged_tpu

    monkeypatch.setattr(paged_tpu, "MAX_Q_ROWS", max_q_rows)
    c = paged_case(7)
    q_lengths = jnp.asarray([1, 3, 2], jnp.int32)
    args = (c["q"], c["k_pages"], c["v_pages"], c["page_table"], c["lengths"])
    got = paged_tpu.paged_attention(*args, q_lengths=q_lengths, interpret=True, pages_per_block=pages_per_block)
    _check(got, paged_attention_reference(*args, q_lengths=q_lengths), 2e-5)
    assert np.all(np.asarray(got)[0, 1:] == 0)
