"""Weight-only int8 decoding: per-channel quantization error bounds, logits and perplexity close to fp32, cached
generation, loading with `quantize="int8"`, and quantizing a copy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model_parity import random_llama

from internlm2_jax.config import preset
from internlm2_jax.convert import load_pretrained
from internlm2_jax.decode import generate_ids
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.quantize import Int8Weight, quantize_int8, quantize_weight, weight_bytes
from internlm2_jax.train.loss import next_token_loss


def test_per_channel_quantization_error_is_half_a_step():
    w = jax.random.normal(jax.random.key(0), (3, 16, 4, 8)) * jnp.arange(1, 9)  # channels of different ranges
    q = quantize_weight(w, contracted=1, leading=1)
    assert q.values.dtype == jnp.int8 and q.scale.shape == (3, 1, 4, 8)
    error = jnp.abs(q.dequantize() - w)
    assert bool((error <= q.scale / 2 + 1e-6).all())
    assert float(jnp.abs(q.values).max()) == 127


@pytest.mark.parametrize("scan", [True, False])
def test_int8_logits_and_perplexity_stay_close_to_fp32(tmp_path, scan):
    _, path = random_llama(tmp_path, heads=4, kv_heads=2, layers=2)
    _, model = load_pretrained(path, scan_layers=scan)
    _, int8 = load_pretrained(path, scan_layers=scan, quantize="int8")
    assert isinstance(int8.model.tok_embeddings.get_value(), jax.Array)  # the embedding (a gather) stays float
    assert weight_bytes(int8) < 0.45 * weight_bytes(model)
    ids = np.random.RandomState(0).randint(3, 128, (4, 24)).astype(np.int32)
    forward = jax.jit(lambda m, x: m(x))
    full, quant = np.asarray(forward(model, ids)), np.asarray(forward(int8, ids))
    assert np.abs(quant - full).max() < 0.05 * np.abs(full).max()
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "positions": np.broadcast_to(np.arange(24), ids.shape),
             "segment_ids": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}
    loss = jax.jit(lambda m, b: next_token_loss(m, b, chunk_size=8))
    (fp_sum, n), (q_sum, _) = loss(model, batch), loss(int8, batch)
    assert abs(float(jnp.exp(q_sum / n)) / float(jnp.exp(fp_sum / n)) - 1) < 0.01
    fp_tokens = [c.tokens for c in generate_ids(model, ids[:, :8].tolist(), max_new_tokens=8)]
    q_tokens = [c.tokens for c in generate_ids(int8, ids[:, :8].tolist(), max_new_tokens=8)]
    assert sum(a[0] == b[0] for a, b in zip(fp_tokens, q_tokens, strict=True)) >= 3


def test_quantize_copies_and_bad_modes(tmp_path):
    original = InternLM2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(original)
    shared = nnx.merge(graphdef, state)  # shares its Variables with `original`
    model = quantize_int8(shared)
    _, params = nnx.split(model)
    assert any(isinstance(v, Int8Weight) for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight)))
    assert weight_bytes(original) == weight_bytes(shared) > 2 * weight_bytes(model)  # neither was touched
    _, path = random_llama(tmp_path, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_pretrained(path, quantize="int3")
