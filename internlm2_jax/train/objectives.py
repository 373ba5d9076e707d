"""What a train step minimises: the LM loss (pretraining and SFT), the reward-model loss and DPO, on packed rows.

An `Objective` is a model class plus a loss `(graphdef, params, batch, rng, chunk_size) -> (loss_sum, count,
sums)`: the summed loss, what it is averaged over (tokens or pairs) and summed metrics, so gradient accumulation
stays exact and the step stays one function for every kind of training.

Preference rows (`data.conversations.pack_pairs`) hold whole pairs: in each row, pair k is segment 2k+1 (chosen)
then segment 2k+2 (rejected), and `pair_mask [batch, max_pairs]` says which pairs exist. Attention never crosses a
segment, so a packed pair scores exactly as it would alone. A reward sample's score is read at the last token of
its segment (the reward token the data appends); a DPO sequence's log-probability is the sum over its response
tokens (`loss_mask`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.model.lora import is_lora_path
from internlm2_jax.train.loss import Batch, next_token_loss
from internlm2_jax.train.preference_loss import DPOConfig, RewardLossConfig, dpo_pair_loss, reward_pair_loss

LossFn = Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: LossFn
    model_class: type = InternLM2ForCausalLM
    count_name: str = "tokens"  # what the loss is averaged over


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[batch, num_segments]: the sum of `values` over each row's segment s + 1 (exact: a masked sum, no matmul)."""
    onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    return jnp.sum(jnp.where(onehot, values[..., None].astype(jnp.float32), 0.0), axis=1)


def last_token_mask(segment_ids: jax.Array) -> jax.Array:
    """True at the last token of every segment (padding excluded)."""
    following = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    return (segment_ids != 0) & (segment_ids != following)


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
    at_end = jnp.where(last_token_mask(segments), scores, 0.0)
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

    return Objective("reward", loss, InternLM2ForRewardModel, "pairs")


def sequence_logprobs(model: InternLM2ForCausalLM, batch: Batch, *, chunk_size: int = 1024, rng=None):
    """Per segment: (summed log-probability of its response tokens, their number), each [batch, 2 * max_pairs]."""
    hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True,
                   dropout_rng=rng)
    logprobs = model.token_logprobs(hidden, batch["targets"], chunk_size=chunk_size)
    mask = batch["loss_mask"].astype(jnp.float32)
    segments = 2 * batch["pair_mask"].shape[1]
    return (segment_sums(logprobs * mask, batch["segment_ids"], segments),
            segment_sums(mask, batch["segment_ids"], segments))


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

    return Objective("dpo", loss, InternLM2ForCausalLM, "pairs")
