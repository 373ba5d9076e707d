"""The pure RL formulas (train/rl/core.py) against docs/rlhf.md: §1.13's worked numbers, a numpy transcription of
verl's GAE loop and TRL's masked_whiten, score placement, packed GAE, exact loss aggregation under micro-batching,
the config refusals, and the exact-expectation bandit of §3.3 (every fixed point of every KL placement)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from internlm2_jax.config import ConfigError
from internlm2_jax.train.rl import (
    AdaptiveKL,
    RLLossConfig,
    RunningMoments,
    aggregate,
    aggregation_weights,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_controller,
    kl_estimate,
    last_response_position,
    masked_whiten,
    ppo_policy_loss,
    shape_scores,
    token_rewards,
    value_loss,
    weighted_sums,
)

sg = jax.lax.stop_gradient

# §1.13: one sample, 4 response tokens (last = stop), beta 0.01, k1 in the reward, RM score 1.5, no normalisation.
OLD = jnp.array([[-1.0, -0.5, -2.0, -0.1]])
REF = jnp.array([[-1.2, -0.4, -2.5, -0.1]])
V = jnp.array([[0.5, 0.4, 0.6, 0.8]])
NEW = jnp.array([[-0.9, -0.6, -1.5, -0.1]])
V_NEW = jnp.array([[0.9, 1.0, 1.2, 1.6]])
MASK = jnp.ones((1, 4))


def close(actual, expected, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, dtype=np.float64), rtol=0, atol=atol)


def golden_advantages(lam):
    rewards = token_rewards(jnp.array([1.5]), kl_estimate(OLD, REF, "k1"), MASK, 0.01)
    return gae(rewards, V, MASK, 1.0, lam)


# ----------------------------------------------------------------------------------- §3.1 item 1: golden numbers


def test_kl_estimators_match_the_worked_numbers():
    close(kl_estimate(OLD, REF, "k1"), [[0.2, -0.1, 0.5, 0.0]])
    close(kl_estimate(OLD, REF, "k2"), [[0.02, 0.005, 0.125, 0.0]])
    close(kl_estimate(OLD, REF, "k3"), [[0.0187308, 0.0051709, 0.1065307, 0.0]])


def test_k3_plus_has_k3_value_and_k2_gradient():
    close(kl_estimate(OLD, REF, "k3+"), kl_estimate(OLD, REF, "k3"))
    grad = {e: jax.grad(lambda lp, e=e: kl_estimate(lp, REF, e).sum())(OLD) for e in ("k2", "k3+")}
    close(grad["k3+"], grad["k2"])


def test_kl_clamp_bounds_the_estimate():
    logp, ref = jnp.array([[-100.0]]), jnp.zeros((1, 1))  # d = ref - logp = 100: e^d is inf in fp32
    assert float(kl_estimate(ref, logp, "k1", clamp=10.0)[0, 0]) == 10.0
    assert float(kl_estimate(logp, ref, "k1", clamp=10.0)[0, 0]) == -10.0
    assert float(kl_estimate(logp, ref, "k3", clamp=10.0)[0, 0]) == 10.0
    assert np.isfinite(float(kl_estimate(logp, ref, "k3", clamp=None)[0, 0]))  # d clamped to 20 before exp


def test_token_rewards_and_gae_match_the_worked_numbers():
    rewards = token_rewards(jnp.array([1.5]), kl_estimate(OLD, REF, "k1"), MASK, 0.01)
    close(rewards, [[-0.002, 0.001, -0.005, 1.5]])
    adv, ret = golden_advantages(0.99)
    close(adv, [[0.9673188, 1.08012, 0.888, 0.7]])
    close(ret, [[1.4673188, 1.48012, 1.488, 1.5]])
    adv, ret = golden_advantages(0.95)
    close(adv, [[0.8651, 1.018, 0.86, 0.7]])
    close(ret, [[1.3651, 1.418, 1.46, 1.5]])


def test_lambda_one_returns_are_the_reward_to_go():
    rewards = token_rewards(jnp.array([1.5]), kl_estimate(OLD, REF, "k1"), MASK, 0.01)
    _, ret = golden_advantages(1.0)
    close(ret, [[1.494, 1.496, 1.495, 1.5]])
    close(ret, jnp.cumsum(rewards[:, ::-1], axis=1)[:, ::-1])  # gamma = 1: values cancel exactly


def test_whitening_matches_the_worked_numbers():
    adv, _ = golden_advantages(0.99)
    close(masked_whiten(adv, MASK), [[0.3653573, 1.0703414, -0.1303688, -1.3053299]])


def test_policy_loss_ratio_and_clipfrac_match_the_worked_numbers():
    adv, _ = golden_advantages(0.99)
    loss, metrics = ppo_policy_loss(NEW, OLD, adv)
    close(metrics["ratio"], [[1.1051709, 0.9048374, 1.6487213, 1.0]])
    close(loss, [[-1.0690526, -0.977333, -1.0656, -0.7]])
    weights = aggregation_weights(MASK, "token-mean")
    close(aggregate(loss, weights, MASK), -0.9529964)
    close(aggregate(metrics["clipped"], weights, MASK), 0.25)


def test_value_loss_matches_the_worked_numbers():
    _, ret = golden_advantages(0.99)
    close(value_loss(V_NEW, V, ret)[0].mean(), 0.0806637)
    clipped, metrics = value_loss(V_NEW, V, ret, value_clip=0.2)
    close(clipped.mean(), 0.2608417)
    close(metrics["vf_clipped"], [[1.0, 1.0, 1.0, 1.0]])


def test_group_advantages_match_the_worked_numbers():
    group = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    close(group_advantages(group), [[0.8660239, -0.8660239, -0.8660239, 0.8660239]])
    close(group_advantages(group, ddof=0), [[0.999998, -0.999998, -0.999998, 0.999998]])
    close(group_advantages(group, eps=1e-4), [[0.8658754, -0.8658754, -0.8658754, 0.8658754]])  # TRL's eps
    close(group_advantages(group, scale="none"), [[0.5, -0.5, -0.5, 0.5]])
    # A constant group is exactly 0, even where r - mean(r) has rounding noise (0.1 * 3 / 3 != 0.1).
    assert np.all(np.asarray(group_advantages(jnp.array([[0.1, 0.1, 0.1], [0.77, 0.77, 0.77]]))) == 0.0)
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(jnp.array([[0.5], [0.2]]))


def test_dual_clip_bounds_negative_advantages():
    adv = jnp.array([[-1.0, 1.0]])
    logp, old = jnp.array([[2.0, 2.0]]), jnp.zeros((1, 2))
    plain, _ = ppo_policy_loss(logp, old, adv)
    dual, _ = ppo_policy_loss(logp, old, adv, RLLossConfig(dual_clip=3.0))
    close(plain, [[np.exp(2.0), -1.2]], atol=1e-5)
    close(dual, [[3.0, -1.2]])  # only the A < 0 token is capped at -A * c


def test_entropy_from_logits_is_the_softmax_entropy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 11)) * 3.0, jnp.float32)
    for tau in (1.0, 0.7):
        p = np.asarray(jax.nn.softmax(logits / tau, axis=-1), np.float64)
        close(entropy_from_logits(logits, tau), -(p * np.log(p)).sum(-1), atol=1e-5)


def test_running_moments_chan_update_equals_one_big_batch():
    x = np.random.default_rng(0).normal(1.3, 2.0, 24).astype(np.float32)
    merged = RunningMoments.init().update(jnp.asarray(x[:5])).update(jnp.asarray(x[5:17])).update(jnp.asarray(x[17:]))
    close(merged.mean, x.mean(), atol=1e-5)
    close(merged.var, x.var(), atol=1e-5)  # population variance, as xtuner's torch.var_mean(unbiased=False)
    close(merged.count, 24)
    valid = jnp.asarray(np.arange(24) < 10)
    masked = RunningMoments.init().update(jnp.asarray(x), valid).update(jnp.zeros(3), jnp.zeros(3, bool))
    close(masked.mean, x[:10].mean(), atol=1e-5)  # padding rows, and an all-padding batch, change nothing
    close(masked.var, x[:10].var(), atol=1e-5)
    leaves = jax.tree_util.tree_leaves(jax.jit(lambda m: m.update(jnp.ones(2)))(masked))
    assert len(leaves) == 3  # a pytree: it lives in the checkpointed RL state


def test_shape_scores_penalises_clips_then_normalises():
    cfg = RLLossConfig(missing_stop_penalty=1.0)
    raw = jnp.array([7.3, 0.77, -2.2, 0.5])
    stopped = jnp.array([True, True, True, False])
    scores, moments = shape_scores(raw, stopped, RunningMoments.init(), cfg)
    clipped = np.array([5.0, 0.77, -2.2, -0.5])  # 7.3 clipped to 5; the truncated 0.5 pays 1.0
    close(moments.mean, clipped.mean(), atol=1e-5)
    close(scores, (clipped - clipped.mean()) / (clipped.std() + 1e-8), atol=1e-5)
    plain, same = shape_scores(raw, stopped, moments, RLLossConfig(reward_normalize="none"))
    close(plain, [5.0, 0.77, -2.2, 0.5])
    assert same is moments


def test_adaptive_kl_is_off_by_default_and_proportional():
    assert kl_controller(RLLossConfig()) is None
    ctl = kl_controller(RLLossConfig(kl_target=6.0, kl_horizon=100))
    assert ctl == AdaptiveKL(6.0, 100)
    close(ctl.update(0.1, 12.0, 10), 0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    close(ctl.update(0.1, 5.7, 10), 0.1 * (1 - 0.05 * 10 / 100))


# ------------------------------------------------------------------------------- §3.1 item 2: GAE against verl


def verl_gae(rewards, values, mask, gamma, lam):
    """numpy transcription of verl compute_gae_advantage_return (trainer/ppo/core_algos.py @b178a3cd)."""
    nextvalues, lastgaelam, reversed_adv = 0.0, 0.0, []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = np.stack(reversed_adv[::-1], axis=1)
    return advantages, advantages + values


@pytest.mark.parametrize("layout", ["end_padding", "no_padding", "interleaved_holes"])
def test_gae_matches_verl_loop(layout):
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(3, 10)).astype(np.float32)
    values = rng.normal(size=(3, 10)).astype(np.float32)
    if layout == "end_padding":
        mask = (np.arange(10) < np.array([[10], [6], [3]])).astype(np.float32)
    elif layout == "no_padding":
        mask = np.ones((3, 10), np.float32)
    else:
        mask = np.array([[1, 1, 0, 0, 1, 1, 1, 0, 1, 0],
                         [0, 0, 1, 1, 1, 0, 1, 1, 0, 0],
                         [1, 0, 1, 0, 1, 0, 1, 0, 1, 1]], np.float32)
    for gamma, lam in ((1.0, 0.99), (0.9, 0.95)):
        want_adv, want_ret = verl_gae(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
        adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
        on = mask > 0
        close(np.asarray(adv)[on], want_adv[on], atol=1e-5)
        close(np.asarray(ret)[on], want_ret[on], atol=1e-5)
        assert np.all(np.asarray(adv)[~on] == 0) and np.all(np.asarray(ret)[~on] == 0)


# ------------------------------------------------------------------------------- §3.1 item 3: score placement


def test_score_lands_on_the_last_response_token_never_the_first_pad():
    # Row 0: 2 prompt targets, 3 response targets (the last is the stop token), 3 pads. Row 1: 4 response targets
    # reaching the end of the row. Row 2: no response at all (a padding row). Non-integer scores throughout.
    mask = jnp.array([[0, 0, 1, 1, 1, 0, 0, 0],
                      [0, 0, 0, 0, 1, 1, 1, 1],
                      [0, 0, 0, 0, 0, 0, 0, 0]], jnp.float32)
    scores = jnp.array([0.77, -2.2, 0.77])
    rewards = np.asarray(token_rewards(scores, jnp.zeros((3, 8)), mask, 0.01))
    expected = np.zeros((3, 8), np.float32)
    expected[0, 4], expected[1, 7] = 0.77, -2.2
    np.testing.assert_array_equal(rewards, expected)
    assert rewards[0, 5] == 0.0  # the first pad (where TRL puts it, trl #3750)
    np.testing.assert_array_equal(np.asarray(last_response_position(mask)).sum(-1), [1, 1, 0])
    kl = jnp.full((3, 8), 0.3)
    with_kl = np.asarray(token_rewards(scores, kl, mask, 0.01))
    close(with_kl, expected - 0.003 * np.asarray(mask))  # the penalty only on response tokens


# ----------------------------------------------------------------------------------- §3.1 item 4: packed GAE


def test_packed_gae_equals_each_sample_alone():
    rng = np.random.default_rng(2)
    rewards = jnp.asarray(rng.normal(size=(1, 12)).astype(np.float32))
    values = jnp.asarray(rng.normal(size=(1, 12)).astype(np.float32))
    # Sample A: targets 0-4 (prompt 0-1, response 2-4); sample B: targets 5-9 (prompt 5-7, response 8-9); pad 10-11.
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]])
    mask = jnp.array([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0]], jnp.float32)
    packed_adv, packed_ret = gae(rewards, values, mask, 1.0, 0.95, segment_ids=seg)
    for sample in (1, 2):
        alone = mask * (seg == sample)
        adv, ret = gae(rewards, values, alone, 1.0, 0.95)
        on = np.asarray(alone) > 0
        close(np.asarray(packed_adv)[on], np.asarray(adv)[on])
        close(np.asarray(packed_ret)[on], np.asarray(ret)[on])
    leaky, _ = gae(rewards, values, mask, 1.0, 0.95)  # no reset: B's first value leaks into A's last delta
    assert abs(float(leaky[0, 4] - packed_adv[0, 4])) > 1e-3


# ---------------------------------------------------------------------------- §3.1 item 5: aggregation invariance


def toy_batch(rows=8, T=6, feats=5, vocab=7):
    """A linear 'policy' and 'critic' on random features: enough to give the aggregation real gradients."""
    rng = np.random.default_rng(3)
    lengths = np.array([6, 1, 3, 5, 2, 6, 4, 3])
    mask = (np.arange(T) < lengths[:, None]).astype(np.float32)
    mask[0, 2] = 0.0  # a hole inside a response (a tool turn)
    batch = dict(x=rng.normal(size=(rows, T, feats)), targets=rng.integers(0, vocab, (rows, T)),
                 old_logp=rng.normal(-2.0, 0.3, (rows, T)), ref_logp=rng.normal(-2.0, 0.3, (rows, T)),
                 advantages=rng.normal(size=(rows, T)), old_values=rng.normal(size=(rows, T)),
                 returns=rng.normal(size=(rows, T)), mask=mask)
    batch = {k: jnp.asarray(v, jnp.int32 if k == "targets" else jnp.float32) for k, v in batch.items()}
    params = dict(w=jnp.asarray(rng.normal(size=(feats, vocab)) * 0.3, jnp.float32),
                  u=jnp.asarray(rng.normal(size=(feats,)), jnp.float32))
    return params, batch


def micro_sums(params, part, weights, cfg):
    """What one micro-batch contributes: sum of w * per-token loss for the actor plus the same for the critic (they
    touch disjoint parameters, w and u, so one gradient holds both), with (actor sum, critic sum, mask sum)."""
    logits = part["x"] @ params["w"]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), part["targets"][..., None], axis=-1)[..., 0]
    pg, _ = ppo_policy_loss(logp, part["old_logp"], part["advantages"], cfg)
    actor = (pg + cfg.kl_coef * kl_estimate(logp, part["ref_logp"], cfg.kl_estimator)
             - 0.01 * entropy_from_logits(logits))
    vloss, _ = value_loss(part["x"] @ params["u"], part["old_values"], part["returns"], 0.2)
    actor_sum, count = weighted_sums(actor, weights, part["mask"])
    critic_sum, _ = weighted_sums(vloss, part["mask"], part["mask"])  # the critic is always token-mean
    return actor_sum + critic_sum, jnp.stack([actor_sum, critic_sum, count])


micro_step = jax.jit(jax.value_and_grad(micro_sums, has_aux=True), static_argnums=3)  # one compile per shape


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_is_exact_under_micro_batching_and_row_order(loss_agg):
    cfg = RLLossConfig.grpo(loss_agg=loss_agg)
    params, batch = toy_batch()
    weights = aggregation_weights(batch["mask"], loss_agg, max_len=6)  # over the whole mini-batch, then split

    def loss_and_grads(order, micro_batches):
        sums, grads = 0.0, None
        for idx in np.array_split(order, micro_batches):
            part = {k: v[idx] for k, v in batch.items()}
            (_, part_sums), g = micro_step(params, part, weights[idx], cfg)
            sums = sums + part_sums
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        count = sums[2]  # what the train step does: divide the accumulated sums by the accumulated count
        return sums[:2] / count, jax.tree.map(lambda a: a / count, grads)

    rows = np.arange(8)
    want_loss, want_grads = loss_and_grads(rows, 1)
    for order in (rows, np.random.default_rng(4).permutation(8)):
        for micro_batches in (1, 2, 4):
            got_loss, got_grads = loss_and_grads(order, micro_batches)
            close(got_loss, want_loss)
            jax.tree.map(lambda a, b: close(a, b), got_grads, want_grads)

    # The weights are the definition: check them against the aggregate written directly.
    logits = batch["x"] @ params["w"]
    per_token = entropy_from_logits(logits)
    m = batch["mask"]
    if loss_agg == "token-mean":
        direct = (per_token * m).sum() / m.sum()
    elif loss_agg == "seq-mean-token-mean":
        direct = jnp.mean((per_token * m).sum(-1) / m.sum(-1))
    else:
        direct = (per_token * m).sum() / (8 * 6)
    close(aggregate(per_token, weights, m), direct, atol=1e-5)


def test_naive_micro_batch_means_are_not_exact():
    """The control for the test above: averaging each micro-batch's own token-mean changes the loss."""
    _, batch = toy_batch()
    per_token, m = batch["advantages"], batch["mask"]
    exact = aggregate(per_token, aggregation_weights(m), m)
    naive = np.mean([aggregate(per_token[i], m[i], m[i]) for i in np.array_split(np.arange(8), 4)])
    assert abs(float(exact) - float(naive)) > 1e-3


# --------------------------------------------------------------------------------- §3.1 item 6: config errors


def test_k1_as_a_loss_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="kl_estimator"):
        RLLossConfig(kl_placement="loss", kl_estimator="k1")
    with pytest.raises(ConfigError, match="kl_estimator"):
        RLLossConfig.grpo(kl_estimator="k1")
    RLLossConfig(kl_placement="reward", kl_estimator="k1")  # the InternLM2 default stays valid


@pytest.mark.parametrize("field, value", [("kl_estimator", "k4"), ("kl_placement", "advantage"), ("lam", 1.5),
                                          ("clip_eps", 0.0), ("dual_clip", 1.0), ("value_clip", -0.2),
                                          ("reward_clip", (5.0, -5.0)), ("reward_normalize", "static"),
                                          ("loss_agg", "sum"), ("group_scale", "std"), ("group_ddof", 2)])
def test_bad_config_values_name_their_field(field, value):
    with pytest.raises(ConfigError, match=field):
        RLLossConfig(**{field: value})


def test_defaults_are_internlm2s():
    cfg = RLLossConfig()
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.kl_placement, cfg.gamma, cfg.lam, cfg.clip_eps) == (
        0.01, "k1", "reward", 1.0, 0.99, 0.2)
    assert cfg.value_clip is None and cfg.whiten_advantages is False and cfg.kl_target is None
    assert cfg.reward_clip == (-5.0, 5.0) and cfg.reward_normalize == "running"
    with pytest.raises(ConfigError, match="max_len"):
        aggregation_weights(MASK, "seq-mean-token-sum-norm")


# -------------------------------------------------------------------------- §3.2: TRL's masked_whiten, transcribed


def trl_masked_whiten(values, mask, shift_mean=True):
    """numpy transcription of TRL masked_mean/masked_var(unbiased=True)/masked_whiten (trl @f2cd5771,
    trl/experimental/ppo/ppo_trainer.py); TRL 1.16 no longer ships its PPO trainer, so the formula is inlined."""
    mean = (values * mask).sum() / mask.sum()
    variance = (((values - mean) ** 2) * mask).sum() / mask.sum()
    variance = variance * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) / np.sqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def test_masked_whiten_matches_trl():
    rng = np.random.default_rng(5)
    values = rng.normal(0.4, 1.7, (4, 9))
    mask = (rng.random((4, 9)) > 0.3).astype(np.float64)
    for shift_mean in (True, False):
        got = masked_whiten(jnp.asarray(values, jnp.float32), jnp.asarray(mask), shift_mean=shift_mean)
        on = mask > 0
        close(np.asarray(got)[on], trl_masked_whiten(values, mask, shift_mean)[on], atol=1e-5)
    biased = masked_whiten(jnp.asarray(values, jnp.float32), jnp.asarray(mask), unbiased=False)  # OpenRLHF's form
    sel = values[mask > 0]
    close(np.asarray(biased)[mask > 0], (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8), atol=1e-5)


# ------------------------------------------------------------------------------ §3.3 the exact-expectation bandit

PI_REF = jnp.array([0.7, 0.2, 0.05, 0.05])
BANDIT_REWARD = jnp.array([0.0, 0.0, 2.0, 0.0])
BETA = 0.5
PI_STAR_REVERSE = [0.1902, 0.0543, 0.7418, 0.0136]  # pi_ref * e^(r / beta), normalised
PI_STAR_FORWARD = [0.1722, 0.0492, 0.7663, 0.0123]  # beta * pi_ref / (lambda - r)


def bandit_rows(theta):
    """Every token of the vocabulary as a one-token response row, weighted by stop-gradient pi(y): sums over
    rows are exact expectations under pi. The old policy is the current one (rho = 1 at each step)."""
    logp = jax.nn.log_softmax(theta)[:, None]
    return logp, sg(logp), sg(jnp.exp(logp)), jnp.ones((4, 1))


def ppo_bandit_loss(theta):
    cfg = RLLossConfig(kl_coef=BETA, lam=1.0, reward_normalize="none")  # k1 in the reward, gamma = lambda = 1
    logp, old, weight, mask = bandit_rows(theta)
    kl = kl_estimate(old, jnp.log(PI_REF)[:, None], cfg.kl_estimator, cfg.kl_clamp)
    rewards = token_rewards(BANDIT_REWARD, kl, mask, cfg.kl_coef)
    advantages, _ = gae(rewards, jnp.zeros_like(rewards), mask, cfg.gamma, cfg.lam)  # no critic: V = 0
    pg, _ = ppo_policy_loss(logp, old, advantages, cfg)
    return jnp.sum(weight * pg)


def grpo_bandit_loss(estimator):
    def loss(theta):
        logp, old, weight, _ = bandit_rows(theta)
        # The whole vocabulary is one group; "none": dividing by the group std would rescale the effective beta.
        advantages = group_advantages(BANDIT_REWARD[None], scale="none")[0][:, None]
        pg, _ = ppo_policy_loss(logp, old, advantages)
        # kl_estimate directly (not through RLLossConfig), so the refused k1-as-a-loss can show why it is refused.
        return jnp.sum(weight * (pg + BETA * kl_estimate(logp, jnp.log(PI_REF)[:, None], estimator)))

    return loss


def descend(loss, steps=2000, lr=1.0):
    grad = jax.grad(loss)
    theta = jax.jit(lambda t: jax.lax.fori_loop(0, steps, lambda _, t: t - lr * grad(t), t))(jnp.log(PI_REF))
    return np.asarray(jax.nn.softmax(theta))


@pytest.mark.parametrize("name, loss, expected", [
    ("ppo_k1_in_reward", ppo_bandit_loss, PI_STAR_REVERSE),
    ("grpo_k2_in_loss", grpo_bandit_loss("k2"), PI_STAR_REVERSE),
    ("grpo_k3plus_in_loss", grpo_bandit_loss("k3+"), PI_STAR_REVERSE),
    ("grpo_k3_in_loss", grpo_bandit_loss("k3"), PI_STAR_FORWARD),
])
def test_bandit_converges_to_the_kl_regularised_optimum(name, loss, expected):
    close(descend(loss), expected, atol=1e-3)


def test_bandit_with_k1_as_a_loss_is_unregularised():
    pi = descend(grpo_bandit_loss("k1"))
    assert pi[2] > 0.999  # drifts to one-hot on the rewarded token: the KL term contributed no gradient
