"""The preference losses as formulas on per-pair numbers: the COOL RLHF reward loss (spec §7.1), DPO / IPO and ORPO.

Everything here is elementwise over pairs, so the same functions serve the packed training steps, the tests against
the spec's numbers (§11.8) and anyone checking a value by hand.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

RANK_LOSSES = ("focal", "ranking")
DPO_LOSSES = ("sigmoid", "ipo")


def ranking_loss(delta: jax.Array) -> jax.Array:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected)."""
    return -jax.nn.log_sigmoid(delta)


def focal_ranking_loss(delta: jax.Array, gamma: float = 2.0) -> jax.Array:
    """InternLM2's difficulty-decayed ranking loss: -(1 - 2 max(0, P - 1/2))^gamma log P, P = sigmoid(delta).

    Pairs the model already ranks confidently (P -> 1) are down-weighted; pairs with P <= 1/2 keep the full loss."""
    p = jax.nn.sigmoid(delta)
    return (1.0 - 2.0 * jax.nn.relu(p - 0.5)) ** gamma * ranking_loss(delta)


def log_barrier_penalty(score: jax.Array, lower: float = -5.0, upper: float = 5.0,
                        epsilon: float = 1e-3) -> jax.Array:
    """-(log(x - lower) + log(upper - x)), with x clamped to [lower + eps, upper - eps] first (as XTuner does), so
    a score outside the barrier gives a large finite penalty and a zero gradient instead of NaN."""
    x = jnp.clip(score.astype(jnp.float32), lower + epsilon, upper - epsilon)
    return -(jnp.log(x - lower) + jnp.log(upper - x))


@dataclasses.dataclass(frozen=True)
class RewardLossConfig:
    rank_loss: str = "focal"  # "focal" (InternLM2) or "ranking" (plain Bradley-Terry)
    gamma: float = 2.0
    penalty_weight: float = 0.02  # the report's lambda; XTuner's default is 0.01
    lower: float = -5.0
    upper: float = 5.0

    def __post_init__(self):
        if self.rank_loss not in RANK_LOSSES:
            raise ValueError(f"rank_loss must be one of {RANK_LOSSES}, got {self.rank_loss!r}")
        if self.penalty_weight < 0:
            raise ValueError(f"penalty_weight must be >= 0, got {self.penalty_weight}")
        if not self.lower < self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")


def reward_pair_loss(chosen: jax.Array, rejected: jax.Array, cfg: RewardLossConfig = RewardLossConfig()):
    """Per pair: the rank loss of (chosen - rejected) plus lambda times the barrier on both scores."""
    delta = chosen - rejected
    rank = focal_ranking_loss(delta, cfg.gamma) if cfg.rank_loss == "focal" else ranking_loss(delta)
    penalty = log_barrier_penalty(chosen, cfg.lower, cfg.upper) + log_barrier_penalty(rejected, cfg.lower, cfg.upper)
    return rank + cfg.penalty_weight * penalty


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    loss: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: the probability that a preference label is flipped

    def __post_init__(self):
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"loss must be one of {DPO_LOSSES}, got {self.loss!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def dpo_pair_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                  cfg: DPOConfig = DPOConfig()) -> jax.Array:
    """Per pair, from sequence log-probabilities (summed for DPO, per-token means for IPO, see `dpo_objective`):

    h = (pi_c - ref_c) - (pi_r - ref_r);  sigmoid: -(1 - e) log s(beta h) - e log s(-beta h);  ipo: (h - 1/(2 beta))^2.
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if cfg.loss == "ipo":
        return (h - 1.0 / (2.0 * cfg.beta)) ** 2
    e = cfg.label_smoothing
    return -(1.0 - e) * jax.nn.log_sigmoid(cfg.beta * h) - e * jax.nn.log_sigmoid(-cfg.beta * h)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0, where 1 - exp(x)
    cancels, and log1p(-exp(x)) below -log 2, where expm1 would round to -1."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


# A mean log-probability of 0 (a probability of 1, or a padded pair slot with no tokens) has infinite odds; capped
# here, the odds stay finite (log odds <= ~16) and masked-out pairs cannot put NaN into the sums or gradients.
MAX_MEAN_LOGPROB = -1e-7


def log_odds(mean_logprob: jax.Array) -> jax.Array:
    """log(p / (1 - p)) with log p = `mean_logprob`, the per-token average log-probability of a response."""
    x = jnp.minimum(mean_logprob.astype(jnp.float32), MAX_MEAN_LOGPROB)
    return x - log1mexp(x)


def orpo_pair_loss(chosen: jax.Array, rejected: jax.Array, beta: float = 0.1) -> jax.Array:
    """ORPO (Hong et al. 2024) per pair, from the responses' per-token average log-probabilities:

    -chosen (the chosen response's mean NLL)  +  beta * -log sigmoid(log odds(chosen) - log odds(rejected))."""
    return -chosen + beta * -jax.nn.log_sigmoid(log_odds(chosen) - log_odds(rejected))
