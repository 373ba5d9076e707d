"""Parity with an implementation we did not write: transformers' Llama in float32 on tiny random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from internlm2_jax.config import preset
from internlm2_jax.convert import load_pretrained, save_pretrained
from internlm2_jax.model import InternLM2ForCausalLM, last_token_scores

TOL = 1e-4


@jax.jit
def run(model, *args):
    """Jitted forward: eager NNX dispatches op by op, which costs more than compiling these tiny models."""
    return model(*args)


def random_llama(tmp_path, *, heads, kv_heads, head_dim=8, layers=2, max_pos=32, rope_scaling=None, bias=False,
                 tie=False, cls=LlamaForCausalLM, seed=0, **extra):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=heads * head_dim, intermediate_size=48,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_pos, rope_theta=10000.0, rope_scaling=rope_scaling,
                         rms_norm_eps=1e-5, attention_bias=bias, tie_word_embeddings=tie, pad_token_id=2, **extra)
    model = cls(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases too, so every tensor matters
            p.normal_(0.0, 0.1) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def torch_logits(model, ids, **kw):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


def random_ids(batch, length, seed=0, vocab=128):
    return np.random.RandomState(seed).randint(3, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2), (6, 1)])  # GQA ratios 1, 2, 4, 6
def test_llama_layout_logits_match_transformers(tmp_path, heads, kv_heads):
    ref_model, path = random_llama(tmp_path, heads=heads, kv_heads=kv_heads)
    ids = random_ids(2, 24)
    ref = torch_logits(ref_model, ids)
    cfg, model = load_pretrained(path)
    assert cfg.q_per_kv == heads // kv_heads
    np.testing.assert_allclose(np.asarray(run(model, ids)), ref, atol=TOL, rtol=0)

    # Through the InternLM2 layout (fused wqkv) and back: the same logits.
    save_pretrained(model, tmp_path / "internlm2", layout="internlm2")
    _, reloaded = load_pretrained(tmp_path / "internlm2")
    np.testing.assert_allclose(np.asarray(run(reloaded, ids)), ref, atol=TOL, rtol=0)


def test_dynamic_ntk_beyond_max_positions_matches_transformers(tmp_path):
    scaling = {"type": "dynamic", "factor": 2.0}
    ref_model, path = random_llama(tmp_path, heads=4, kv_heads=2, max_pos=32, rope_scaling=scaling)
    cfg, model = load_pretrained(path)
    assert cfg.rope_scaling.type == "dynamic"
    for length in (20, 80):  # within, and 2.5x beyond max_position_embeddings
        ids = random_ids(1, length, seed=length)
        np.testing.assert_allclose(np.asarray(run(model, ids)), torch_logits(ref_model, ids), atol=TOL, rtol=0)
    # Dynamic NTK really changed something beyond 32 tokens: plain RoPE gives other logits there.
    _, plain = load_pretrained(path, rope_scaling=None)
    ids = random_ids(1, 80, seed=80)
    assert np.abs(np.asarray(run(plain, ids)) - np.asarray(run(model, ids)))[0, 40:].max() > 1e-3


def test_linear_rope_bias_and_tied_embeddings_match_transformers(tmp_path):
    ref_model, path = random_llama(tmp_path, heads=4, kv_heads=2, rope_scaling={"type": "linear", "factor": 3.0},
                                   bias=True, tie=True)
    cfg, model = load_pretrained(path)
    assert cfg.bias and cfg.tie_word_embeddings
    ids = random_ids(2, 16)
    np.testing.assert_allclose(np.asarray(run(model, ids)), torch_logits(ref_model, ids), atol=TOL, rtol=0)


def test_left_padded_batch_matches_transformers(tmp_path):
    """Left padding as HF generation does it: position_ids = cumsum(mask) - 1, padding is segment 0."""
    ref_model, path = random_llama(tmp_path, heads=4, kv_heads=2)
    _, model = load_pretrained(path)
    ids = random_ids(2, 12)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = torch_logits(ref_model, ids, attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    ours = np.asarray(run(model, ids, positions, mask))
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=TOL, rtol=0)


def test_reward_model_matches_llama_sequence_classification(tmp_path):
    ref_model, path = random_llama(tmp_path, heads=4, kv_heads=2, cls=LlamaForSequenceClassification, num_labels=1)
    cfg, model = load_pretrained(path)
    ids = random_ids(2, 10)
    ids[:, -1] = 100
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits[:, 0].numpy()  # HF reads the last non-pad token
    scores = run(model, ids)
    np.testing.assert_allclose(np.asarray(last_token_scores(scores, np.ones_like(ids))), ref, atol=TOL, rtol=0)
    # Saved in the InternLM2 layout it becomes InternLM2ForRewardModel with `v_head`, and reloads to the same scores.
    save_pretrained(model, tmp_path / "rm", layout="internlm2")
    _, again = load_pretrained(tmp_path / "rm")
    np.testing.assert_array_equal(np.asarray(run(again, ids)), np.asarray(scores))


@pytest.fixture(scope="module")
def tiny_model():
    return InternLM2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0))


def test_two_packed_documents_give_the_same_logits_as_each_alone(tiny_model):
    a, b = random_ids(1, 23, seed=1, vocab=512), random_ids(1, 50, seed=2, vocab=512)
    packed = np.concatenate([a, b, np.zeros((1, 7), np.int32)], axis=1)  # 80 > max_position_embeddings (64)
    positions = np.concatenate([np.arange(23), np.arange(50), np.zeros(7)])[None].astype(np.int32)
    segments = np.concatenate([np.full(23, 1), np.full(50, 2), np.zeros(7)])[None].astype(np.int32)
    logits = np.asarray(run(tiny_model, packed, positions, segments))
    np.testing.assert_allclose(logits[:, :23], np.asarray(run(tiny_model, a)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[:, 23:73], np.asarray(run(tiny_model, b)), atol=1e-5, rtol=0)


def test_dynamic_ntk_follows_each_packed_documents_own_length(tiny_model):
    """A 70-token document (beyond max_position_embeddings=64) packed with a short one keeps both exact."""
    a, b = random_ids(1, 70, seed=3, vocab=512), random_ids(1, 10, seed=4, vocab=512)
    packed = np.concatenate([b, a], axis=1)
    positions = np.concatenate([np.arange(10), np.arange(70)])[None].astype(np.int32)
    segments = np.concatenate([np.full(10, 1), np.full(70, 2)])[None].astype(np.int32)
    logits = np.asarray(run(tiny_model, packed, positions, segments))
    np.testing.assert_allclose(logits[:, :10], np.asarray(run(tiny_model, b)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[:, 10:], np.asarray(run(tiny_model, a)), atol=1e-5, rtol=0)


def test_scan_and_remat_variants_compute_the_same_function_and_gradients(tiny_model, tmp_path):
    ids = random_ids(2, 20, vocab=512)
    save_pretrained(tiny_model, tmp_path)

    def loss_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            return jnp.mean(nnx.merge(graphdef, params)(ids) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return value, jax.tree.map(np.asarray, grads)

    ref_loss, ref_grads = loss_and_grads(tiny_model)
    ref_wqkv = ref_grads["model"]["layers"][1]["attention"]["wqkv"]
    for scan, remat in [(False, "full"), (True, "none"), (True, "full"), (True, "dots")]:
        _, variant = load_pretrained(tmp_path, scan_layers=scan, remat=remat)
        value, grads = loss_and_grads(variant)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
        layers = grads["model"]["layers"]
        wqkv = layers["attention"]["wqkv"][1] if scan else layers[1]["attention"]["wqkv"]
        np.testing.assert_allclose(wqkv, ref_wqkv, rtol=1e-4, atol=1e-7)


def test_token_logprobs_in_chunks_equal_log_softmax_of_full_logits(tiny_model):
    ids = random_ids(2, 37, vocab=512)
    targets = np.roll(ids, -1, axis=1)
    full = jax.nn.log_softmax(run(tiny_model, ids), axis=-1)
    expected = np.take_along_axis(np.asarray(full), targets[..., None], axis=-1)[..., 0]
    hidden = tiny_model(ids, return_hidden=True)
    for chunk in (8, 37, 1024):  # uneven, exact and larger than the sequence
        np.testing.assert_allclose(np.asarray(tiny_model.token_logprobs(hidden, targets, chunk_size=chunk)),
                                   expected, atol=1e-5, rtol=0)


def test_token_logprobs_gradient_matches_the_full_logits_gradient(tiny_model):
    ids = random_ids(1, 16, vocab=512)
    head = tiny_model.head_weight()
    hidden = tiny_model(ids, return_hidden=True)
    targets = jnp.asarray(np.roll(ids, -1, axis=1))

    def chunked(h):
        return tiny_model.token_logprobs(h, targets, chunk_size=5).sum()

    def full(h):
        logp = jax.nn.log_softmax(jnp.einsum("bte,ev->btv", h, head), axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1).sum()

    np.testing.assert_allclose(np.asarray(jax.grad(chunked)(hidden)), np.asarray(jax.grad(full)(hidden)),
                               atol=1e-5, rtol=0)


def test_bf16_compute_stays_close_to_fp32(tiny_model):
    ids = random_ids(2, 16, vocab=512)
    ref = np.asarray(run(tiny_model, ids))
    bf16 = InternLM2ForCausalLM(preset("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0))
    out = np.asarray(run(bf16, ids))
    assert out.dtype == np.float32  # logits are always fp32
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9
