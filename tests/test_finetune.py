"""Fine-tuning steps: the preference losses against the spec's numbers, packing equalities for SFT / reward / DPO,
LoRA (only adapters train, merging is exact), sharded-vs-unsharded equality of every step, init from weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import LoraConfig, preset
from internlm2_jax.data.packing import pack_examples
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.model.lora import merge_lora
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import (OptimizerConfig, StepConfig, init_train_state, jit_train_step, lr_schedule,
                                 make_optimizer, make_train_step, train_state_shardings)
from internlm2_jax.train.objectives import (LM, dpo_objective, reward_objective, reward_scores, sequence_logprobs,
                                           without_adapters)
from internlm2_jax.train.preference_loss import (DPOConfig, RewardLossConfig, dpo_pair_loss, focal_ranking_loss,
                                                 log_barrier_penalty, ranking_loss, reward_pair_loss)
from internlm2_jax.model import model_graphdef
from lora_testing import set_random_adapters

CFG = preset("tiny")
LORA = CFG.replace(lora=LoraConfig(rank=4, alpha=8.0))
REWARD_ID = 500


# ---- the formulas ------------------------------------------------------------------------------------------------

def test_focal_ranking_loss_and_log_barrier_reproduce_the_spec_numbers():
    # spec §11.8
    for delta, expected in ((-1.0, 1.313262), (0.0, 0.693147), (0.5, 0.270294), (1.0, 0.090632), (3.0, 0.000437)):
        np.testing.assert_allclose(float(focal_ranking_loss(jnp.float32(delta))), expected, atol=1e-5)
    np.testing.assert_allclose(float(ranking_loss(jnp.float32(0.5))), 0.474077, atol=1e-5)
    np.testing.assert_allclose(float(ranking_loss(jnp.float32(1.0))), 0.313262, atol=1e-5)
    for x, expected in ((0.0, -3.218876), (2.0, -3.044522), (4.0, -2.197225), (-4.9, 0.010050)):
        np.testing.assert_allclose(float(log_barrier_penalty(jnp.float32(x))), expected, atol=1e-5)
    # Outside the barrier the score is clamped (XTuner): finite, and no gradient pushing further out.
    assert np.isfinite(float(log_barrier_penalty(jnp.float32(7.0))))
    assert float(jax.grad(log_barrier_penalty)(jnp.float32(7.0))) == 0.0
    # The total: rank + lambda * (barrier(chosen) + barrier(rejected)), lambda 0.02 by default (the report).
    total = reward_pair_loss(jnp.float32(2.0), jnp.float32(1.0))
    np.testing.assert_allclose(float(total), 0.090632 + 0.02 * (-3.044522 - (math.log(6) + math.log(4))), atol=1e-5)
    plain = reward_pair_loss(jnp.float32(1.0), jnp.float32(0.0), RewardLossConfig(rank_loss="ranking",
                                                                                   penalty_weight=0.0))
    np.testing.assert_allclose(float(plain), 0.313262, atol=1e-5)


def test_dpo_losses_match_their_closed_forms_on_hand_computed_cases():
    # policy (chosen, rejected) = (-10, -12), reference (-11, -11): h = 1 - (-1) = 2.
    args = [jnp.float32(v) for v in (-10.0, -12.0, -11.0, -11.0)]
    np.testing.assert_allclose(float(dpo_pair_loss(*args, DPOConfig(beta=0.1))), math.log1p(math.exp(-0.2)),
                               rtol=1e-6)  # -log sigmoid(0.2) = 0.598139
    np.testing.assert_allclose(float(dpo_pair_loss(*args, DPOConfig(beta=0.1, label_smoothing=0.1))),
                               0.9 * 0.5981389 + 0.1 * 0.7981389, rtol=1e-6)
    np.testing.assert_allclose(float(dpo_pair_loss(*args, DPOConfig(loss="ipo", beta=0.1))), (2 - 5) ** 2, rtol=1e-6)
    # Equal log-ratios: log 2 for DPO whatever beta.
    same = [jnp.float32(v) for v in (-3.0, -4.0, -3.0, -4.0)]
    np.testing.assert_allclose(float(dpo_pair_loss(*same, DPOConfig(beta=0.5))), math.log(2), rtol=1e-6)


def test_loss_configs_reject_bad_values_by_name():
    with pytest.raises(ValueError, match="rank_loss"):
        RewardLossConfig(rank_loss="hinge")
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="lora.rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="lora.targets"):
        LoraConfig(targets=("q_proj",))


# ---- data: random conversations and pairs --------------------------------------------------------------------------

def random_sequence(rng, length, *, trained_from=None, reward=False):
    ids = rng.randint(3, 400, length).astype(np.int32)
    ids[0] = 1
    if reward:
        ids[-1] = REWARD_ID
    mask = np.zeros(length, np.float32)
    if trained_from is not None:
        mask[trained_from:] = 1
    return ids, mask


def random_pairs(seed, n, *, reward):
    rng = np.random.RandomState(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.randint(5, 12)
        pairs.append([random_sequence(rng, prompt + rng.randint(3, 9), trained_from=prompt, reward=reward)
                      for _ in range(2)])
    return pairs


# ---- packing equalities -------------------------------------------------------------------------------------------

def loss_of(objective):
    """The objective's loss, jitted (eager dispatch of a whole model is slow): (graphdef, params, batch)."""
    jitted = jax.jit(objective.loss, static_argnums=(0, 4))
    return lambda graphdef, params, batch: jitted(graphdef, params, batch, None, 1024)


def test_sft_packed_rows_give_the_losses_of_each_conversation_alone():
    rng = np.random.RandomState(1)
    conversations = [[random_sequence(rng, n, trained_from=n // 2)] for n in (11, 17, 9)]
    model = set_random_adapters(InternLM2ForCausalLM(LORA, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    packed = pack_examples(conversations, 48, 0)
    alone = pack_examples(conversations, 48, 0, max_examples=1)
    assert packed["input_ids"].shape[0] == 1 and alone["input_ids"].shape[0] == 3
    loss = loss_of(LM)
    loss_packed, count_packed, _ = loss(graphdef, params, packed)
    loss_alone, count_alone, _ = loss(graphdef, params, alone)
    assert float(count_packed) == float(count_alone) == sum(len(c[0][0]) - len(c[0][0]) // 2 for c in conversations)
    np.testing.assert_allclose(float(loss_packed), float(loss_alone), rtol=1e-5)


def test_reward_pairs_packed_in_one_row_score_as_they_do_alone():
    pairs = random_pairs(2, 3, reward=True)
    model = InternLM2ForRewardModel(CFG, rngs=nnx.Rngs(0))
    packed = pack_examples(pairs, 128, 0, max_examples=4, pairs=True)
    alone = pack_examples(pairs, 128, 0, max_examples=1, pairs=True)
    assert packed["input_ids"].shape[0] == 1 and packed["pair_mask"].tolist() == [[1, 1, 1, 0]]
    graphdef, params = nnx.split(model)
    scores = jax.jit(lambda p, b: reward_scores(nnx.merge(graphdef, p), b))
    chosen_p, rejected_p = scores(params, packed)
    chosen_a, rejected_a = scores(params, alone)
    np.testing.assert_allclose(np.asarray(chosen_p)[0, :3], np.asarray(chosen_a)[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(rejected_p)[0, :3], np.asarray(rejected_a)[:, 0], atol=1e-5)
    # ... and the score is the one at the reward token of each sequence run alone.
    ids, _ = pairs[1][1]
    alone_scores = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids[None])
    np.testing.assert_allclose(float(rejected_p[0, 1]), float(alone_scores[0, -1]), atol=1e-5)
    loss = loss_of(reward_objective())
    loss_p, n_p, metrics_p = loss(graphdef, params, packed)
    loss_a, n_a, metrics_a = loss(graphdef, params, alone)
    assert float(n_p) == float(n_a) == 3
    np.testing.assert_allclose(float(loss_p), float(loss_a), rtol=1e-5)
    np.testing.assert_allclose(float(metrics_p["margin"]), float(metrics_a["margin"]), atol=1e-5)


def test_dpo_pairs_packed_give_the_losses_of_each_pair_alone_and_the_reference_is_the_base_model():
    pairs = random_pairs(3, 3, reward=False)
    model = set_random_adapters(InternLM2ForCausalLM(LORA, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    packed = pack_examples(pairs, 128, 0, max_examples=4, pairs=True)
    alone = pack_examples(pairs, 128, 0, max_examples=1, pairs=True)
    loss = loss_of(dpo_objective(DPOConfig(beta=0.5)))
    loss_p, _, _ = loss(graphdef, params, packed)
    loss_a, _, _ = loss(graphdef, params, alone)
    np.testing.assert_allclose(float(loss_p), float(loss_a), rtol=1e-5)
    # The implicit reference (adapters off) equals a separately built base model given as reference_logps.
    base = merge_lora(nnx.merge(graphdef, without_adapters(params)))  # a plain model holding the base weights
    assert base.cfg.lora is None
    base_graphdef, base_params = nnx.split(base)
    reference, _ = jax.jit(lambda p, b: sequence_logprobs(nnx.merge(base_graphdef, p), b))(base_params, packed)
    loss_given, _, _ = loss(graphdef, params, {**packed, "reference_logps": reference})
    np.testing.assert_allclose(float(loss_given), float(loss_p), rtol=1e-5)
    # With the policy equal to its reference every pair's loss is log 2.
    fresh = nnx.split(InternLM2ForCausalLM(LORA, rngs=nnx.Rngs(0)))
    loss_fresh, count, _ = loss(*fresh, packed)
    np.testing.assert_allclose(float(loss_fresh / count), math.log(2), rtol=1e-5)


def test_dpo_without_adapters_or_reference_logps_says_what_is_missing():
    pairs = pack_examples(random_pairs(4, 1, reward=False), 64, 0, max_examples=1, pairs=True)
    with pytest.raises(ValueError, match="reference_logps"):
        dpo_objective().loss(*nnx.split(InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0))), pairs, None, 1024)


def test_reward_step_with_micro_batches_equals_one_batch():
    """Accumulation sums the loss, the pair count and every metric, so micro-batches change nothing."""
    batch = pair_batches(True)[0]
    tx = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10))
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    graphdef, _ = model_graphdef(CFG, InternLM2ForRewardModel)
    results = []
    for micro in (1, 4):
        step = jax.jit(make_train_step(graphdef, tx, lambda _: 0.0, StepConfig(micro_batches=micro),
                                       objective=reward_objective()))
        state = init_train_state(CFG, tx, mesh, model_class=InternLM2ForRewardModel)
        results.append(jax.device_get(step(state, batch)))
    (state_1, metrics_1), (state_4, metrics_4) = results
    for key in ("loss", "accuracy", "margin", "chosen", "rejected", "pairs", "grad_norm"):
        np.testing.assert_allclose(metrics_4[key], metrics_1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(state_4.params), jax.tree.leaves(state_1.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ---- LoRA ---------------------------------------------------------------------------------------------------------

def test_a_lora_model_is_not_exported_without_its_adapters(tmp_path):
    from internlm2_jax.convert import save_pretrained

    with pytest.raises(ValueError, match="merge_lora"):
        save_pretrained(InternLM2ForCausalLM(LORA, rngs=nnx.Rngs(0)), tmp_path / "out")


@pytest.mark.parametrize("scan", [False, True])
def test_merged_lora_model_equals_base_plus_adapter(scan):
    model = set_random_adapters(InternLM2ForCausalLM(LORA.replace(scan_layers=scan), rngs=nnx.Rngs(0)))
    ids = np.random.RandomState(0).randint(3, 500, (2, 24)).astype(np.int32)
    forward = jax.jit(lambda m, x: m(x))
    merged = merge_lora(model)
    assert merged.cfg.lora is None and not any("lora" in str(p) for p, _ in nnx.to_flat_state(nnx.state(merged)))
    np.testing.assert_allclose(np.asarray(forward(merged, ids)), np.asarray(forward(model, ids)), atol=2e-5)
    # The adapters matter (the equality is not vacuous) and fresh ones (B = 0) change nothing.
    graphdef, params = nnx.split(model)
    base = merge_lora(nnx.merge(graphdef, without_adapters(params)))  # a plain model with the base weights
    assert np.max(np.abs(np.asarray(forward(base, ids)) - np.asarray(forward(model, ids)))) > 1e-3
    fresh = InternLM2ForCausalLM(LORA.replace(scan_layers=scan), rngs=nnx.Rngs(0))
    assert any("lora_a" in str(p) for p, _ in nnx.to_flat_state(nnx.state(fresh)))
    np.testing.assert_array_equal(np.asarray(forward(fresh, ids)), np.asarray(forward(base, ids)))


# ---- the steps: sharded = unsharded, and only trainable parameters move ---------------------------------------------
# (Full-parameter training is the same step with every parameter trainable: tests/test_train.py checks it sharded.)

def sft_batches():
    rng = np.random.RandomState(5)
    conversations = [[random_sequence(rng, rng.randint(8, 30), trained_from=5)] for _ in range(40)]
    rows = pack_examples(conversations, 64, 0)
    return [{k: v[i * 8:(i + 1) * 8] for k, v in rows.items()} for i in range(2)]


def pair_batches(reward):
    rows = pack_examples(random_pairs(6, 48, reward=reward), 64, 0, max_examples=3, pairs=True)
    return [{k: v[i * 8:(i + 1) * 8] for k, v in rows.items()} for i in range(2)]


CASES = {
    "sft_lora": (LORA.replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1)), LM, ("lora_",), sft_batches),
    "reward_lora": (LORA, reward_objective(), ("lora_", "v_head"), lambda: pair_batches(True)),
    "dpo_lora": (LORA, dpo_objective(), ("lora_",), lambda: pair_batches(False)),
}


def run_case(name, shape):
    cfg, objective, trainable, batches = CASES[name]
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, total_steps=20, trainable=trainable)
    mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
    tx = make_optimizer(opt)
    kw = dict(model_class=objective.model_class, trainable=trainable)
    graphdef, _ = model_graphdef(cfg, objective.model_class)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(opt), StepConfig(), objective=objective,
                                          trainable=trainable), train_state_shardings(cfg, tx, mesh, **kw), mesh)
    state = init_train_state(cfg, tx, mesh, seed=0, **kw)
    if cfg.lora is not None:  # B = 0 would make the first step's base-weight gradients trivially equal
        state = state.replace(params=nnx.state(set_random_adapters(nnx.merge(graphdef, state.params))))
        state = jax.device_put(state, train_state_shardings(cfg, tx, mesh, **kw))
    before = jax.tree.map(np.asarray, state.params)
    metrics = []
    for batch in batches() * 2:
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return metrics, before, jax.tree.map(np.asarray, state.params), state.opt_state


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_step_sharded_equals_unsharded_and_trains_only_its_parameters(name):
    metrics, before, after, opt_state = run_case(name, (1, 1, 1, 1))
    sharded, _, after_sharded, _ = run_case(name, (2, 2, 2, 1))
    for a, b in zip(metrics, sharded, strict=True):
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(after_sharded), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # same batches again: it learned them
    trainable = CASES[name][2]
    changed = {"/".join(map(str, p)): not np.array_equal(x.get_value(), y.get_value())
               for (p, x), (_, y) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True)}
    for path, moved in changed.items():
        expected = not trainable or any(t in path for t in trainable)
        assert moved == expected, f"{path}: changed={moved}, trainable={expected}"
    if trainable:  # optimizer moments exist for the trainable parameters only
        trained = sum(x.get_value().size for p, x in nnx.to_flat_state(before)
                      if any(t in "/".join(map(str, p)) for t in trainable))
        moments = sum(leaf.size for leaf in jax.tree.leaves(opt_state) if leaf.ndim > 0)
        assert moments == 2 * trained
    if CASES[name][1].count_name == "pairs":
        assert {"accuracy", "margin", "chosen", "rejected", "pairs"} <= set(metrics[0])
