"""The online RL loop (train/rl/loop.py; docs rlhf §3.4 items 2 and 5, §3.6 item 1, §3.8) on the two-answer task:
a tiny transformer, fine-tuned so each prompt is answered by token A or token B (about 50/50) then the stop id, and
a reward of 1 for A. Under a KL penalty beta to that SFT model, the optimum is pi*(A) = p0 e^(1/beta) / (p0 e^(1/beta)
+ 1 - p0), so the loop must land there (beta = 1), not at P(A) = 1: that catches a KL term dropped, of the wrong sign
or on the wrong tokens, wrong-sign advantages and a broken critic bootstrap. Also: the first update is exactly on
policy, rollouts follow the updated weights, the critic warms up alone, a resumed run repeats a straight one bit for
bit, and bad configurations are refused by name."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import ConfigError, preset
from internlm2_jax.data.prompts import PromptBatch
from internlm2_jax.decode.rollout import RolloutConfig
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import (OptimizerConfig, init_train_state, jit_train_step, lr_schedule, make_optimizer,
                                 make_train_step, train_state_shardings)
from internlm2_jax.train.loop import to_global_batch
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.rl.core import RLLossConfig
from internlm2_jax.train.rl.loop import minibatch_order, train_rl
from internlm2_jax.train.rl.objectives import policy_logprobs
from internlm2_jax.train.rl.state import ModelSetup

CFG = preset("tiny")
A, B, STOP = 5, 6, 2
WIDTH, PROMPTS = 6, 8
_rng = np.random.default_rng(0)
LENGTHS = _rng.integers(3, WIDTH + 1, PROMPTS).astype(np.int32)
PROMPT_IDS = np.zeros((PROMPTS, WIDTH), np.int32)
for _i, _n in enumerate(LENGTHS):
    PROMPT_IDS[_i, :_n] = _rng.integers(10, 500, _n)


def constant(lr):
    return OptimizerConfig(peak_lr=lr, warmup_steps=0, total_steps=10_000, min_lr_ratio=1.0, weight_decay=0.0)


@pytest.fixture(scope="module")
def sft():
    """(graphdef, params) after 60 LM steps on 'prompt A STOP' and 'prompt B STOP', trained on the answers."""
    rows, length = 2 * PROMPTS, WIDTH + 2
    batch = {k: np.zeros((rows, length), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = np.zeros((rows, length), np.float32)
    for row in range(rows):
        p = int(LENGTHS[row % PROMPTS])
        sequence = np.concatenate([PROMPT_IDS[row % PROMPTS, :p], [A if row < PROMPTS else B, STOP]])
        batch["input_ids"][row, :p + 2] = sequence
        batch["targets"][row, :p + 1] = sequence[1:]
        batch["positions"][row, :p + 2] = np.arange(p + 2)
        batch["segment_ids"][row, :p + 2] = 1
        batch["loss_mask"][row, p - 1:p + 1] = 1
    opt = OptimizerConfig(peak_lr=3e-3, warmup_steps=1, total_steps=60, weight_decay=0.0)
    mesh, tx = make_mesh(MeshConfig()), make_optimizer(opt)
    state = init_train_state(CFG, tx, mesh, seed=0)
    graphdef = nnx.graphdef(InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0)))
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(opt)), train_state_shardings(CFG, tx, mesh), mesh)
    for _ in range(60):
        state, _ = step(state, to_global_batch(batch, mesh))
    return graphdef, jax.device_get(state.params)


def prob_a(graphdef, params) -> float:
    """Mean over the prompts of the policy's exact probability of answering A."""
    rows = {k: np.zeros((PROMPTS, WIDTH), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    for i, n in enumerate(LENGTHS):
        rows["input_ids"][i, :n] = PROMPT_IDS[i, :n]
        rows["targets"][i, n - 1] = A
        rows["positions"][i, :n] = np.arange(n)
        rows["segment_ids"][i, :n] = 1
    logp = policy_logprobs(nnx.merge(graphdef, jax.device_get(params)), {k: jnp.asarray(v) for k, v in rows.items()},
                           temperature=1.0, chunk_size=64)
    return float(np.mean(np.exp(np.asarray(logp)[np.arange(PROMPTS), LENGTHS - 1])))


class Prompts:
    """The prompts, rotated by one each batch (so the source's resume state matters)."""

    def __init__(self):
        self.served = 0

    def __next__(self):
        order = np.roll(np.arange(PROMPTS), self.served)
        self.served += 1
        return PromptBatch(PROMPT_IDS[order], LENGTHS[order], np.full(PROMPTS, -1, np.int32), (None,) * PROMPTS)

    def get_state(self):
        return {"served": self.served}

    def set_state(self, state):
        self.served = state["served"]


class PtxRows:
    """LM rows of the SFT data ('prompt A STOP', every token trained), one rotation per batch: the PTX source."""

    def __init__(self):
        self.served = 0

    def __next__(self):
        rows = {k: np.zeros((PROMPTS, WIDTH + 2), np.int32) for k in ("input_ids", "targets", "positions",
                                                                      "segment_ids")}
        rows["loss_mask"] = np.zeros((PROMPTS, WIDTH + 2), np.float32)
        for row, b in enumerate(np.roll(np.arange(PROMPTS), self.served)):
            p = int(LENGTHS[b])
            sequence = np.concatenate([PROMPT_IDS[b, :p], [A, STOP]])
            rows["input_ids"][row, :p + 2] = sequence
            rows["targets"][row, :p + 1] = sequence[1:]
            rows["positions"][row, :p + 2] = np.arange(p + 2)
            rows["segment_ids"][row, :p + 2] = 1
            rows["loss_mask"][row, :p + 1] = 1
        self.served += 1
        return rows

    def get_state(self):
        return {"served": self.served}

    def set_state(self, state):
        self.served = state["served"]


def lm_nll(graphdef, params, rows) -> float:
    logp = policy_logprobs(nnx.merge(graphdef, jax.device_get(params)), {k: jnp.asarray(v) for k, v in rows.items()},
                           temperature=1.0, chunk_size=64)
    return float(-(np.asarray(logp) * rows["loss_mask"]).sum() / rows["loss_mask"].sum())


def reward_a(batch, rollout):
    return (np.asarray(rollout.tokens)[:, 0] == A).astype(np.float32)


def config(tmp_path, algorithm="ppo", beta=1.0, iterations=10, **overrides):
    group = 8 if algorithm == "grpo" else 1
    loss = (RLLossConfig(kl_coef=beta, reward_normalize="none", lam=1.0) if algorithm == "ppo" else
            RLLossConfig.grpo(kl_coef=beta, kl_estimator="k2", group_scale="none"))
    fields = dict(algorithm=algorithm, iterations=iterations, prompts_per_iteration=PROMPTS, loss=loss,
                  rollout=RolloutConfig(max_new_tokens=2, top_p=1.0, stop_ids=(STOP,), samples_per_prompt=group),
                  critic_warmup_iterations=0, checkpoint_every=1000, chunk_size=64, run_dir=str(tmp_path / algorithm))
    return RLConfig(**{**fields, **overrides})


def run(sft, cfg, lr=1e-3, prompts=None, reward=reward_a, ptx=None, gold=None):
    graphdef, params = sft
    critic = ModelSetup(CFG, constant(5 * lr)) if cfg.algorithm == "ppo" else None
    return train_rl(cfg, ModelSetup(CFG, constant(lr), params=params), prompts or Prompts(), reward, critic=critic,
                    ptx=ptx, gold=gold, progress=False)


def kl_optimum(p0, beta):
    return p0 * np.exp(1 / beta) / (p0 * np.exp(1 / beta) + 1 - p0)


# ---- the two-answer task --------------------------------------------------------------------------------------------

def test_ppo_lands_on_the_kl_regularised_optimum(sft, tmp_path):
    p0 = prob_a(*sft)
    assert 0.3 < p0 < 0.7, p0  # the SFT model answers both
    result = run(sft, config(tmp_path, "ppo", beta=1.0, iterations=100))
    assert abs(prob_a(sft[0], result.state.actor.params) - kl_optimum(p0, 1.0)) < 0.05  # 0.72 at p0 = 0.49
    first = result.metrics[1]
    # On policy: the first update's ratio is exactly 1 (no dropout, same temperature, fresh params), and the rollout's
    # log-probs are what training recomputes.
    assert abs(first["actor/approx_kl"]) < 1e-6 and first["actor/clipfrac"] == 0.0
    assert all(m["rollout_logp_error_max"] < 1e-4 for m in result.metrics.values())  # rollouts use fresh weights
    assert [result.metrics[k]["params_version"] for k in (1, 2, 3)] == [0.0, 1.0, 2.0]  # one actor step each
    assert (result.run_dir / "rl_curves.png").exists()
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, 101))


def test_grpo_lands_on_its_kl_regularised_optimum(sft, tmp_path):
    """k2 in the loss has the reverse-KL gradient, so GRPO reaches the same kind of optimum; its group mean includes
    the sample itself, which scales the policy gradient by (G - 1) / G: the optimum of beta * G / (G - 1)."""
    p0 = prob_a(*sft)
    result = run(sft, config(tmp_path, "grpo", beta=1.0, iterations=150))
    assert abs(prob_a(sft[0], result.state.actor.params) - kl_optimum(p0, 1.0 * 8 / 7)) < 0.05  # 0.69


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_small_kl_penalty_lets_the_reward_win(sft, tmp_path, algorithm):
    result = run(sft, config(tmp_path, algorithm, beta=0.01, iterations=30))
    assert prob_a(sft[0], result.state.actor.params) >= 0.95


# ---- the loop's mechanics -------------------------------------------------------------------------------------------

def test_the_critic_warms_up_alone_and_a_resumed_run_repeats_a_straight_one_bitwise(sft, tmp_path):
    def timeless(metrics):
        return {k: v for k, v in metrics.items() if not k.startswith("time/") and k != "rollout_tokens_per_s"}

    cfg = config(tmp_path, iterations=4, checkpoint_every=2, keep_checkpoints=5, critic_warmup_iterations=1)
    straight = run(sft, cfg, ptx=PtxRows())
    # The critic warms up alone: the actor's first step comes in the second iteration, from the SFT weights, so its
    # PTX term is ptx_coef x the SFT model's token-mean NLL on the first PTX batch.
    assert [straight.metrics[k]["actor_trained"] for k in (1, 2)] == [0.0, 1.0]
    assert "actor/loss" not in straight.metrics[1] and "critic/loss" in straight.metrics[1]
    assert int(straight.state.actor.step) == 3 and int(straight.state.critic.step) == 4
    np.testing.assert_allclose(straight.metrics[2]["actor/ptx_loss"], 0.5 * lm_nll(*sft, next(PtxRows())), rtol=1e-4)
    # As if killed after the checkpoint of iteration 2: the newer one is gone, the run starts again.
    shutil.rmtree(straight.run_dir / "checkpoints" / "4")
    prompts, ptx = Prompts(), PtxRows()
    resumed = run(sft, cfg, prompts=prompts, ptx=ptx)
    assert prompts.served == 4 and ptx.served == 3  # both sources' states came back from the checkpoint
    assert sorted(resumed.metrics) == [3, 4]
    for k in (3, 4):
        assert timeless(resumed.metrics[k]) == timeless(straight.metrics[k]), k
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Running longer is a resume; another seed or batch is another run, refused by name before anything moves.
    with pytest.raises(ValueError, match=r"another RL run \(minibatches: checkpoint 1 vs run 2; seed: checkpoint 0"):
        run(sft, dataclasses.replace(cfg, iterations=5, seed=3, minibatches=2), ptx=PtxRows())


def test_fewer_prompts_than_data_shards_still_roll_out(sft, tmp_path):
    """GRPO's usual shape, few prompts x many samples: 4 prompts on 8 data shards (32 rows)."""

    class FourPrompts(Prompts):
        def __next__(self):
            batch = super().__next__()
            return PromptBatch(batch.prompt_ids[:4], batch.prompt_lengths[:4], batch.domain_ids[:4], batch.metas[:4])

    cfg = config(tmp_path, "grpo", iterations=1, prompts_per_iteration=4)
    result = train_rl(cfg, ModelSetup(CFG, constant(1e-3), params=sft[1]), FourPrompts(), reward_a,
                      mesh_cfg=MeshConfig(fsdp=-1), progress=False)
    assert result.iterations == 1 and np.isfinite(result.metrics[1]["actor/loss"])


def test_grpo_minibatches_keep_groups_whole_and_reshuffle_each_epoch(tmp_path):
    cfg = config(tmp_path, "grpo", minibatches=4)
    first, second = minibatch_order(cfg, 3, 0), minibatch_order(cfg, 3, 1)
    np.testing.assert_array_equal(first, minibatch_order(cfg, 3, 0))  # a function of (seed, iteration, epoch)
    assert sorted(first) == list(range(cfg.rows)) and not np.array_equal(first, second)
    for k in range(4):
        rows = first[k * 16:(k + 1) * 16]
        assert sorted(set(rows // 8)) == sorted(rows[::8] // 8) and len(set(rows // 8)) == 2  # two whole groups


def test_bad_configurations_are_refused_by_name(sft, tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        config(tmp_path, "grpo", rollout=RolloutConfig(max_new_tokens=2, stop_ids=(STOP,)))
    with pytest.raises(ConfigError, match="per-token KL reward would be dropped"):
        config(tmp_path, "grpo", loss=RLLossConfig())
    with pytest.raises(ConfigError, match="rl.minibatches=3"):
        config(tmp_path, minibatches=3)
    with pytest.raises(ValueError, match="PPO needs a critic"):
        train_rl(config(tmp_path), ModelSetup(CFG, constant(1e-3), params=sft[1]), Prompts(), reward_a,
                 progress=False)
    with pytest.raises(ValueError, match="mesh.sequence=2"):
        train_rl(config(tmp_path), ModelSetup(CFG, constant(1e-3), params=sft[1]), Prompts(), reward_a,
                 mesh_cfg=MeshConfig(fsdp=4, sequence=2), progress=False)
    with pytest.raises(ValueError, match=r"expected \[8\] finite scores"):
        run(sft, config(tmp_path / "nan", iterations=1), reward=lambda batch, rollout: np.full(8, np.nan))


def test_a_length_hacked_reward_trips_the_monitors_and_ends_the_round(sft, tmp_path):
    """A reward that pays for length (the hackable RM of rlhf §3.7) with beta 0: the policy stops stopping, the
    stop-rate monitor fires and ends the round; the gold check (answering A) is logged beside it, samples dumped."""
    from internlm2_jax.train.rl.hacking import MonitorConfig, read_samples

    cfg = config(tmp_path, "ppo", beta=0.0, iterations=40, dump_every=1,
                 rollout=RolloutConfig(max_new_tokens=4, top_p=1.0, stop_ids=(STOP,)),
                 monitor=MonitorConfig(window=2, stop_round_on=("stop_rate_drop",)))
    result = run(sft, cfg, lr=3e-3, reward=lambda batch, rollout: np.asarray(rollout.lengths, np.float32),
                 gold=reward_a)
    assert result.stopped_by == "stop_rate_drop" and result.iterations < 40
    assert result.metrics[result.iterations]["alert/stop_rate_drop"] == 1.0
    assert result.metrics[1]["stop_rate"] > 0.8 > result.metrics[result.iterations]["stop_rate"]
    assert "gold" in result.metrics[1] and (result.run_dir / "checkpoints" / str(result.iterations)).exists()
    dumped = read_samples(result.run_dir / "samples" / "iter_1.jsonl")
    assert len(dumped) == PROMPTS and {"response_ids", "score", "gold", "stopped", "record"} <= set(dumped[0])


def test_the_weight_sync_is_a_reshard_that_changes_no_number(sft, tmp_path):
    """Rollouts decode with the actor's weights resharded once (ROLLOUT_RULES: whole over the data axes): element
    for element the trained ones (fp32 here), and the same samples as decoding with the FSDP layout directly."""
    from internlm2_jax.decode.rollout import rollout, rollout_keys
    from internlm2_jax.train.rl.state import build_rl_program, init_rl_state

    cfg = config(tmp_path, "grpo", rollout_weights="gathered")
    program = build_rl_program(cfg, ModelSetup(CFG, constant(1e-3), params=sft[1]), None, make_mesh(MeshConfig()))
    state = init_rl_state(program, cfg, ModelSetup(CFG, constant(1e-3), params=sft[1]), None)
    gathered = program.rollout_params(state.actor.params)
    for (path, trained), (_, synced) in zip(nnx.to_flat_state(state.actor.params), nnx.to_flat_state(gathered),
                                            strict=True):
        np.testing.assert_array_equal(np.asarray(synced.get_value()), np.asarray(trained.get_value()))
        assert "fsdp" not in str(synced.get_value().sharding.spec), path
    assert any("fsdp" in str(v.get_value().sharding.spec) for _, v in nnx.to_flat_state(state.actor.params))
    keys = rollout_keys(0, 0, PROMPTS * 8)
    a, b = (jax.device_get(rollout(program.actor.graphdef, params, PROMPT_IDS, LENGTHS, keys, cfg=cfg.rollout))
            for params in (gathered, state.actor.params))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
