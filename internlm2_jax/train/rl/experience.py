"""Experience: rollout rows on the host, then one jitted pass that turns them into the actor/critic batch (§2.4).

`build_rows` lays out one sample per row (prompt then response, right-padded to a fixed length) with every per-token
field aligned with `targets`, as the train step and `token_logprobs` expect. `make_experience` then computes, in one
jit: the actor's old log-probs (temperature, no dropout), the reference's, the critic's values, per-token rewards from
the given RM scores, GAE advantages and returns (or GRPO group advantages) and the aggregation weights `pg_w`.

Not here yet (later slices): scoring the RM rows (the §2.4 step 4 splice of domain turn + prompt + response + reward
token; callers pass the scores), packing several samples per row (v2, segment-reset GAE is ready in `core.gae`),
and shuffling/splitting into mini-batches (each mini-batch needs its own `core.aggregation_weights`: they are exact
only over the rows they were computed on).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internlm2_jax.decode.rollout import Rollout
from internlm2_jax.model.lora import is_lora_path
from internlm2_jax.parallel.mesh import within_mesh_of
from internlm2_jax.train.objectives import without_adapters
from internlm2_jax.train.rl.core import (RLLossConfig, RunningMoments, aggregation_weights, gae, group_advantages,
                                         kl_estimate, masked_mean, masked_whiten, shape_scores, token_rewards)
from internlm2_jax.train.rl.objectives import policy_logprobs

ROW_FIELDS = ("input_ids", "targets", "positions", "segment_ids", "response_mask", "rollout_logp")
ALGORITHMS = ("ppo", "grpo")


@dataclasses.dataclass(frozen=True)
class ExperienceConfig:
    """How experience is computed beyond the formulas' knobs (`RLLossConfig`); static under jit."""

    algorithm: str = "ppo"  # "ppo": GAE over the critic's values; "grpo": group advantages, no critic
    temperature: float = 1.0  # the rollout's: old_logp must be the log-prob of the distribution sampled from
    group_size: int = 1  # GRPO's G (RolloutConfig.samples_per_prompt): rows are prompt-major groups of G
    max_response_len: int | None = None  # the configured max_new_tokens, for loss_agg="seq-mean-token-sum-norm"
    chunk_size: int = 1024  # sequence chunk of the log-prob computation (bounds the fp32 logits)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"ExperienceConfig.algorithm={self.algorithm!r}: must be one of {ALGORITHMS}")
        if not 0 < self.temperature < np.inf:
            raise ValueError(f"ExperienceConfig.temperature={self.temperature!r}: must be > 0 (the rollout's)")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError(f"ExperienceConfig.group_size={self.group_size!r}: GRPO needs groups of >= 2 responses "
                             "per prompt (a group of one has no baseline)")
        if self.chunk_size < 1:
            raise ValueError(f"ExperienceConfig.chunk_size={self.chunk_size!r}: must be >= 1")


# ------------------------------------------------------------------------------------------------------ host side


def build_rows(prompts, prompt_lengths, rollout: Rollout, pad_id: int, length: int | None = None) -> dict:
    """One sample per row: prompt ⊕ response, right-padded to `length` (default prompt width + max_new_tokens).

    prompts [B, P] right-padded with `prompt_lengths` [B]; the rollout's rows are prompt-major (row b * G + g is
    sample g of prompt b). Per-token fields are aligned with `targets` (the next token): `response_mask[t] = 1` iff
    `targets[t]` is a response token, the stop token included; `rollout_logp` is the sampler's log-prob of that
    target (a diagnostic against the recomputed `old_logp`). Returns numpy [rows, length] arrays (ROW_FIELDS).
    """
    prompts, prompt_lengths = np.asarray(prompts), np.asarray(prompt_lengths)
    tokens, logprobs, lengths = (np.asarray(x) for x in (rollout.tokens, rollout.logprobs, rollout.lengths))
    if prompts.ndim != 2 or prompt_lengths.shape != prompts.shape[:1]:
        raise ValueError(f"prompts must be [batch, width] with prompt_lengths [batch], got {list(prompts.shape)} "
                         f"and {list(prompt_lengths.shape)}")
    batch, width = prompts.shape
    rows, new = tokens.shape
    if rows % batch:
        raise ValueError(f"rollout.tokens has {rows} rows, not a multiple of the {batch} prompts (prompt-major groups)")
    length = width + new if length is None else length
    needed = int((np.repeat(prompt_lengths, rows // batch) + lengths).max(initial=0))
    if needed > length:
        raise ValueError(f"length={length}: the longest prompt + response needs {needed} positions")
    out = {name: np.zeros((rows, length), np.float32 if name in ("response_mask", "rollout_logp") else np.int32)
           for name in ROW_FIELDS}
    out["input_ids"][:] = pad_id
    out["targets"][:] = pad_id
    group = rows // batch
    for row in range(rows):
        prompt = row // group
        p, n = int(prompt_lengths[prompt]), int(lengths[row])
        sequence = np.concatenate([prompts[prompt, :p], tokens[row, :n]])
        out["input_ids"][row, :p + n] = sequence
        out["targets"][row, :p + n - 1] = sequence[1:]
        out["positions"][row, :p + n] = np.arange(p + n)
        out["segment_ids"][row, :p + n] = 1
        # Response token j is input p + j, so it is the target of position p + j - 1.
        out["response_mask"][row, p - 1:p + n - 1] = 1.0
        out["rollout_logp"][row, p - 1:p + n - 1] = logprobs[row, :n]
    return out


def ptx_weights(loss_mask, response_tokens, coef: float) -> jax.Array:
    """`ptx_w` of pre-training rows mixed into an actor mini-batch: c_ptx * N_resp / N_ptx on their trained tokens,
    so that the step's division by the response-token count makes the PTX term c_ptx x their token mean (§1.7).
    Traceable (the loop computes it on device, where N_resp is); rows without trained tokens get weight 0."""
    if coef < 0:
        raise ValueError(f"coef={coef!r}: the PTX coefficient must be >= 0")
    loss_mask = jnp.asarray(loss_mask, jnp.float32)
    return loss_mask * (coef * jnp.asarray(response_tokens, jnp.float32) / jnp.maximum(loss_mask.sum(), 1.0))


# ---------------------------------------------------------------------------------------------------- the jit


def has_adapters(params: nnx.State) -> bool:
    return any(is_lora_path("/".join(map(str, path))) for path, _ in nnx.to_flat_state(params))


def make_experience(actor_graphdef, actor_params, rows: dict, scores, stopped, moments: RunningMoments, *,
                    loss_cfg: RLLossConfig, cfg: ExperienceConfig = ExperienceConfig(), ref_params=None,
                    critic_graphdef=None, critic_params=None, kl_coef=None) -> tuple[dict, RunningMoments, dict]:
    """(batch for the objectives, updated reward moments, metrics) from `build_rows` rows and RM scores [rows].

    The reference is `ref_params` (a frozen copy of the SFT weights, full fine-tuning) or, when None, the actor with
    its LoRA adapters off (the exact base, no second copy). `kl_coef` (a scalar, e.g. the adaptive controller's)
    overrides `loss_cfg.kl_coef` in the reward. PPO needs the critic (`critic_graphdef`, `critic_params`).
    """
    missing = [name for name in ROW_FIELDS if name not in rows]
    if missing:
        raise ValueError(f"rows: missing fields {missing} (build them with build_rows)")
    n_rows = np.shape(rows["input_ids"])[0]
    for name, value in (("scores", scores), ("stopped", stopped)):
        if np.shape(value) != (n_rows,):
            raise ValueError(f"{name} must be [{n_rows}] (one per row), got {list(np.shape(value))}")
    if cfg.algorithm == "ppo" and (critic_graphdef is None or critic_params is None):
        raise ValueError("critic_graphdef/critic_params: PPO's GAE needs the critic's values (GRPO does without)")
    if cfg.algorithm == "grpo" and n_rows % cfg.group_size:
        raise ValueError(f"group_size={cfg.group_size}: {n_rows} rows are not whole groups")
    if cfg.algorithm == "grpo" and loss_cfg.kl_placement == "reward" and loss_cfg.kl_coef > 0:
        raise ValueError("kl_placement='reward' with algorithm='grpo': group advantages see only the sequence "
                         "score, so a per-token KL reward would be dropped; use kl_placement='loss' or kl_coef=0")
    if ref_params is None and not has_adapters(actor_params):
        raise ValueError("ref_params: full fine-tuning needs the frozen reference weights (the reference is the "
                         "actor without adapters only under LoRA)")
    kl_coef = jnp.float32(loss_cfg.kl_coef if kl_coef is None else kl_coef)
    batch = {name: jnp.asarray(rows[name]) for name in ROW_FIELDS}
    with within_mesh_of(actor_params):
        return experience_program(actor_graphdef, critic_graphdef, actor_params, ref_params, critic_params, batch,
                           jnp.asarray(scores), jnp.asarray(stopped), moments, kl_coef, loss_cfg=loss_cfg, cfg=cfg)


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("loss_cfg", "cfg"))
def experience_program(actor_graphdef, critic_graphdef, actor_params, ref_params, critic_params, batch, scores,
                       stopped, moments, kl_coef, *, loss_cfg: RLLossConfig, cfg: ExperienceConfig):
    """The jitted body of `make_experience` (no input checks), which `--compile-only` lowers from shapes."""
    def logprobs(params):
        return policy_logprobs(nnx.merge(actor_graphdef, params), batch, temperature=cfg.temperature,
                               chunk_size=cfg.chunk_size)

    old_logp = logprobs(actor_params)
    ref_logp = logprobs(without_adapters(actor_params) if ref_params is None else ref_params)
    mask = batch["response_mask"]
    valid = mask.sum(axis=-1) > 0  # rows with a response (an empty one must not move the reward moments)
    scores = scores.astype(jnp.float32)
    shaped, moments = shape_scores(scores, stopped, moments, loss_cfg, valid)
    kl = kl_estimate(old_logp, ref_logp, loss_cfg.kl_estimator, loss_cfg.kl_clamp) * mask
    out = {**batch, "old_logp": old_logp, "ref_logp": ref_logp}
    if cfg.algorithm == "ppo":
        values = nnx.merge(critic_graphdef, critic_params)(batch["input_ids"], batch["positions"],
                                                           batch["segment_ids"]) * mask
        reward_kl_coef = kl_coef if loss_cfg.kl_placement == "reward" else 0.0
        rewards = token_rewards(shaped, kl, mask, reward_kl_coef)
        advantages, returns = gae(rewards, values, mask, loss_cfg.gamma, loss_cfg.lam)
        out.update(values=values, returns=returns)
    else:
        grouped = group_advantages(shaped.reshape(-1, cfg.group_size), loss_cfg.group_scale, loss_cfg.group_eps,
                                   loss_cfg.group_ddof)
        advantages = grouped.reshape(-1)[:, None] * mask
    if loss_cfg.whiten_advantages:  # over the whole experience (never a micro-batch); returns come from raw A
        advantages = masked_whiten(advantages, mask) * mask
    out["advantages"] = advantages
    out["pg_w"] = aggregation_weights(mask, loss_cfg.loss_agg, cfg.max_response_len)
    on_response = mask > 0
    metrics = {"kl": masked_mean(kl, mask), "kl_per_sequence": kl.sum() / jnp.maximum(valid.sum(), 1),
               "score": jnp.where(valid, scores, 0.0).sum() / jnp.maximum(valid.sum(), 1),
               "shaped_score": jnp.where(valid, shaped, 0.0).sum() / jnp.maximum(valid.sum(), 1),
               "advantage_mean": masked_mean(advantages, mask),
               "response_length": mask.sum() / jnp.maximum(valid.sum(), 1),
               "rollout_logp_error_max": jnp.max(jnp.where(on_response, jnp.abs(batch["rollout_logp"] - old_logp),
                                                           0.0))}
    return out, moments, metrics
