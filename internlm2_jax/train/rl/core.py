"""The RL formulas as pure jnp functions over ``[rows, T]`` arrays aligned with ``targets`` (docs/rlhf.md §1).

No model here: KL estimators, per-token rewards, GAE and returns, whitening, GRPO group advantages, the clipped
policy and value losses, entropy, loss-aggregation weights, running reward moments and the adaptive KL controller.
The experience builder and the actor/critic objectives compose these; the tests check them against the spec's
worked numbers (§1.13) and against transcriptions of verl/TRL.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from internlm2_jax.config import ConfigError

KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
KL_PLACEMENTS = ("reward", "loss")
REWARD_NORMALIZE = ("running", "none")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GROUP_SCALES = ("group", "batch", "none")


@dataclasses.dataclass(frozen=True)
class RLLossConfig:
    """The knobs of the formulas below; defaults are InternLM2's (§1.12), field names as RLConfig (§2.9)."""

    kl_coef: float = 0.01  # beta [R "We set the KL divergence coefficient to 0.01"]
    kl_placement: str = "reward"  # PPO: a constant per-token reward; GRPO: a loss term
    kl_estimator: str = "k1"  # xtuner: k1 in the reward [X]
    kl_clamp: float | None = 10.0  # on the estimate (OpenRLHF +-10 [O]; verl clamps k3 to +-10 [V])
    kl_target: float | None = None  # adaptive controller (Ziegler et al.); None = fixed beta (InternLM2)
    kl_horizon: int = 10_000
    gamma: float = 1.0  # [X], InstructGPT "No discount" [I]
    lam: float = 0.99  # [R]
    clip_eps: float = 0.2  # [X]; clip_eps_high None = symmetric clip (DAPO raises it to 0.28)
    clip_eps_high: float | None = None
    dual_clip: float | None = None  # verl clip_ratio_c = 3.0 when enabled [V]
    log_ratio_clamp: float = 20.0  # before exp, as verl/OpenRLHF [V, O]
    value_clip: float | None = None  # [R "we do not apply value loss clipping"]
    whiten_advantages: bool = False  # [R "or advantage normalization"]
    reward_clip: tuple[float, float] = (-5.0, 5.0)  # xtuner clip_reward_min/max [X]
    reward_normalize: str = "running"  # xtuner norm_rewards=True [X]
    missing_stop_penalty: float | None = None  # TRL missing_eos_penalty [T]
    entropy_coef: float = 0.0  # [X][V]
    loss_agg: str = "token-mean"  # verl default; InternLM2 code [X]
    group_scale: str = "group"  # GRPO: divide by the group std [D]
    group_eps: float = 1e-6  # verl/tunix; TRL uses 1e-4 [V, U, T]
    group_ddof: int = 1  # Bessel, as verl/tunix/TRL

    def __post_init__(self):
        def need(ok, field, why):
            if not ok:
                raise ConfigError(f"{field}={getattr(self, field)!r}: {why}")

        need(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {KL_ESTIMATORS}")
        need(self.kl_placement in KL_PLACEMENTS, "kl_placement", f"must be one of {KL_PLACEMENTS}")
        # As a loss term k1's expected gradient is E_pi[grad log pi] = 0: no regularisation, only noise (§1.2;
        # tunix GRPO's default "kl" is exactly this). k1 is right only as a constant reward.
        need(not (self.kl_placement == "loss" and self.kl_estimator == "k1"), "kl_estimator",
             "k1 with kl_placement='loss' has zero expected gradient; use 'k2' (the reverse-KL gradient), "
             "'k3' (DeepSeekMath) or 'k3+', or put k1 in the reward")
        need(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        need(self.kl_clamp is None or self.kl_clamp > 0, "kl_clamp", "must be positive or None")
        need(self.kl_target is None or self.kl_target > 0, "kl_target", "must be positive or None")
        need(self.kl_horizon > 0, "kl_horizon", "must be positive")
        need(0.0 <= self.gamma <= 1.0, "gamma", "must be in [0, 1]")
        need(0.0 <= self.lam <= 1.0, "lam", "must be in [0, 1]")
        need(0.0 < self.clip_eps < 1.0, "clip_eps", "must be in (0, 1)")
        need(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", "must be positive or None")
        need(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip", "must be > 1 or None")
        need(self.log_ratio_clamp > 0, "log_ratio_clamp", "must be positive")
        need(self.value_clip is None or self.value_clip > 0, "value_clip", "must be positive or None")
        need(len(self.reward_clip) == 2 and self.reward_clip[0] < self.reward_clip[1], "reward_clip",
             "must be (lower, upper) with lower < upper")
        need(self.reward_normalize in REWARD_NORMALIZE, "reward_normalize", f"must be one of {REWARD_NORMALIZE}")
        need(self.missing_stop_penalty is None or self.missing_stop_penalty >= 0, "missing_stop_penalty",
             "must be >= 0 or None (it is subtracted from the score)")
        need(self.loss_agg in LOSS_AGGS, "loss_agg", f"must be one of {LOSS_AGGS}")
        need(self.group_scale in GROUP_SCALES, "group_scale", f"must be one of {GROUP_SCALES}")
        need(self.group_eps > 0, "group_eps", "must be positive")
        need(self.group_ddof in (0, 1), "group_ddof", "must be 0 or 1")

    @classmethod
    def grpo(cls, **overrides) -> RLLossConfig:
        """DeepSeekMath's GRPO: beta 0.04, k3 in the loss, per-sequence token means, no running reward norm [D]."""
        fields = dict(kl_coef=0.04, kl_placement="loss", kl_estimator="k3", loss_agg="seq-mean-token-mean",
                      reward_normalize="none")
        return cls(**{**fields, **overrides})


# ----------------------------------------------------------------------------------------------------------- KL


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1",
                clamp: float | None = 10.0) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi (Schulman's k1/k2/k3).

    With d = ref_logp - logp: k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1. "k3+" has k3's value and k2's gradient (verl's
    straight-through form: as a loss, k2's expected gradient is the reverse-KL gradient, k3's the forward one).
    """
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(f"kl_estimator={estimator!r}: must be one of {KL_ESTIMATORS}")
    d = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * jnp.square(d)
    else:
        d_safe = jnp.clip(d, -20.0, 20.0)  # verl clamps before exp: e^d overflows otherwise
        kl = jnp.exp(d_safe) - d_safe - 1.0
        if estimator == "k3+":
            k2 = 0.5 * jnp.square(d)
            k3 = kl if clamp is None else jnp.clip(kl, -clamp, clamp)
            return k2 + jax.lax.stop_gradient(k3 - k2)
    return kl if clamp is None else jnp.clip(kl, -clamp, clamp)


# ------------------------------------------------------------------------------------------------------ rewards


def last_response_position(response_mask: jax.Array) -> jax.Array:
    """[rows, T] float one-hot of the last response target position (the stop token when the response stopped).

    Rows without response tokens get all zeros. The score goes here, never on the first pad after it (trl #3750).
    """
    mask = response_mask > 0
    T = mask.shape[-1]
    last = T - 1 - jnp.argmax(mask[..., ::-1], axis=-1)  # argmax finds the first True of the reversed row
    onehot = jnp.arange(T) == last[..., None]
    return (onehot & jnp.any(mask, axis=-1, keepdims=True)).astype(jnp.float32)


def token_rewards(scores: jax.Array, kl: jax.Array, response_mask: jax.Array, kl_coef) -> jax.Array:
    """r[t] = -kl_coef * kl[t] on response tokens, plus the (already shaped) score at the last response position.

    scores: [rows] float (one sample per row); kl: [rows, T] from ``kl_estimate`` on old vs reference log-probs.
    Returns float32 [rows, T], zero off the response.
    """
    mask = response_mask.astype(jnp.float32)
    scores = scores.astype(jnp.float32)  # an int score array would truncate 0.77 to 0 (tunix, §3.1 item 3)
    return -kl_coef * kl.astype(jnp.float32) * mask + scores[..., None] * last_response_position(mask)


def shape_scores(raw_scores: jax.Array, stopped: jax.Array, moments: RunningMoments, cfg: RLLossConfig,
                 valid: jax.Array | None = None) -> tuple[jax.Array, RunningMoments]:
    """RM scores [rows] -> (scores to place, updated moments): missing-stop penalty, clip, running normalisation.

    Order as xtuner's KLGAERepeater [X]: clip, update the moments with this batch's clipped scores, then normalise
    with the updated moments. The penalty is in RM units, so it comes before the clip (TRL subtracts it from the
    raw score [T]). ``valid`` [rows] excludes padding rows from the moments.
    """
    s = raw_scores.astype(jnp.float32)
    if cfg.missing_stop_penalty is not None:
        s = s - cfg.missing_stop_penalty * (1.0 - stopped.astype(jnp.float32))
    s = jnp.clip(s, *cfg.reward_clip)
    if cfg.reward_normalize == "running":
        moments = moments.update(s, valid)
        s = moments.normalize(s)
    return s, moments


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunningMoments:
    """Running mean / (population) variance of seen values, a pytree of fp32 scalars for the checkpointed state.

    Chan et al.'s parallel update, as xtuner's RunningStates (from stable-baselines3) with an initial count of 0 [X]:
    the first batch sets the moments exactly.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def init(cls) -> RunningMoments:
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    def update(self, x: jax.Array, valid: jax.Array | None = None) -> RunningMoments:
        x = x.astype(jnp.float32).reshape(-1)
        w = jnp.ones_like(x) if valid is None else valid.astype(jnp.float32).reshape(-1)
        n = w.sum()
        safe_n = jnp.maximum(n, 1.0)
        batch_mean = (w * x).sum() / safe_n
        batch_var = (w * jnp.square(x - batch_mean)).sum() / safe_n  # biased, as torch.var_mean(unbiased=False)
        total = self.count + n
        safe_total = jnp.maximum(total, 1.0)
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + jnp.square(delta) * self.count * n / safe_total
        empty = n == 0  # an all-padding batch leaves the moments as they were
        return RunningMoments(mean=jnp.where(empty, self.mean, self.mean + delta * n / safe_total),
                              var=jnp.where(empty, self.var, m2 / safe_total),
                              count=total)

    @property
    def std(self) -> jax.Array:
        return jnp.sqrt(self.var)

    def normalize(self, x: jax.Array) -> jax.Array:
        return (x - self.mean) / (self.std + 1e-8)  # xtuner's (s - mean) / (sqrt(var) + 1e-8) [X]


# --------------------------------------------------------------------------------------------------- advantages


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0, lam: float = 0.99,
        segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns), both [rows, T] float32 and zero off the mask, by verl's masked skipping recursion.

    Going backwards, masked-out positions (prompt, padding, tool turns inside a response) pass the carry (next
    value, next advantage) through untouched, so the TD step jumps over them [V, U]. The end of a response is
    terminal (next value 0). ``segment_ids`` (packed rows): the carry is reset wherever the segment changes, so a
    sample's last delta never sees the next sample's first value. Returns = A + V, before any whitening.
    """
    r, v = rewards.astype(jnp.float32), values.astype(jnp.float32)
    m = mask > 0
    seg = jnp.zeros(r.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def step(carry, x):
        last, v_next, seg_next = carry
        r_t, v_t, m_t, seg_t = x
        same = seg_t == seg_next
        last, v_next = jnp.where(same, last, 0.0), jnp.where(same, v_next, 0.0)
        a_t = r_t + gamma * v_next - v_t + gamma * lam * last
        last, v_next = jnp.where(m_t, a_t, last), jnp.where(m_t, v_t, v_next)
        return (last, v_next, seg_t), last

    rows = r.shape[0]
    init = (jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.float32), seg[:, -1])
    _, adv = jax.lax.scan(step, init, (r.T, v.T, m.T, seg.T), reverse=True)
    adv = adv.T * m
    return adv, (adv + v) * m


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, unbiased: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the masked entries, as TRL's/verl's ``masked_whiten`` [T, V].

    ``unbiased`` = Bessel-corrected variance (TRL, verl, tunix); False gives OpenRLHF's biased form [O]. Must see the
    whole batch the statistics are meant over (the experience of an iteration), never a micro-batch.
    """
    x = x.astype(jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = mask.astype(jnp.float32).sum()
        var = var * n / (n - 1.0)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def constant_groups(rewards: jax.Array) -> jax.Array:
    """[groups] bool: every reward of the group is identical (no learning signal; TRL logs the fraction [T])."""
    return jnp.all(rewards == rewards[..., :1], axis=-1)


def group_advantages(rewards: jax.Array, scale: str = "group", eps: float = 1e-6, ddof: int = 1) -> jax.Array:
    """GRPO advantages [groups, G] from rewards [groups, G] (the G responses of one prompt in a row) [D].

    A = (r - mean_g) / (std + eps) with std over the group ("group"), over the whole batch ("batch", TRL
    scale_rewards="batch") or 1 ("none", Dr. GRPO). A constant group gets exactly 0 (no signal), not the
    rounding noise of r - mean(r) divided by eps.
    """
    if scale not in GROUP_SCALES:
        raise ConfigError(f"group_scale={scale!r}: must be one of {GROUP_SCALES}")
    if rewards.ndim != 2 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2 (a group of one has no baseline), "
                         f"got shape {rewards.shape}")
    r = rewards.astype(jnp.float32)
    centered = r - r.mean(axis=-1, keepdims=True)
    if scale == "group":
        centered = centered / (jnp.std(r, axis=-1, ddof=ddof, keepdims=True) + eps)
    elif scale == "batch":
        centered = centered / (jnp.std(r, ddof=ddof) + eps)
    return jnp.where(constant_groups(r)[:, None], 0.0, centered)


# ------------------------------------------------------------------------------------------------------- losses


def ppo_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                    cfg: RLLossConfig = RLLossConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token clipped surrogate max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)), optional dual clip.

    Returns (loss [rows, T], per-token metrics): ``clipped`` (1 where the clip is the active branch; its weighted
    mean is clipfrac), ``approx_kl`` (-log rho, verl/OpenRLHF "ppo_kl"), ``approx_kl_k2`` (log rho^2 / 2, TRL
    "approxkl"), ``ratio``. Aggregate loss and metrics with the same weights (``aggregation_weights``).
    """
    eps_high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    log_ratio = jnp.clip(logp.astype(jnp.float32) - old_logp.astype(jnp.float32),
                         -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    adv = advantages.astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    if cfg.dual_clip is not None:  # bounds the loss of a negative advantage at a huge ratio (verl clip_ratio_c)
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * cfg.dual_clip), loss)
    metrics = {"clipped": (clipped > unclipped).astype(jnp.float32),
               "approx_kl": -log_ratio,
               "approx_kl_k2": 0.5 * jnp.square(log_ratio),
               "ratio": ratio}
    return loss, metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
               value_clip: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token 1/2 (V - R)^2; with ``value_clip`` c, 1/2 max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2).

    InternLM2 does not clip [R]. Metrics: ``vf_clipped`` (1 where the clipped branch is larger), per token.
    """
    v, r = values.astype(jnp.float32), returns.astype(jnp.float32)
    plain = jnp.square(v - r)
    if value_clip is None:
        return 0.5 * plain, {"vf_clipped": jnp.zeros_like(plain)}
    v_old = old_values.astype(jnp.float32)
    clipped = jnp.square(v_old + jnp.clip(v - v_old, -value_clip, value_clip) - r)
    return 0.5 * jnp.maximum(plain, clipped), {"vf_clipped": (clipped > plain).astype(jnp.float32)}


def entropy_from_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """H = logsumexp(z) - sum softmax(z) z over the last axis, in fp32, z = logits / temperature (TRL/verl)."""
    z = logits.astype(jnp.float32) / temperature
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)


# -------------------------------------------------------------------------------------------------- aggregation


def aggregation_weights(response_mask: jax.Array, loss_agg: str = "token-mean",
                        max_len: int | None = None) -> jax.Array:
    """Per-token weights w [rows, T] in token units for one whole mini-batch (§2.4).

    Chosen so that sum(w * loss) / sum(response_mask) over the mini-batch is the requested aggregate, and both sums
    split exactly over any micro-batching, sharding or row order (each part sums its own w * loss and mask; the
    train step divides the totals). Compute them on the full mini-batch before splitting it.

    - ``token-mean``: every response token counts once (verl, OpenRLHF, InternLM2's code).
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (the GRPO paper).
    - ``seq-mean-token-sum-norm``: sum / (sequences * max_len), Dr. GRPO; ``max_len`` is the configured maximum
      response length (TRL uses max_completion_length), not the batch's longest.
    A "sequence" is a row with at least one response token (one sample per row).
    """
    if loss_agg not in LOSS_AGGS:
        raise ConfigError(f"loss_agg={loss_agg!r}: must be one of {LOSS_AGGS}")
    m = response_mask.astype(jnp.float32)
    if loss_agg == "token-mean":
        return m
    n_tokens = m.sum()
    lengths = m.sum(axis=-1, keepdims=True)
    n_seqs = (lengths > 0).sum()
    if loss_agg == "seq-mean-token-mean":
        return m * n_tokens / (n_seqs * jnp.maximum(lengths, 1.0))
    if max_len is None or max_len <= 0:
        raise ConfigError("max_len: seq-mean-token-sum-norm needs the configured maximum response length")
    return m * n_tokens / (n_seqs * max_len)


def weighted_sums(per_token: jax.Array, weights: jax.Array, response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of w * x, sum of response_mask): the two numbers a micro-batch contributes; divide the totals."""
    return (weights * per_token.astype(jnp.float32)).sum(), response_mask.astype(jnp.float32).sum()


def aggregate(per_token: jax.Array, weights: jax.Array, response_mask: jax.Array) -> jax.Array:
    """The aggregate over one whole mini-batch: sum(w * x) / sum(response_mask)."""
    total, count = weighted_sums(per_token, weights, response_mask)
    return total / count


# ------------------------------------------------------------------------------------------------ KL controller


@dataclasses.dataclass(frozen=True)
class AdaptiveKL:
    """Ziegler et al.'s proportional controller (verl AdaptiveKLController [V], OpenRLHF kl.target [O]):
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon). Off by default (kl_target None)."""

    target: float
    horizon: int = 10_000

    def __post_init__(self):
        if not self.target > 0:
            raise ConfigError(f"kl_target={self.target!r}: must be positive")
        if not self.horizon > 0:
            raise ConfigError(f"kl_horizon={self.horizon!r}: must be positive")

    def update(self, kl_coef: jax.Array, current_kl: jax.Array, n_steps) -> jax.Array:
        error = jnp.clip(current_kl / self.target - 1.0, -0.2, 0.2)
        return kl_coef * (1.0 + error * n_steps / self.horizon)


def kl_controller(cfg: RLLossConfig) -> AdaptiveKL | None:
    """The controller the config asks for, or None for a fixed coefficient."""
    return None if cfg.kl_target is None else AdaptiveKL(cfg.kl_target, cfg.kl_horizon)
