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


def test_paged_errors_name_the_constraint():
    c = paged_case(3, page_size=8)
    with pytest.raises(ValueError, match="page_size to be a power of two >= 16"):
        chunked_prefill_attention(c["q"], c["k_pages"], c["v_pages"], c["page_table"], c["lengths"],
                                  impl="pallas_gpu")
    with pytest.raises(ValueError, match="first dimension"):
        chunked_prefill_attention(c["q"], c["k_pages"], c["v_pages"], c["page_table"][:2], c["lengths"])
