"""The attention entry point against a naive repeat-KV implementation written independently from the kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.kernels.reference import dense_attention, attention_mask
from internlm2_jax.model import attention


def naive_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Repeats each KV head q_per_kv times (HF repeat_kv) and loops over the batch with an explicit mask."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    out = np.zeros(q.shape, np.float64)
    for b in range(q.shape[0]):
        s = np.einsum("thd,shd->hts", q[b], k[b]) / np.sqrt(q.shape[-1])
        allowed = (q_seg[b][:, None] == kv_seg[b][None, :]) & (kv_pos[b][None, :] <= q_pos[b][:, None])
        allowed &= q_seg[b][:, None] != 0
        s = np.where(allowed[None], s, -np.inf)
        row_max = np.max(s, axis=-1, keepdims=True)
        p = np.where(allowed[None], np.exp(s - np.where(np.isfinite(row_max), row_max, 0)), 0)
        p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
        out[b] = np.einsum("hts,shd->thd", p, v[b])
    return out


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_grouped_attention_with_packing_and_padding_matches_naive(heads, kv_heads):
    rng = np.random.RandomState(heads)
    b, t, d = 2, 12, 8
    q = rng.randn(b, t, heads, d).astype(np.float32)
    k, v = (rng.randn(b, t, kv_heads, d).astype(np.float32) for _ in range(2))
    seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
    pos = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(12))])
    out = attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, pos, pos, seg, seg), atol=1e-5)
    assert np.all(np.asarray(out)[0, 9:] == 0)  # padding attends to nothing and yields zeros, not NaN


def test_tree_mask_branches_see_the_shared_prefix_and_themselves_only():
    rng = np.random.RandomState(0)
    heads, kv_heads, d = 4, 2, 8
    # One row: a 5-token prefix (segment 1), then branches of 3 and 2 tokens (segments 2 and 3) that both continue
    # it at positions 5.., then padding.
    seg = np.array([[1] * 5 + [2] * 3 + [3] * 2 + [0] * 2])
    pos = np.array([list(range(5)) + [5, 6, 7] + [5, 6] + [0, 0]])
    q = rng.randn(1, 12, heads, d).astype(np.float32)
    k, v = (rng.randn(1, 12, kv_heads, d).astype(np.float32) for _ in range(2))
    out = np.asarray(attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                               impl="xla", shared_segment=1))
    for branch in (range(5, 8), range(8, 10)):  # each branch as its own sequence: the prefix, then the branch
        keep = [*range(5), *branch]
        alone = naive_attention(q[:, keep], k[:, keep], v[:, keep], pos[:, keep], pos[:, keep], np.ones((1, len(keep))),
                                np.ones((1, len(keep))))
        np.testing.assert_allclose(out[:, keep], alone, atol=1e-5)
    assert np.all(out[0, 10:] == 0)
    with pytest.raises(ValueError, match="shared_segment"):
        attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                  impl="pallas_gpu", shared_segment=1)


@pytest.mark.parametrize("order", ["increasing", "reversed"])
def test_long_rows_match_naive_whether_or_not_query_blocks_can_skip_later_keys(order):
    # Over 64 tokens the XLA reference skips the keys after each query block when positions increase along each
    # segment, and falls back to dense attention when they do not (reversed rows): both must be exact, gradients too.
    rng = np.random.RandomState(3)
    b, t, heads, kv_heads, d = 2, 150, 4, 2, 8
    seg = np.array([[1] * 90 + [2] * 50 + [0] * 10, [1] * 150])
    pos = np.array([list(range(90)) + list(range(50)) + [0] * 10, list(range(150))])
    if order == "reversed":
        seg, pos = seg[:, ::-1].copy(), pos[:, ::-1].copy()
    q = rng.randn(b, t, heads, d).astype(np.float32)
    k, v = (rng.randn(b, t, kv_heads, d).astype(np.float32) for _ in range(2))
    run = lambda q, k, v, impl="xla": attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                                kv_segment_ids=seg, impl=impl)
    np.testing.assert_allclose(np.asarray(jax.jit(run)(q, k, v)), naive_attention(q, k, v, pos, pos, seg, seg),
                               atol=1e-5)
    cotangent = rng.randn(b, t, heads, d).astype(np.float32)
    grads = jax.jit(jax.grad(lambda *x: jnp.sum(run(*x) * cotangent), argnums=(0, 1, 2)))(q, k, v)
    mask = attention_mask(pos, pos, seg, seg, causal=True)
    dense = lambda q, k, v: dense_attention(None, q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    want = jax.jit(jax.grad(lambda *x: jnp.sum(dense(*x) * cotangent), argnums=(0, 1, 2)))(q, k, v)
    for got, expected in zip(grads, want, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_gradients_are_finite_with_padding_rows():
    q = jnp.ones((1, 4, 2, 8))
    k = v = jnp.ones((1, 4, 1, 8))
    seg = jnp.array([[1, 1, 0, 0]])
    pos = jnp.array([[0, 1, 0, 0]])

    def loss(q):
        return attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg).sum()

    assert np.all(np.isfinite(np.asarray(jax.grad(loss)(q))))


def test_unknown_impl_and_bad_head_counts_are_clear_errors():
    x = jnp.ones((1, 2, 2, 4))
    ids = jnp.ones((1, 2), jnp.int32)
    kw = dict(q_positions=ids, kv_positions=ids, q_segment_ids=ids, kv_segment_ids=ids)
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(x, x, x, impl="cuda", **kw)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(x, jnp.ones((1, 2, 3, 4)), jnp.ones((1, 2, 3, 4)), **kw)


def test_pallas_kernels_run_per_shard_under_a_mesh():
    """Mosaic/Triton kernels cannot be partitioned by XLA: under `jax.set_mesh` the entry point shard_maps them."""
    from internlm2_jax.parallel import MeshConfig, make_mesh

    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(4, 32, 4, 16), jnp.float32)
    k, v = (jnp.asarray(rng.randn(4, 32, 2, 16), jnp.float32) for _ in range(2))
    pos = jnp.broadcast_to(jnp.arange(32), (4, 32))
    seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 4, axis=0))
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    ref = attention(q, k, v, impl="xla", **kw)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        out = jax.jit(lambda q, k, v: attention(q, k, v, impl="pallas_gpu", **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
