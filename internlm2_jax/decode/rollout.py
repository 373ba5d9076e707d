"""RL rollouts: sampled continuations of a batch of prompts as fixed-shape arrays, in one jitted call.

`rollout(graphdef, params, prompts, prompt_lengths, keys, cfg=)` = an empty cache + `prefill` + one `decode_chunk` of
`max_new_tokens` steps (the decoding machinery of `generate.py`, shared): RL stops on stop ids only, so the host never
needs to look between chunks, and no penalty state is kept. It returns, per row, the sampled ids, their *tempered*
log-probs log_softmax(logits / temperature) before top-k/top-p truncation (what training recomputes with
`token_logprobs(..., temperature=)`, as TRL, verl and tunix do; truncation is reflected in none of them), how many
tokens were generated and whether the row ended on a stop id.

Keys are per row (`rollout_keys(seed, iteration, n)`) and `sample()` folds in the token index, so a rollout is a pure
function of (params, prompts, seed, iteration): resuming replays it bit for bit, and a row's tokens do not depend on
the rows beside it. On a mesh (the parameters') the rows split over the data-parallel axes.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from internlm2_jax.decode.generate import GenerationState, decode_chunk, prefill
from internlm2_jax.decode.sampling import SamplingParams
from internlm2_jax.model.kv_cache import constrain_cache, init_cache
from internlm2_jax.parallel.mesh import data_parallel_size, local_rows, mesh_of, within_mesh_of
from internlm2_jax.parallel.sharding import constrain

CHAT_STOP_IDS = (2, 92542)  # `</s>` and `<|im_end|>` of the released InternLM2 tokenizer (conventions, spec §9.6)
PAD_ID = 0  # what follows a row's stop token in `Rollout.tokens`


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How responses are sampled; static under jit (each distinct config compiles once)."""

    max_new_tokens: int = 512  # xtuner MAX_ANSWER_LEN
    temperature: float = 1.0  # > 0: the logits are divided by it, for sampling and for the reported log-probs
    top_p: float = 0.9  # 1: off
    top_k: int = 0  # 0: off
    samples_per_prompt: int = 1  # GRPO's G: each prompt is repeated G times (v1), rows prompt-major
    stop_ids: tuple[int, ...] = CHAT_STOP_IDS  # () never stops early: every row runs max_new_tokens

    def __post_init__(self):
        checks = {"max_new_tokens": self.max_new_tokens >= 1, "temperature": 0 < self.temperature < np.inf,
                  "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0,
                  "samples_per_prompt": self.samples_per_prompt >= 1,
                  "stop_ids": all(isinstance(i, int) and i >= 0 for i in self.stop_ids)}
        for name, ok in checks.items():
            if not ok:
                hint = " (greedy decoding is not a rollout: it has no distribution to train on)" \
                    if name == "temperature" else ""
                raise ValueError(f"RolloutConfig.{name}: invalid value {getattr(self, name)!r}{hint}")
        if not isinstance(self.stop_ids, tuple):  # hashable: the config is a static jit argument
            raise ValueError(f"RolloutConfig.stop_ids must be a tuple, got {type(self.stop_ids).__name__}")


@struct.dataclass
class Rollout:
    """[rows, max_new_tokens] arrays of the responses; rows = prompts x samples_per_prompt, prompt-major."""

    tokens: jax.Array  # int32: sampled ids, the stop id included, PAD_ID after it
    logprobs: jax.Array  # fp32: tempered log-prob of each sampled id before truncation, 0 after the response
    lengths: jax.Array  # [rows] int32: generated tokens (stop id included)
    stopped: jax.Array  # [rows] bool: the last generated id is a stop id (False: cut at max_new_tokens)

    @property
    def response_mask(self) -> jax.Array:
        """[rows, max_new_tokens] int32: 1 on generated tokens (stop id included), 0 on the padding after them."""
        return (jnp.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]).astype(jnp.int32)


def rollout_keys(seed: int, iteration: int, n: int) -> jax.Array:
    """[n, 2] uint32 key data: row i's key is fold_in(fold_in(key(seed), iteration), i), independent of n."""
    base = jax.random.fold_in(jax.random.key(seed), iteration)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n, dtype=jnp.uint32))
    return jax.random.key_data(keys)


def rollout(graphdef, params, prompts, prompt_lengths, keys, *, cfg: RolloutConfig) -> Rollout:
    """Samples `cfg.samples_per_prompt` responses to each prompt.

    prompts [B, P] int32 right-padded, prompt_lengths [B] (1..P real tokens each), keys [B * samples_per_prompt, 2]
    uint32 (`rollout_keys`); rows are prompt-major (row b * G + g is sample g of prompt b). Runs on the parameters'
    mesh, rows over its data-parallel axes (B * samples_per_prompt must divide by their size).
    """
    prompts, prompt_lengths, keys = jnp.asarray(prompts), jnp.asarray(prompt_lengths), jnp.asarray(keys)
    _check_inputs(nnx.merge(graphdef, params).cfg, params, prompts, prompt_lengths, keys, cfg)
    with within_mesh_of(params):
        return rollout_program(graphdef, params, prompts, prompt_lengths, keys, cfg=cfg)


def _check_inputs(model_cfg, params, prompts, prompt_lengths, keys, cfg: RolloutConfig) -> None:
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be [batch, prompt_len] integer ids, got {prompts.dtype}{list(prompts.shape)}")
    batch, width = prompts.shape
    if prompt_lengths.shape != (batch,):
        raise ValueError(f"prompt_lengths must be [{batch}] (one per prompt), got {list(prompt_lengths.shape)}")
    lengths = local_rows(prompt_lengths)  # each process checks the rows it holds
    if lengths.min(initial=1) < 1 or lengths.max(initial=1) > width:
        raise ValueError(f"prompt_lengths must be within 1..{width} (the padded prompt width), got {lengths.tolist()}")
    rows = batch * cfg.samples_per_prompt
    if keys.shape != (rows, 2) or keys.dtype != jnp.uint32:
        raise ValueError(f"keys must be [{rows}, 2] uint32 (rollout_keys(seed, iteration, {rows}): one per prompt "
                         f"and sample), got {keys.dtype}{list(keys.shape)}")
    outside = [i for i in cfg.stop_ids if i >= model_cfg.vocab_size]
    if outside:
        raise ValueError(f"stop ids {outside} are outside the model's vocabulary of {model_cfg.vocab_size}: rows "
                         "would never stop on them")
    degree = data_parallel_size(mesh_of(params))
    if rows % degree:
        raise ValueError(f"{rows} rollout rows ({batch} prompts x {cfg.samples_per_prompt} samples) do not split "
                         f"over the mesh's {degree} data-parallel shards")


@partial(jax.jit, static_argnums=0, static_argnames="cfg")
def rollout_program(graphdef, params, prompts, prompt_lengths, keys, *, cfg: RolloutConfig) -> Rollout:
    """The jitted body of `rollout` (no input checks: they read concrete values), which `--compile-only` lowers
    from shapes."""
    model_cfg = nnx.merge(graphdef, params).cfg
    group = cfg.samples_per_prompt
    prompts = constrain(jnp.repeat(prompts.astype(jnp.int32), group, axis=0), ("batch", None))
    prompt_lengths = constrain(jnp.repeat(prompt_lengths.astype(jnp.int32), group, axis=0), ("batch",))
    rows, width = prompts.shape
    steps = cfg.max_new_tokens
    # Born inside the jit and pinned to its layout (rows over data, kv heads over tensor): no host-side cache.
    cache = constrain_cache(init_cache(model_cfg, rows, width + steps))
    cache, logits = prefill(graphdef, params, cache, prompts, prompt_lengths, fresh=True)

    def per_row(value, dtype):
        return jnp.full((rows,), value, dtype)

    sampling = SamplingParams(
        temperature=per_row(cfg.temperature, jnp.float32), top_k=per_row(cfg.top_k, jnp.int32),
        top_p=per_row(cfg.top_p, jnp.float32), min_p=per_row(0, jnp.float32),
        repetition_penalty=per_row(1, jnp.float32), presence_penalty=per_row(0, jnp.float32),
        frequency_penalty=per_row(0, jnp.float32), keys=constrain(keys, ("batch", None)),
        banned=None)  # RL bans nothing: no masking is traced, so the rollout program is the one it always was
    state = GenerationState(
        cache=cache, logits=logits, tokens=jnp.full((rows, steps), PAD_ID, jnp.int32),
        logprobs=jnp.zeros((rows, steps), jnp.float32), top_ids=jnp.zeros((rows, steps, 0), jnp.int32),
        top_logprobs=jnp.zeros((rows, steps, 0), jnp.float32), counts=None, seen=None,
        generated=jnp.zeros((rows,), jnp.int32), done=jnp.zeros((rows,), bool), step=jnp.zeros((), jnp.int32))
    stop_ids = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)  # -1 matches no token
    state = decode_chunk(graphdef, params, state, sampling, stop_ids, steps, chunk=steps, report="tempered")
    last = jnp.take_along_axis(state.tokens, jnp.maximum(state.generated - 1, 0)[:, None], axis=1)[:, 0]
    stopped = (state.generated > 0) & jnp.isin(last, stop_ids)
    return Rollout(tokens=state.tokens, logprobs=state.logprobs, lengths=state.generated, stopped=stopped)
