"""RL rollouts (decode/rollout.py, docs rlhf §3.4): the tempered log-probs a rollout reports are those training
recomputes for the same tokens, stops pad the rest of the row, rollouts are a pure function of (params, prompts,
seed, iteration) row by row, they follow the parameters they are given, and a mesh changes nothing. Tiny fp32 model,
logits within 1e-4 as for cached decoding against recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.decode.rollout import PAD_ID, RolloutConfig, rollout, rollout_keys
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.kv_heads import shard_for_decoding
from internlm2_jax.parallel import inference_mesh

LENGTHS = [7, 2, 5, 8]  # ragged prompts, right-padded to 8
NEW = 8
SAMPLED = RolloutConfig(max_new_tokens=NEW, temperature=1.0, top_p=0.9, stop_ids=())  # shared: compiled once


@pytest.fixture(scope="module")
def model():
    cfg = preset("tiny", max_position_embeddings=256, initializer_range=0.1)  # 4 heads over 2 kv heads
    return InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(3))


def make_prompts(lengths, salt=0):
    prompts = np.zeros((len(lengths), max(lengths)), np.int32)
    for row, n in enumerate(lengths):
        prompts[row, :n] = (np.arange(n) * 37 + row * 11 + salt * 101) % 500 + 3
    return prompts, np.asarray(lengths, np.int32)


def run(model, cfg, prompts, lengths, keys=None):
    graphdef, params = nnx.split(model)
    keys = rollout_keys(0, 0, len(lengths) * cfg.samples_per_prompt) if keys is None else keys
    return jax.device_get(rollout(graphdef, params, prompts, lengths, keys, cfg=cfg))


def recomputed(model, prompts, lengths, out, temperature):
    """Training's log-probs of the rollout's responses: the rows prompt ⊕ response (right-padded), targets shifted
    left, `token_logprobs(temperature=)`, read at the response's target positions -> [rows, max_new] (0 after)."""
    rows, new = out.tokens.shape
    group = rows // len(lengths)
    prompts, lengths = np.repeat(prompts, group, axis=0), np.repeat(lengths, group)
    ids, segments = np.zeros((rows, prompts.shape[1] + new), np.int32), np.zeros((rows, prompts.shape[1] + new))
    for row in range(rows):
        p, n = lengths[row], out.lengths[row]
        ids[row, :p], ids[row, p:p + n], segments[row, :p + n] = prompts[row, :p], out.tokens[row, :n], 1
    targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    hidden = model(jnp.asarray(ids), None, jnp.asarray(segments, jnp.int32), return_hidden=True)
    logp = np.asarray(model.token_logprobs(hidden, jnp.asarray(targets), chunk_size=8, temperature=temperature))
    aligned = np.stack([logp[row, lengths[row] - 1: lengths[row] - 1 + new] for row in range(rows)])
    return aligned * out.response_mask


@pytest.mark.parametrize("temperature, group", [(1.0, 1), (0.7, 2)])
def test_rollout_logprobs_are_what_training_recomputes(model, temperature, group):
    cfg = RolloutConfig(max_new_tokens=NEW, temperature=temperature, top_p=0.9, samples_per_prompt=group,
                        stop_ids=())
    prompts, lengths = make_prompts(LENGTHS)
    out = run(model, cfg, prompts, lengths)
    assert out.tokens.shape == out.logprobs.shape == (len(LENGTHS) * group, NEW)
    assert (out.lengths == NEW).all() and not out.stopped.any()
    np.testing.assert_allclose(out.logprobs, recomputed(model, prompts, lengths, out, temperature), atol=1e-4, rtol=0)
    if temperature != 1:  # the temperature is applied, not just accepted
        assert np.abs(out.logprobs - recomputed(model, prompts, lengths, out, 1.0)).max() > 1e-2
    if group > 1:  # each prompt's samples draw with their own keys
        assert (out.tokens[0::2] != out.tokens[1::2]).any(axis=1).all()


def test_stop_ids_end_rows_and_pad_the_rest(model):
    prompts, lengths = make_prompts(LENGTHS)
    free = run(model, SAMPLED, prompts, lengths)
    # A stop id the first row samples at step `at` (not before), absent from some other row: same keys, so the rows
    # replay `free` up to their stop.
    at = next(i for i in range(1, NEW - 1) if free.tokens[0, i] not in free.tokens[0, :i])
    stop = int(free.tokens[0, at])
    never = next(row for row in range(1, len(LENGTHS)) if stop not in free.tokens[row])
    out = run(model, RolloutConfig(max_new_tokens=NEW, temperature=1.0, top_p=0.9, stop_ids=(stop, 1)),
              prompts, lengths)

    assert out.tokens.shape == (len(LENGTHS), NEW) and (out.lengths <= NEW).all()
    assert out.lengths[0] == at + 1 and out.stopped[0]
    np.testing.assert_array_equal(out.tokens[0, :at + 1], free.tokens[0, :at + 1])
    assert (out.tokens[0, at + 1:] == PAD_ID).all() and (out.logprobs[0, at + 1:] == 0).all()
    np.testing.assert_array_equal(out.response_mask[0], [1] * (at + 1) + [0] * (NEW - at - 1))
    assert out.lengths[never] == NEW and not out.stopped[never] and out.response_mask[never].all()
    np.testing.assert_array_equal(out.tokens[never], free.tokens[never])
    for row in range(len(LENGTHS)):  # every row ends on a stop id or at max_new_tokens, never both unmarked
        last = out.tokens[row, out.lengths[row] - 1]
        assert out.stopped[row] == (last in (stop, 1))
        assert out.stopped[row] or out.lengths[row] == NEW


def test_rollouts_are_a_pure_function_of_seed_iteration_and_row(model):
    np.testing.assert_array_equal(rollout_keys(5, 2, 8)[:3], rollout_keys(5, 2, 3))  # a row's key ignores n
    prompts, lengths = make_prompts(LENGTHS)
    first = run(model, SAMPLED, prompts, lengths, rollout_keys(5, 2, 4))
    again = run(model, SAMPLED, prompts, lengths, rollout_keys(5, 2, 4))
    np.testing.assert_array_equal(again.tokens, first.tokens)
    np.testing.assert_array_equal(again.logprobs, first.logprobs)
    later = run(model, SAMPLED, prompts, lengths, rollout_keys(5, 3, 4))
    assert (later.tokens != first.tokens).any(axis=1).all()  # another iteration draws anew

    # Other rows' prompts, lengths and keys change; row 0 keeps its prompt and key, hence its tokens.
    others, other_lengths = make_prompts([7, 6, 1, 3], salt=1)
    others[0], other_lengths[0] = prompts[0, :7], lengths[0]
    keys = np.asarray(rollout_keys(9, 9, 4)).copy()
    keys[0] = np.asarray(rollout_keys(5, 2, 4))[0]
    mixed = run(model, SAMPLED, others, other_lengths, keys)
    np.testing.assert_array_equal(mixed.tokens[0], first.tokens[0])
    np.testing.assert_allclose(mixed.logprobs[0], first.logprobs[0], atol=1e-6, rtol=0)
    assert (mixed.tokens[1:] != first.tokens[1:]).any()


def test_a_rollout_follows_the_parameters_it_is_given(model):
    """Weight freshness: after an update (here a perturbation of every weight) the same compiled rollout reports the
    new parameters' log-probs, not the old ones'."""
    prompts, lengths = make_prompts(LENGTHS)
    run(model, SAMPLED, prompts, lengths)  # the old parameters, through the same compiled program
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    noise = jax.random.split(jax.random.key(1), len(leaves))
    updated = nnx.merge(graphdef, jax.tree.unflatten(
        treedef, [w + 0.05 * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, noise, strict=True)]))
    out = run(updated, SAMPLED, prompts, lengths)
    np.testing.assert_allclose(out.logprobs, recomputed(updated, prompts, lengths, out, 1.0), atol=1e-4, rtol=0)
    assert np.abs(out.logprobs - recomputed(model, prompts, lengths, out, 1.0)).max() > 1e-2


def test_rollout_on_a_mesh_equals_one_device(model):
    prompts, lengths = make_prompts(LENGTHS)
    expected = run(model, SAMPLED, prompts, lengths)
    placed = shard_for_decoding(model, inference_mesh("data=2,tensor=2"))
    graphdef, params = nnx.split(placed)
    out = rollout(graphdef, params, prompts, lengths, rollout_keys(0, 0, 4), cfg=SAMPLED)
    assert "data" in jax.tree.leaves(out.tokens.sharding.spec[0])  # rows split over the data axis
    np.testing.assert_array_equal(np.asarray(out.tokens), expected.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), expected.logprobs, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="3 rollout rows .* do not split over the mesh's 2 data-parallel shards"):
        rollout(graphdef, params, prompts[:3], lengths[:3], rollout_keys(0, 0, 3), cfg=SAMPLED)


def test_bad_inputs_are_refused_clearly(model):
    with pytest.raises(ValueError, match="temperature: invalid value 0"):
        RolloutConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p: invalid value 0"):
        RolloutConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens: invalid value 0"):
        RolloutConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="stop_ids must be a tuple"):
        RolloutConfig(stop_ids=[2])
    prompts, lengths = make_prompts(LENGTHS)
    with pytest.raises(ValueError, match=r"prompt_lengths must be within 1..8"):
        run(model, SAMPLED, prompts, lengths + 1)
    with pytest.raises(ValueError, match=r"keys must be \[8, 2\] uint32"):
        run(model, RolloutConfig(max_new_tokens=NEW, samples_per_prompt=2, stop_ids=()), prompts, lengths,
            rollout_keys(0, 0, 4))
    with pytest.raises(ValueError, match=r"stop ids \[92542\] are outside the model's vocabulary of 512"):
        run(model, RolloutConfig(max_new_tokens=NEW), prompts, lengths)  # the chat default, on the tiny vocab
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.token_logprobs(jnp.zeros((1, 4, model.cfg.hidden_size)), jnp.zeros((1, 4), jnp.int32), temperature=0)
