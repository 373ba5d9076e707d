"""Random attention problems for the kernel tests: packed segments, padding, GQA, lengths off the block grid."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.kernels.reference import xla_attention
from internlm2_jax.model import InternLM2ForCausalLM


def packed_case(seed, *, heads, kv_heads, q_len=40, head_dim=16, batch=2, dtype=jnp.float32, kv_len=None):
    """Row 0 packs two documents (the second starting mid-block) and ends in padding; row 1 is one document.

    With kv_len > q_len the queries are the last q_len tokens of each key row (prefill continuing a cache), so query
    and key positions differ.
    """
    rng = np.random.default_rng(seed)
    kv_len = kv_len or q_len
    first, pad = 13, 7
    kv_seg = np.stack([np.r_[np.ones(first), np.full(kv_len - first - pad, 2), np.zeros(pad)], np.ones(kv_len)])
    kv_pos = np.stack([np.r_[np.arange(first), np.arange(kv_len - first - pad), np.zeros(pad)], np.arange(kv_len)])
    kv_seg, kv_pos = kv_seg[:batch].astype(np.int32), kv_pos[:batch].astype(np.int32)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    return dict(q=normal(batch, q_len, heads, head_dim), k=normal(batch, kv_len, kv_heads, head_dim),
                v=normal(batch, kv_len, kv_heads, head_dim), cotangent=normal(batch, q_len, heads, head_dim),
                q_positions=kv_pos[:, -q_len:], kv_positions=kv_pos, q_segment_ids=kv_seg[:, -q_len:],
                kv_segment_ids=kv_seg)


def value_and_grads(fn, case, causal):
    """Output and (dq, dk, dv) of sum(fn(...) * cotangent), with fresh random cotangents."""
    masks = {k: case[k] for k in ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")}

    def loss(q, k, v):
        out = fn(q, k, v, causal=causal, **masks)
        return jnp.sum(out.astype(jnp.float32) * case["cotangent"].astype(jnp.float32)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(case["q"], case["k"], case["v"])
    return out, grads


def assert_matches_reference(fn, case, causal):
    """Forward and all three gradients against xla_attention evaluated in float32 on the same (rounded) inputs."""
    low_precision = case["q"].dtype == jnp.bfloat16
    f32 = {k: (v.astype(jnp.float32) if k in ("q", "k", "v") else v) for k, v in case.items()}
    want = value_and_grads(xla_attention, f32, causal)
    got = value_and_grads(fn, case, causal)
    tol = 3e-2 if low_precision else 2e-5
    for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), name
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol, err_msg=name)
    pad = np.asarray(case["q_segment_ids"]) == 0
    assert np.all(np.asarray(got[0], np.float32)[pad] == 0), "padding queries must give zeros"


def tiny_model_loss_and_grads(impl, ids, positions, segments, **overrides):
    """Next-token loss of the tiny model (fixed seed) on packed rows, and its parameter gradients."""
    model = InternLM2ForCausalLM(preset("tiny", attention_impl=impl, **overrides), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids[:, :-1], positions[:, :-1], segments[:, :-1])
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 1:])
        weights = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
        return jnp.sum(per_token * weights) / weights.sum()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.tree.map(lambda g: np.asarray(g, np.float32), grads)
