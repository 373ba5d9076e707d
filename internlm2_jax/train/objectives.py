"""What a train step minimises: the LM loss (pretraining and SFT), the reward-model loss, DPO and ORPO, on packed
rows, and the objective configs an experiment names (`Experiment.objective`, registered in `train.registry`).

An `Objective` is a model class plus a loss `(graphdef, params, batch, rng, chunk_size) -> (loss_sum, count,
sums)`: the summed loss, what it is averaged over (tokens or pairs) and summed metrics, so gradient accumulation
stays exact and the step stays one function for every kind of training. It also says which rows it trains on
(`rows`), so the launcher can check the data format and build the batch shapes without knowing the objective.

Preference rows (`data.conversations.pack_pairs`) hold whole pairs: in each row, pair k is segment 2k+1 (chosen)
then segment 2k+2 (rejected), and `pair_mask [batch, max_pairs]` says which pairs exist. Attention never crosses a
segment, so a packed pair scores exactly as it would alone. A reward sample's score is read at the last token of
its segment (the reward token the data appends); a policy sequence's log-probability is the sum over its response
tokens (`loss_mask`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.model.layers import segment_max
from internlm2_jax.model.lora import is_lora_path
from internlm2_jax.train.loss import Batch, next_token_loss
from internlm2_jax.train.metrics import train_flops_per_token
from internlm2_jax.train.preference_loss import (DPOConfig, RewardLossConfig, dpo_pair_loss, log_odds, orpo_pair_loss,
                                                 reward_pair_loss)
from internlm2_jax.train.registry import register_objective

LossFn = Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]

# What an objective's batches hold: packed text (pretraining, SFT), or packed preference pairs rendered for a reward
# model (domain system turn, reward token) or for a policy (loss mask on the responses). Data formats say which of
# these they give (`data_formats.register_data_format`).
ROWS = ("text", "reward_pairs", "policy_pairs")
PAIR_ROWS = ("reward_pairs", "policy_pairs")


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: LossFn
    model_class: type = InternLM2ForCausalLM
    count_name: str = "tokens"  # what the loss is averaged over
    rows: str = "text"  # one of ROWS
    # Compares with a frozen reference's log-probs: the policy with its adapters off under LoRA, otherwise the
    # launcher adds `reference_logps` from the starting weights to every batch.
    reference: bool = False
    # Small state beside the parameters (running statistics, an adaptive coefficient): `init_extra()` gives its
    # initial pytree, the loss then receives it as `extra=` (read-only), and after each step
    # `update_extra(extra, sums, count)` makes the next one from the step's summed metrics.
    init_extra: Callable[[], object] | None = None
    update_extra: Callable[..., object] | None = None

    def __post_init__(self):
        if self.rows not in ROWS:
            raise ValueError(f"objective {self.name!r}: rows must be one of {ROWS}, got {self.rows!r}")

    def flops_per_token(self, cfg, seq_len: int, *, trainable_params: int | None = None) -> float:
        """FLOPs per real token of this objective's step (MFU): a reward model has no vocabulary head, and a
        reference costs one more forward pass (the adapters-off policy, or the launcher's starting weights)."""
        return train_flops_per_token(cfg, seq_len, trainable_params=trainable_params,
                                     head=self.model_class is not InternLM2ForRewardModel,
                                     extra_forwards=int(self.reference))


class ObjectiveConfig(Protocol):
    """What `Experiment.objective` holds: a frozen dataclass of an objective's settings, with the `name` it is
    registered under (a field, so recorded configs say which objective they are) and `build()`."""

    name: str

    def build(self) -> Objective: ...


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[batch, num_segments]: the sum of `values` over each row's segment s + 1 (exact: a masked sum, no matmul)."""
    onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    return jnp.sum(jnp.where(onehot, values[..., None].astype(jnp.float32), 0.0), axis=1)


def last_token_mask(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """True at the last token of every segment (padding excluded): the one with its segment's largest position, in
    any token order (the zigzag layout puts a document's end anywhere in the row)."""
    return (segment_ids != 0) & (positions == segment_max(positions, segment_ids))


def pair_values(per_segment: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) [batch, max_pairs] from per-segment values laid out chosen, rejected, chosen, ..."""
    return per_segment[:, 0::2], per_segment[:, 1::2]


def _lm_loss(graphdef, params, batch: Batch, rng, chunk_size: int):
    loss_sum, count = next_token_loss(nnx.merge(graphdef, params), batch, chunk_size=chunk_size, dropout_rng=rng)
    return loss_sum, count, {}


LM = Objective("lm", _lm_loss)


def reward_scores(model: InternLM2ForRewardModel, batch: Batch, rng=None) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) scores [batch, max_pairs] of a packed pair batch."""
    scores = model(batch["input_ids"], batch["positions"], batch["segment_ids"], dropout_rng=rng)
    segments = batch["segment_ids"]
    at_end = jnp.where(last_token_mask(batch["positions"], segments), scores, 0.0)
    return pair_values(segment_sums(at_end, segments, 2 * batch["pair_mask"].shape[1]))


def pair_metrics(chosen: jax.Array, rejected: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Summed over real pairs (the step divides by their number): accuracy, margin, mean chosen/rejected value."""
    return {"accuracy": jnp.sum(mask * (chosen > rejected)), "margin": jnp.sum(mask * (chosen - rejected)),
            "chosen": jnp.sum(mask * chosen), "rejected": jnp.sum(mask * rejected)}


def reward_objective(cfg: RewardLossConfig = RewardLossConfig()) -> Objective:
    def loss(graphdef, params, batch: Batch, rng, chunk_size: int):
        chosen, rejected = reward_scores(nnx.merge(graphdef, params), batch, rng)
        mask = batch["pair_mask"].astype(jnp.float32)
        return (jnp.sum(mask * reward_pair_loss(chosen, rejected, cfg)), jnp.sum(mask),
                pair_metrics(chosen, rejected, mask))

    return Objective("reward", loss, InternLM2ForRewardModel, "pairs", rows="reward_pairs")


def sequence_logprobs(model: InternLM2ForCausalLM, batch: Batch, *, chunk_size: int = 1024, rng=None):
    """Per segment: (summed log-probability of its response tokens, their number), each [batch, 2 * max_pairs]."""
    hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True,
                   dropout_rng=rng)
    logprobs = model.token_logprobs(hidden, batch["targets"], chunk_size=chunk_size)
    mask = batch["loss_mask"].astype(jnp.float32)
    segments = 2 * batch["pair_mask"].shape[1]
    return (segment_sums(logprobs * mask, batch["segment_ids"], segments),
            segment_sums(mask, batch["segment_ids"], segments))


def pair_mean_logprobs(model: InternLM2ForCausalLM, batch: Batch, *, chunk_size: int = 1024, rng=None):
    """(chosen, rejected) [batch, max_pairs]: each response's per-token average log-probability (0 for no tokens),
    the length-normalised score of ORPO and SimPO."""
    sums, counts = sequence_logprobs(model, batch, chunk_size=chunk_size, rng=rng)
    return pair_values(sums / jnp.maximum(counts, 1.0))


def without_adapters(params: nnx.State) -> nnx.State:
    """The parameters with every LoRA B set to zero: the base model, without a second copy of its weights."""
    return nnx.map_state(lambda path, value: jnp.zeros_like(value) if "lora_b" in path else value, params)


def dpo_objective(cfg: DPOConfig = DPOConfig()) -> Objective:
    """DPO (or IPO) against a frozen reference: the batch's `reference_logps` [batch, 2 * max_pairs] when the data
    brings them (full fine-tuning: computed once by `sequence_logprobs` with the base weights), otherwise the
    policy with its LoRA adapters switched off."""

    def loss(graphdef, params, batch: Batch, rng, chunk_size: int):
        given = "reference_logps" in batch
        if not given and not any(is_lora_path("/".join(map(str, p))) for p, _ in nnx.to_flat_state(params)):
            raise ValueError("DPO needs a reference: pass `reference_logps` in the batch (full fine-tuning) "
                             "or train LoRA adapters (the reference is the policy without them)")
        policy, counts = sequence_logprobs(nnx.merge(graphdef, params), batch, chunk_size=chunk_size, rng=rng)
        if given:
            reference = batch["reference_logps"]
        else:
            base = jax.lax.stop_gradient(without_adapters(params))
            reference, _ = sequence_logprobs(nnx.merge(graphdef, base), batch, chunk_size=chunk_size)
        if cfg.loss == "ipo":  # IPO compares per-token average log-probabilities
            policy, reference = policy / jnp.maximum(counts, 1.0), reference / jnp.maximum(counts, 1.0)
        (pc, pr), (rc, rr) = pair_values(policy), pair_values(reference)
        mask = batch["pair_mask"].astype(jnp.float32)
        per_pair = dpo_pair_loss(pc, pr, rc, rr, cfg)
        metrics = pair_metrics(cfg.beta * (pc - rc), cfg.beta * (pr - rr), mask)
        return jnp.sum(mask * per_pair), jnp.sum(mask), metrics

    return Objective("dpo", loss, InternLM2ForCausalLM, "pairs", rows="policy_pairs", reference=True)


# ---- the objective configs: what an experiment names -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LMObjective:
    """Next-token cross-entropy on the loss-masked tokens of packed text (pretraining, SFT)."""

    name: str = dataclasses.field(default="lm", init=False)

    def build(self) -> Objective:
        return LM


@dataclasses.dataclass(frozen=True)
class RewardObjective(RewardLossConfig):
    """The conditional reward model (`RewardLossConfig`'s settings: `--set objective.penalty_weight=0.01`)."""

    name: str = dataclasses.field(default="reward", init=False)

    def build(self) -> Objective:
        return reward_objective(self)


@dataclasses.dataclass(frozen=True)
class DPOObjective(DPOConfig):
    """DPO or IPO against a frozen reference (`DPOConfig`'s settings: `--set objective.beta=0.2`)."""

    name: str = dataclasses.field(default="dpo", init=False)

    def build(self) -> Objective:
        return dpo_objective(self)


@dataclasses.dataclass(frozen=True)
class ORPOObjective:
    """ORPO (Hong et al. 2024, as XTuner ships it): the chosen response's NLL plus beta x the odds-ratio loss, on
    policy pairs and without a reference model (`preference_loss.orpo_pair_loss`). The NLL is each chosen
    response's mean over its tokens, so a packed pair weighs what it weighs alone."""

    beta: float = 0.1  # the paper's lambda; XTuner's default
    name: str = dataclasses.field(default="orpo", init=False)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")

    def build(self) -> Objective:
        beta = self.beta

        def loss(graphdef, params, batch: Batch, rng, chunk_size: int):
            chosen, rejected = pair_mean_logprobs(nnx.merge(graphdef, params), batch, chunk_size=chunk_size, rng=rng)
            mask = batch["pair_mask"].astype(jnp.float32)
            # Metrics as XTuner reports them: "rewards" are beta x the mean log-probs.
            metrics = {**pair_metrics(beta * chosen, beta * rejected, mask), "nll": jnp.sum(mask * -chosen),
                       "log_odds_ratio": jnp.sum(mask * (log_odds(chosen) - log_odds(rejected)))}
            return jnp.sum(mask * orpo_pair_loss(chosen, rejected, beta)), jnp.sum(mask), metrics

        return Objective("orpo", loss, InternLM2ForCausalLM, "pairs", rows="policy_pairs")


# The built-ins register the way an experiment file registers its own.
register_objective("lm", LMObjective)
register_objective("reward", RewardObjective)
register_objective("dpo", DPOObjective)
register_objective("orpo", ORPOObjective)
