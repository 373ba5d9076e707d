"""Objective and data-format registries: names and configs in an Experiment, `--set` into an objective's config,
ORPO against its closed form and packed = alone, and an experiment file outside the library that registers SimPO
and its own data format and trains through the launcher."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.data.packing import pack_examples
from internlm2_jax.data_formats import data_iterators, register_data_format
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.overrides import OverrideError, apply_overrides, to_dict
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.objectives import (DPOObjective, LMObjective, ORPOObjective, RewardObjective,
                                           pair_mean_logprobs)
from internlm2_jax.train.preference_loss import log1mexp, orpo_pair_loss
from internlm2_jax.train.registry import register_objective
from test_finetune import CFG, loss_of, random_pairs
from test_launch import ROOT, launch

PAIRS = DataConfig(format="pairs", train_files=("pairs.jsonl",))


def experiment(**kw) -> Experiment:
    return Experiment(name="t", model=preset("tiny"), train=TrainConfig(steps=2), **kw)


# ---- ORPO -----------------------------------------------------------------------------------------------------

def orpo_reference(chosen: float, rejected: float, beta: float) -> float:
    """The formula in float64 numpy: NLL(chosen) + beta * -log sigmoid(log odds(chosen) - log odds(rejected))."""
    def log_odds(logp):
        return logp - np.log1p(-np.exp(logp))

    ratio = log_odds(np.float64(chosen)) - log_odds(np.float64(rejected))
    return float(-chosen + beta * np.log1p(np.exp(-ratio)))


def test_orpo_loss_matches_its_closed_form():
    # By hand: p(chosen) = 1/2 (odds 1), p(rejected) = 1/5 (odds 1/4): log 2 + 0.1 * -log sigmoid(log 4).
    by_hand = math.log(2) + 0.1 * math.log(1.25)
    np.testing.assert_allclose(float(orpo_pair_loss(jnp.float32(math.log(0.5)), jnp.float32(math.log(0.2)))),
                               by_hand, rtol=1e-6)
    for chosen, rejected, beta in ((-0.5, -1.2, 0.1), (-2.0, -0.3, 0.1), (-1e-3, -5.0, 0.25), (-30.0, -40.0, 1.0),
                                   (-0.05, -0.04, 0.1)):
        got = float(orpo_pair_loss(jnp.float32(chosen), jnp.float32(rejected), beta))
        np.testing.assert_allclose(got, orpo_reference(chosen, rejected, beta), rtol=1e-6, err_msg=(chosen, rejected))
    # log(1 - e^x) stays accurate where 1 - e^x cancels and where e^x underflows against 1.
    x = np.array([-1e-6, -1e-3, -0.5, -0.7, -5.0, -40.0])
    exact = np.where(x > -1, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))  # float64, each form where it is exact
    np.testing.assert_allclose(np.asarray(log1mexp(jnp.asarray(x, jnp.float32))), exact, rtol=1e-6)
    # A mean log-prob of 0 (p = 1, or a padded pair slot) gives a finite loss and finite gradients.
    grads = jax.grad(lambda c, r: orpo_pair_loss(c, r), argnums=(0, 1))(jnp.float32(0.0), jnp.float32(0.0))
    assert np.isfinite(float(orpo_pair_loss(jnp.float32(0.0), jnp.float32(-1.0)))) and np.all(np.isfinite(grads))


def test_orpo_packed_pairs_give_the_loss_of_each_pair_alone_and_the_formula():
    pairs = random_pairs(7, 3, reward=False)
    graphdef, params = nnx.split(InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0)))
    packed = pack_examples(pairs, 128, 0, max_examples=4, pairs=True)
    alone = pack_examples(pairs, 128, 0, max_examples=1, pairs=True)
    assert packed["input_ids"].shape[0] == 1 and alone["input_ids"].shape[0] == 3
    loss = loss_of(ORPOObjective(beta=0.2).build())
    loss_p, n_p, metrics_p = loss(graphdef, params, packed)
    loss_a, n_a, metrics_a = loss(graphdef, params, alone)
    assert float(n_p) == float(n_a) == 3
    np.testing.assert_allclose(float(loss_p), float(loss_a), rtol=1e-5)
    for key in ("accuracy", "margin", "nll", "log_odds_ratio"):
        np.testing.assert_allclose(float(metrics_p[key]), float(metrics_a[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    # ... and it is the formula on each pair's per-token mean log-probabilities.
    chosen, rejected = jax.jit(lambda p, b: pair_mean_logprobs(nnx.merge(graphdef, p), b))(params, alone)
    expected = sum(orpo_reference(float(c), float(r), 0.2)
                   for c, r in zip(np.asarray(chosen)[:, 0], np.asarray(rejected)[:, 0], strict=True))
    np.testing.assert_allclose(float(loss_a), expected, rtol=1e-5)


# ---- the registries and the Experiment ----------------------------------------------------------------------------

def test_an_experiment_objective_is_a_registered_name_or_a_config_and_set_reaches_its_fields():
    assert experiment().objective == LMObjective()
    exp = experiment(data=PAIRS, objective="orpo")
    assert exp.objective == ORPOObjective() and exp.objective.build().rows == "policy_pairs"
    exp = apply_overrides(exp, ["objective.beta=0.2"])
    assert exp.objective == ORPOObjective(beta=0.2) and to_dict(exp)["objective"] == {"beta": 0.2, "name": "orpo"}
    exp = apply_overrides(exp, ["objective=dpo", "objective.loss=ipo", "objective.beta=0.3"])
    assert exp.objective == DPOObjective(loss="ipo", beta=0.3) and exp.objective.build().reference
    reward = apply_overrides(experiment(data=PAIRS, objective=RewardObjective()), ["objective.penalty_weight=0.01"])
    assert reward.objective.penalty_weight == 0.01 and reward.objective.build().rows == "reward_pairs"
    with pytest.raises(OverrideError, match="beta must be positive"):
        apply_overrides(exp, ["objective.beta=0"])
    with pytest.raises(OverrideError, match="init=False"):  # the name says which objective: not a setting
        apply_overrides(exp, ["objective.name=lm"])
    with pytest.raises(ValueError, match="unknown objective 'ppo'; registered: dpo, lm, orpo, ppo_actor, ppo_critic, "
                                         "reward"):
        experiment(objective="ppo")
    with pytest.raises(ValueError, match="objective='orpo' does not go with data.format='pretrain': it trains on "
                                         "policy_pairs rows, which pairs"):
        experiment(objective="orpo")
    with pytest.raises(ValueError, match="trains on text rows, which alpaca, messages, pretrain give"):
        experiment(data=PAIRS)


def test_registering_refuses_taken_names_and_mismatched_configs():
    register_objective("dpo", DPOObjective)  # the same definition again (an experiment loaded twice) is fine

    @dataclasses.dataclass(frozen=True)
    class Other:
        name: str = dataclasses.field(default="dpo", init=False)

        def build(self):
            raise AssertionError

    with pytest.raises(ValueError, match="objective 'dpo' is already registered by internlm2_jax.train.objectives"):
        register_objective("dpo", Other)
    with pytest.raises(ValueError, match="must give a config with name='zz_other'"):
        register_objective("zz_other", Other)
    with pytest.raises(ValueError, match="rows must be some of"):
        register_data_format("zz_bad", lambda exp, tokenizer: None, rows=("images",))
    with pytest.raises(ValueError, match="unknown data format 'sharegpt'; registered: alpaca, messages, pairs"):
        DataConfig(format="sharegpt")


def test_a_registered_data_format_builds_the_experiment_s_data():
    seen = []

    def counting(exp, tokenizer):
        seen.append((exp.name, tokenizer))
        return iter([{"input_ids": np.zeros((1, 4), np.int32)}]), None, "counting:1"

    register_data_format("zz_counting", counting, rows=("policy_pairs",))
    exp = experiment(data=DataConfig(format="zz_counting"), objective="orpo")
    data, heldout, data_hash = data_iterators(exp, "tok")
    assert seen == [("t", "tok")] and heldout is None and data_hash == "counting:1"
    with pytest.raises(ValueError, match="does not go with data.format='zz_counting'"):
        experiment(data=DataConfig(format="zz_counting"), objective="reward")


# ---- an objective and a data format from outside the library, through the launcher ------------------------------

def test_an_experiment_file_registers_simpo_and_its_data_format_and_trains_through_the_launcher(tmp_path):
    from internlm2_jax.artifacts import load_run

    done = launch(ROOT / "tests/experiments_testing/simpo_experiment.py", "--set", "objective.gamma=1.0",
                  cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    losses = json.loads(done.stdout.strip().splitlines()[-1])["losses"]
    assert sorted(map(int, losses)) == [2, 4] and all(np.isfinite(v) and v > 0 for v in losses.values())
    _, _, meta = load_run(tmp_path / "runs/simpo")
    assert meta["objective"] == "simpo" and meta["model_class"] == "InternLM2ForCausalLM"
    assert meta["experiment"]["objective"] == {"beta": 2.0, "gamma": 1.0, "name": "simpo"}
    assert meta["manifest_hash"].startswith("synthetic_pairs:")  # the registered format made the data
    assert (tmp_path / "runs/simpo/data/train.jsonl").exists()
