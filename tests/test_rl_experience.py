"""RL experience and the PPO/GRPO update objectives (train/rl/experience.py, train/rl/objectives.py; docs rlhf §2.4,
§2.5, §3.4 item 2, §3.5): the row layout of ragged prompts and responses, the on-policy identity of the first actor
step, a fresh LoRA adapter as an exact reference, one actor and one critic step through `make_train_step` (only
their parameters move, the loss falls on a repeated batch), micro-batching invariance and mesh == one device.
Tiny fp32 model, rows of 16 tokens; the responses are given (a fake `Rollout`), rollouts have their own tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import LoraConfig, preset
from internlm2_jax.decode.rollout import Rollout
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel, model_graphdef
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import (OptimizerConfig, StepConfig, init_train_state, jit_train_step, lr_schedule,
                                 make_optimizer, make_train_step, train_state_shardings)
from internlm2_jax.train.registry import objective_config
from internlm2_jax.train.rl.core import RunningMoments, group_advantages, shape_scores
from internlm2_jax.train.rl.experience import ExperienceConfig, build_rows, make_experience, ptx_weights
from internlm2_jax.train.rl.objectives import PPOActorObjective, PPOCriticObjective, policy_logprobs
from lora_testing import set_random_adapters

LORA = preset("tiny", initializer_range=0.1, lora=LoraConfig(rank=4, alpha=8.0))
PAD, STOP = 0, 2
PROMPT_LENGTHS = [7, 2, 5, 8]  # ragged, right-padded to 8
RESPONSE_LENGTHS = [3, 8, 1, 5]  # row 1 is cut at max_new_tokens (no stop), the others end on STOP
NEW = 8
SCORES = np.asarray([0.77, -1.3, 2.2, 0.4], np.float32)  # non-integer on purpose (rlhf §3.1 item 3)
TEMPERATURE = 0.7  # not 1, so a temperature mismatch between experience and step would show
ACTOR = PPOActorObjective(loss_agg="seq-mean-token-mean", temperature=TEMPERATURE, reward_normalize="none")
CRITIC = PPOCriticObjective()
ACTOR_TRAINED, CRITIC_TRAINED = ("lora_",), ("lora_", "v_head")


def prompts_and_rollout(group=1):
    prompts = np.zeros((len(PROMPT_LENGTHS), 8), np.int32)
    for row, n in enumerate(PROMPT_LENGTHS):
        prompts[row, :n] = (np.arange(n) * 37 + row * 11) % 500 + 3
    rows = len(PROMPT_LENGTHS) * group
    lengths = np.resize(RESPONSE_LENGTHS, rows).astype(np.int32)
    tokens = np.full((rows, NEW), PAD, np.int32)
    logprobs = np.zeros((rows, NEW), np.float32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = (np.arange(n) * 13 + row * 7) % 400 + 10
        logprobs[row, :n] = -0.5 - 0.1 * np.arange(n)
        if n < NEW:
            tokens[row, n - 1] = STOP
    stopped = lengths < NEW
    return prompts, np.asarray(PROMPT_LENGTHS, np.int32), Rollout(tokens=tokens, logprobs=logprobs,
                                                                  lengths=lengths, stopped=stopped)


@pytest.mark.parametrize("group", [1, 2])
def test_rows_align_targets_and_mask_the_response_through_its_stop_token(group):
    prompts, prompt_lengths, rollout = prompts_and_rollout(group)
    rows = build_rows(prompts, prompt_lengths, rollout, PAD)
    assert rows["input_ids"].shape == (4 * group, 16)
    for row in range(4 * group):
        p, n = PROMPT_LENGTHS[row // group], int(rollout.lengths[row])
        sequence = np.concatenate([prompts[row // group, :p], rollout.tokens[row, :n]])
        np.testing.assert_array_equal(rows["input_ids"][row], np.pad(sequence, (0, 16 - p - n)))
        np.testing.assert_array_equal(rows["targets"][row, :p + n - 1], sequence[1:])
        assert (rows["targets"][row, p + n - 1:] == PAD).all()
        np.testing.assert_array_equal(rows["segment_ids"][row], np.arange(16) < p + n)
        np.testing.assert_array_equal(rows["positions"][row, :p + n], np.arange(p + n))
        mask = rows["response_mask"][row] > 0
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(p - 1, p + n - 1))
        np.testing.assert_array_equal(rows["targets"][row][mask], rollout.tokens[row, :n])  # the response, exactly
        if rollout.stopped[row]:
            assert rows["targets"][row][mask][-1] == STOP  # the stop token is trained on, nothing after it
        np.testing.assert_array_equal(rows["rollout_logp"][row][mask], rollout.logprobs[row, :n])
    with pytest.raises(ValueError, match="length=12"):
        build_rows(prompts, prompt_lengths, rollout, PAD, length=12)


# ---- experience ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    fresh = InternLM2ForCausalLM(LORA, rngs=nnx.Rngs(0))  # LoRA B = 0: the actor is its reference
    actor = set_random_adapters(InternLM2ForCausalLM(LORA, rngs=nnx.Rngs(0)))  # moved away from its reference
    critic = set_random_adapters(InternLM2ForRewardModel(LORA, rngs=nnx.Rngs(1)))
    return nnx.split(fresh), nnx.split(actor), nnx.split(critic)


PPO_EXPERIENCE = ExperienceConfig(temperature=TEMPERATURE)


def experience(actor, critic, cfg=PPO_EXPERIENCE, loss_cfg=ACTOR, group=1):
    prompts, prompt_lengths, rollout = prompts_and_rollout(group)
    rows = build_rows(prompts, prompt_lengths, rollout, PAD)
    critic_kw = {} if critic is None else dict(critic_graphdef=critic[0], critic_params=critic[1])
    return make_experience(*actor, rows, np.resize(SCORES, len(rows["input_ids"])), rollout.stopped,
                           RunningMoments.init(), loss_cfg=loss_cfg, cfg=cfg, **critic_kw)


@pytest.fixture(scope="module")
def ppo_batch(models):
    _, actor, critic = models
    batch, _, metrics = experience(actor, critic)
    return jax.device_get(batch), jax.device_get(metrics)


def test_a_fresh_lora_adapter_is_exactly_its_reference(models):
    fresh, _, critic = models
    batch, _, metrics = experience(fresh, critic)
    np.testing.assert_array_equal(batch["ref_logp"], batch["old_logp"])
    assert float(metrics["kl"]) == 0.0


def test_experience_places_the_score_and_weights_the_tokens(ppo_batch):
    batch, metrics = ppo_batch
    mask = batch["response_mask"]
    assert abs(float(metrics["kl"])) > 1e-3  # random adapters: the actor is not its reference (k1 has either sign)
    for name in ("values", "returns", "advantages"):
        assert (batch[name][mask == 0] == 0).all(), name
    # seq-mean-token-mean: each sequence weighs the same, and the weights still sum to the response-token count.
    per_row = batch["pg_w"].sum(axis=1)
    np.testing.assert_allclose(per_row, per_row[0], rtol=1e-6)
    np.testing.assert_allclose(batch["pg_w"].sum(), mask.sum(), rtol=1e-6)
    # The end of a response is terminal, so its return is its reward: the score (no normalisation here) plus the
    # KL penalty of that token, on the last response position and never on the pad after it.
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    kl_last = (batch["old_logp"] - batch["ref_logp"])[np.arange(4), last]
    np.testing.assert_allclose(batch["returns"][np.arange(4), last], SCORES - ACTOR.kl_coef * kl_last, rtol=1e-5)


def test_grpo_experience_broadcasts_group_advantages_without_a_critic(models):
    _, actor, _ = models
    grpo = PPOActorObjective.grpo(temperature=TEMPERATURE)
    batch, _, _ = experience(actor, None, ExperienceConfig("grpo", TEMPERATURE, group_size=2), grpo, group=2)
    mask = np.asarray(batch["response_mask"])
    shaped, _ = shape_scores(jnp.asarray(np.resize(SCORES, 8)), jnp.zeros(8, bool), RunningMoments.init(), grpo)
    expected = np.asarray(group_advantages(shaped.reshape(-1, 2))).reshape(-1)
    np.testing.assert_allclose(np.asarray(batch["advantages"]), expected[:, None] * mask, rtol=1e-6)
    assert "values" not in batch
    with pytest.raises(ValueError, match="critic_graphdef"):
        experience(actor, None)


# ---- the steps -----------------------------------------------------------------------------------------------------

def step_runs(objective_cfg, graphdef_params, batch, *, trained, mesh_shape=(1, 1, 1, 1), micro=1, steps=1):
    """Metrics of `steps` steps on the same batch, and the parameters before and after."""
    objective = objective_cfg.build()
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, total_steps=20, weight_decay=0.0, trainable=trained)
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    tx = make_optimizer(opt)
    kw = dict(model_class=objective.model_class, trainable=trained)
    graphdef, _ = model_graphdef(LORA, objective.model_class)
    shardings = train_state_shardings(LORA, tx, mesh, **kw)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(opt), StepConfig(micro_batches=micro),
                                          objective=objective, trainable=trained), shardings, mesh)
    params = jax.tree.map(jnp.copy, graphdef_params[1])  # init_train_state donates the parameters it is given
    state = init_train_state(LORA, tx, mesh, params=params, **kw)
    before = jax.tree.map(np.asarray, state.params)
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return metrics, before, jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def actor_steps(models, ppo_batch):
    return step_runs(ACTOR, models[1], ppo_batch[0], trained=ACTOR_TRAINED, steps=3)


@pytest.fixture(scope="module")
def critic_steps(models, ppo_batch):
    return step_runs(CRITIC, models[2], ppo_batch[0], trained=CRITIC_TRAINED, steps=3)


def test_the_first_actor_step_is_exactly_on_policy(models, ppo_batch, actor_steps):
    batch, _ = ppo_batch
    first = actor_steps[0][0]
    assert abs(float(first["approx_kl"])) < 1e-6 and float(first["clipfrac"]) == 0.0
    assert float(first["approx_kl_k2"]) < 1e-12  # a weighted mean of squares: every token's log-ratio is ~0
    graphdef, params = models[1]
    logp = jax.jit(lambda p: policy_logprobs(nnx.merge(graphdef, p), batch, temperature=TEMPERATURE,
                                             chunk_size=1024))(params)
    mask = batch["response_mask"] > 0
    np.testing.assert_allclose(np.asarray(logp)[mask], batch["old_logp"][mask], atol=1e-6)
    # On policy the clipped loss is -A, aggregated with the same weights.
    expected = -(batch["pg_w"] * batch["advantages"]).sum() / batch["response_mask"].sum()
    np.testing.assert_allclose(float(first["pg_loss"]), expected, rtol=1e-5, atol=1e-7)


def changed_paths(before, after):
    return {"/".join(map(str, p)): not np.array_equal(x.get_value(), y.get_value())
            for (p, x), (_, y) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True)}


@pytest.mark.parametrize("which", ["actor", "critic"])
def test_a_step_trains_only_its_parameters_and_learns_a_repeated_batch(which, actor_steps, critic_steps):
    metrics, before, after = actor_steps if which == "actor" else critic_steps
    trained = ACTOR_TRAINED if which == "actor" else CRITIC_TRAINED
    for path, moved in changed_paths(before, after).items():
        assert moved == any(t in path for t in trained), f"{path}: changed={moved}"
    losses = [float(m["loss"]) for m in metrics]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("which", ["actor", "critic"])
def test_micro_batches_change_nothing(which, models, ppo_batch, actor_steps, critic_steps):
    cfg, params, trained, steps = ((ACTOR, models[1], ACTOR_TRAINED, actor_steps) if which == "actor" else
                                   (CRITIC, models[2], CRITIC_TRAINED, critic_steps))
    two, _, _ = step_runs(cfg, params, ppo_batch[0], trained=trained, micro=2)
    one = steps[0][0]  # the first of the fixture's steps: the same parameters and batch, one micro-batch
    for key, value in one.items():
        np.testing.assert_allclose(np.asarray(two[0][key], np.float64), np.asarray(value, np.float64), rtol=1e-6,
                                   atol=1e-6, err_msg=key)


@pytest.mark.parametrize("mesh_shape", [(4, 1, 1, 1), (2, 2, 2, 1)])  # the 4 rows over 4 data shards
def test_actor_and_critic_steps_on_a_mesh_equal_one_device(models, ppo_batch, actor_steps, critic_steps, mesh_shape):
    for cfg, params, trained, one, keys in (
            (ACTOR, models[1], ACTOR_TRAINED, actor_steps, ("loss", "grad_norm", "pg_loss", "entropy", "approx_kl")),
            (CRITIC, models[2], CRITIC_TRAINED, critic_steps, ("loss", "grad_norm", "value_mean"))):
        sharded, _, after = step_runs(cfg, params, ppo_batch[0], trained=trained, mesh_shape=mesh_shape)
        for key in keys:
            # approx_kl is rounding noise around 0 on policy: an absolute tolerance
            np.testing.assert_allclose(float(sharded[0][key]), float(one[0][0][key]), rtol=1e-5, atol=1e-6,
                                       err_msg=key)


@pytest.mark.parametrize("mesh_shape", [(4, 1, 1, 1), (2, 2, 2, 1)])  # the 4 rows over 4 data shards
def test_experience_on_a_mesh_equals_one_device(models, ppo_batch, mesh_shape):
    from internlm2_jax.parallel import state_shardings
    from internlm2_jax.train.loop import to_global_batch

    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    place = lambda pair: (pair[0], jax.device_put(pair[1], state_shardings(pair[1], mesh)))  # noqa: E731
    _, actor, critic = models
    prompts, prompt_lengths, rollout = prompts_and_rollout()
    rows = to_global_batch(build_rows(prompts, prompt_lengths, rollout, PAD), mesh)
    batch, _, metrics = make_experience(*place(actor), rows, SCORES, rollout.stopped, RunningMoments.init(),
                                        loss_cfg=ACTOR, cfg=PPO_EXPERIENCE, critic_graphdef=critic[0],
                                        critic_params=place(critic)[1])
    want, want_metrics = ppo_batch
    for key in ("old_logp", "ref_logp", "values", "advantages", "returns", "pg_w"):
        np.testing.assert_allclose(np.asarray(batch[key]), want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key, value in jax.device_get(metrics).items():
        np.testing.assert_allclose(value, want_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_the_ptx_term_adds_its_coefficient_times_the_token_mean_nll_at_temperature_one(models, ppo_batch):
    batch, _ = ppo_batch
    graphdef, params = models[1]
    trained = ((batch["segment_ids"] > 0) & (batch["response_mask"] == 0)).astype(np.float32)  # stand-in PTX tokens
    ptx_w = ptx_weights(trained, batch["response_mask"].sum(), 0.5)

    @jax.jit  # one compilation for the three forwards
    def run(params):
        loss = lambda b: ACTOR.build().loss(graphdef, params, b, None, 1024)  # noqa: E731
        logp = policy_logprobs(nnx.merge(graphdef, params), batch, temperature=1.0, chunk_size=1024)
        return loss(batch), loss({**batch, "ptx_w": ptx_w}), -logp

    (plain, count, _), (mixed, mixed_count, sums), nll = jax.device_get(run(params))
    expected = 0.5 * (nll * trained).sum() / trained.sum()  # after the step's division by the response tokens
    np.testing.assert_allclose((mixed - plain) / count, expected, rtol=1e-5)
    np.testing.assert_allclose(sums["ptx_loss"] / count, expected, rtol=1e-5)
    assert mixed_count == count


def test_the_objectives_are_registered_and_refuse_batches_without_experience(models):
    assert objective_config("ppo_actor") == PPOActorObjective()
    assert objective_config("ppo_critic") == PPOCriticObjective()
    graphdef, params = models[1]
    prompts, prompt_lengths, rollout = prompts_and_rollout()
    rows = build_rows(prompts, prompt_lengths, rollout, PAD)
    with pytest.raises(ValueError, match="old_logp"):
        ACTOR.build().loss(graphdef, params, rows, None, 1024)
    with pytest.raises(ValueError, match="temperature"):
        PPOActorObjective(temperature=0.0)
