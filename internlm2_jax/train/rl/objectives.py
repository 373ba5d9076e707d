"""The PPO/GRPO update objectives (§2.5): `Objective`s for the existing `make_train_step`, on `make_experience`
batches, so clipping, gradient accumulation, non-finite skipping and the sharded state come from the one step.

Both ignore the step's dropout rng: every RL forward is deterministic, otherwise the first update's ratio is not 1
(verl #550). Losses are weighted sums over response tokens with the experience's per-token weights (`pg_w`, exact
for one whole mini-batch) and the count is the response-token total, so the step's division gives the configured
aggregate under any micro-batching or mesh (`core.aggregation_weights`). Metrics are weighted sums too: the step
divides them by the same count, so each reads as a weighted per-token mean.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.train.loss import Batch
from internlm2_jax.train.objectives import Objective
from internlm2_jax.train.registry import register_objective
from internlm2_jax.train.rl.core import (RLLossConfig, entropy_from_logits, kl_estimate, ppo_policy_loss, value_loss,
                                         weighted_sums)

ROW_FIELDS = ("input_ids", "targets", "positions", "segment_ids", "response_mask")
ACTOR_FIELDS = (*ROW_FIELDS, "old_logp", "advantages", "pg_w")
CRITIC_FIELDS = (*ROW_FIELDS, "values", "returns")


def require_fields(objective: str, batch: Batch, fields: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
    missing = [name for name in (*fields, *extra) if name not in batch]
    if missing:
        raise ValueError(f"{objective}: the batch lacks {missing} (RL batches come from rl.make_experience)")


def policy_logprobs(model: InternLM2ForCausalLM, batch: Batch, *, temperature: float, chunk_size: int,
                    hidden: jax.Array | None = None) -> jax.Array:
    """Tempered log-probs [rows, T] of the targets, without dropout: what the experience records as old_logp and
    ref_logp and what the actor objective recomputes, by the same code so the on-policy ratio is exactly 1."""
    if hidden is None:
        hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True)
    return model.token_logprobs(hidden, batch["targets"], chunk_size=chunk_size, temperature=temperature)


def token_entropy(hidden: jax.Array, head: jax.Array, *, temperature: float, chunk_size: int) -> jax.Array:
    """Entropy [rows, T] of the tempered next-token distribution, a chunk of positions at a time (each chunk
    rematerialised when there are several), so no [rows, T, vocab] fp32 tensor exists (§1.6)."""
    rows, length, embed = hidden.shape
    chunk = min(chunk_size, length)
    pad = (-length) % chunk
    n = (length + pad) // chunk
    chunks = jnp.moveaxis(jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(rows, n, chunk, embed), 1, 0)

    def one_chunk(h):
        logits = jnp.einsum("bce,ev->bcv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        return entropy_from_logits(logits, temperature)

    if n > 1:
        one_chunk = jax.checkpoint(one_chunk)
    return jnp.moveaxis(jax.lax.map(one_chunk, chunks), 0, 1).reshape(rows, n * chunk)[:, :length]


def ppo_actor_objective(cfg: RLLossConfig, *, temperature: float = 1.0) -> Objective:
    """The clipped policy loss per response token, weighted by `pg_w`; GRPO's KL term when `kl_placement="loss"`
    (against the batch's `ref_logp`); an entropy bonus when `entropy_coef` > 0 (always a metric); and the PTX term
    when the batch carries `ptx_w` (pre-training rows mixed in, `experience.ptx_weights`): -log p at temperature 1
    on their tokens."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0 (the rollout's)")
    kl_in_loss = cfg.kl_placement == "loss"

    def loss(graphdef, params, batch: Batch, rng, chunk_size: int):
        del rng  # no dropout in RL forwards (module docstring)
        require_fields("ppo_actor", batch, ACTOR_FIELDS, ("ref_logp",) if kl_in_loss else ())
        model = nnx.merge(graphdef, params)
        hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True)
        logp = policy_logprobs(model, batch, temperature=temperature, chunk_size=chunk_size, hidden=hidden)
        entropy = token_entropy(hidden, model.head_weight(), temperature=temperature, chunk_size=chunk_size)
        if cfg.entropy_coef == 0:  # a metric only: no backward pass through a second vocabulary matmul
            entropy = jax.lax.stop_gradient(entropy)
        weights, mask = batch["pg_w"], batch["response_mask"]
        pg, per_token = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], cfg)
        total = pg - cfg.entropy_coef * entropy
        metrics = {"pg_loss": pg, "clipfrac": per_token["clipped"], "approx_kl": per_token["approx_kl"],
                   "approx_kl_k2": per_token["approx_kl_k2"], "entropy": entropy}
        if kl_in_loss:
            kl = kl_estimate(logp, batch["ref_logp"], cfg.kl_estimator, cfg.kl_clamp)
            total = total + cfg.kl_coef * kl
            metrics["kl_loss"] = kl
        loss_sum, count = weighted_sums(total, weights, mask)
        sums = {name: weighted_sums(value, weights, mask)[0] for name, value in metrics.items()}
        if "ptx_w" in batch:
            ptx_logp = logp if temperature == 1.0 else policy_logprobs(model, batch, temperature=1.0,
                                                                       chunk_size=chunk_size, hidden=hidden)
            ptx = jnp.sum(batch["ptx_w"] * -ptx_logp)
            loss_sum, sums["ptx_loss"] = loss_sum + ptx, ptx
        return loss_sum, count, sums

    # rows="text": RL batches come from the loop (make_experience), not from a data format; ROWS has no RL kind yet.
    return Objective("ppo_actor", loss, InternLM2ForCausalLM, "tokens")


def ppo_critic_objective(value_clip: float | None = None) -> Objective:
    """½ (V - R)² (optionally clipped around the experience's values) per response token, token-mean (§1.5)."""
    if value_clip is not None and not value_clip > 0:
        raise ValueError(f"value_clip={value_clip!r}: must be positive or None")

    def loss(graphdef, params, batch: Batch, rng, chunk_size: int):
        del rng, chunk_size  # no dropout (module docstring); no vocabulary head to chunk
        require_fields("ppo_critic", batch, CRITIC_FIELDS)
        values = nnx.merge(graphdef, params)(batch["input_ids"], batch["positions"], batch["segment_ids"])
        per_token, per_token_metrics = value_loss(values, batch["values"], batch["returns"], value_clip)
        mask = batch["response_mask"]
        loss_sum, count = weighted_sums(per_token, mask, mask)
        sums = {"vf_clipfrac": weighted_sums(per_token_metrics["vf_clipped"], mask, mask)[0],
                "value_mean": weighted_sums(values, mask, mask)[0]}
        return loss_sum, count, sums

    return Objective("ppo_critic", loss, InternLM2ForRewardModel, "tokens")


# ---- the objective configs (train.registry) ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PPOActorObjective(RLLossConfig):
    """The actor update (`RLLossConfig`'s knobs plus the rollout temperature); `PPOActorObjective.grpo()` for GRPO."""

    temperature: float = 1.0
    name: str = dataclasses.field(default="ppo_actor", init=False)

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: must be > 0 (the rollout's)")

    def build(self) -> Objective:
        return ppo_actor_objective(self, temperature=self.temperature)


@dataclasses.dataclass(frozen=True)
class PPOCriticObjective:
    """The critic update: value loss on response tokens, unclipped by default as InternLM2 [R]."""

    value_clip: float | None = None
    name: str = dataclasses.field(default="ppo_critic", init=False)

    def __post_init__(self):
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"value_clip={self.value_clip!r}: must be positive or None")

    def build(self) -> Objective:
        return ppo_critic_objective(self.value_clip)


register_objective("ppo_actor", PPOActorObjective)
register_objective("ppo_critic", PPOCriticObjective)
