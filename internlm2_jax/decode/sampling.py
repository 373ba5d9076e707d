"""Token sampling for a batch whose rows each carry their own settings, as one jitted function of arrays.

Order of operations (as vLLM and HF apply them): penalties on the raw logits -> banned ids to -inf -> temperature ->
top-k, top-p and min-p truncation -> a draw from each row's own key. Temperature 0 is greedy. Log-probabilities
reported for the chosen and top-n tokens are those of the model's distribution (before penalties, bans and
truncation), which is what OpenAI's `logprobs` and log-likelihood clients read; `report="tempered"` reports
log_softmax(logits / temperature) instead (still before truncation), the quantity RL training recomputes for the
sampled tokens. A banned id is never drawn and never listed among a row's top-n candidates.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_MASKED = -1e30
# Ids a request may ban (`<|action_start|>` for tool_choice="none" is one): every row carries this many, padded with
# NO_BAN, so that rows with different bans share one compiled program and a step sends [batch, 16] ids to the device,
# not a [batch, vocab] mask.
MAX_BANNED_IDS = 16
NO_BAN = int(np.iinfo(np.int32).max)  # outside any vocabulary: the scatter in `ban` drops it


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """One request's sampling settings; `validate` names the bad field (the server answers 400 with it)."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; keep tokens with p >= min_p * p(most likely)
    repetition_penalty: float = 1.0  # HF: logits of prompt and generated tokens divided (if > 0) or multiplied
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token generated at least once
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's generated count
    seed: int = 0
    banned_ids: tuple[int, ...] = ()  # never sampled (`check_banned_ids` checks them against a vocabulary)

    def validate(self) -> None:
        checks = {"temperature": 0 <= self.temperature < math.inf, "top_k": self.top_k >= 0,
                  "top_p": 0 < self.top_p <= 1, "min_p": 0 <= self.min_p <= 1,
                  "repetition_penalty": 0 < self.repetition_penalty < math.inf,
                  "presence_penalty": -2 <= self.presence_penalty <= 2,
                  "frequency_penalty": -2 <= self.frequency_penalty <= 2, "seed": 0 <= self.seed < 2**63}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
        banned = self.banned_ids
        if not (isinstance(banned, tuple) and all(isinstance(i, int | np.integer) and i >= 0 for i in banned)):
            raise ValueError(f"banned_ids: must be a tuple of non-negative token ids, got {banned!r}")
        if len(set(banned)) > MAX_BANNED_IDS:
            raise ValueError(f"banned_ids: at most {MAX_BANNED_IDS} distinct ids, got {len(set(banned))}")


def check_banned_ids(banned_ids, *, vocab_size: int, stop_ids=()) -> None:
    """Raises ValueError("banned_ids: ...") when the bans leave a row nothing to draw or no way to stop."""
    outside = sorted(i for i in set(banned_ids) if i >= vocab_size)
    if outside:
        raise ValueError(f"banned_ids: {outside} are outside the vocabulary of {vocab_size} tokens")
    if len(set(banned_ids)) >= vocab_size:
        raise ValueError(f"banned_ids: all {vocab_size} tokens are banned; nothing is left to sample")
    if stop_ids and set(stop_ids) <= set(banned_ids):
        raise ValueError(f"banned_ids: every stop id {sorted(set(stop_ids))} is banned, so a reply could only end "
                         "at its length limit")


def banned_rows(configs, width: int = MAX_BANNED_IDS) -> np.ndarray:
    """[len(configs), width] int32: each config's banned ids, padded with NO_BAN."""
    rows = np.full((len(configs), width), NO_BAN, np.int32)
    for row, config in zip(rows, configs, strict=True):
        ids = sorted(set(config.banned_ids))
        row[:len(ids)] = ids
    return rows


@struct.dataclass
class SamplingParams:
    """`SamplingConfig`s stacked into per-row arrays."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    keys: jax.Array  # [batch, 2] uint32: each row's PRNG key, from its seed
    # [batch, MAX_BANNED_IDS] int32 ids each row never draws, padded with NO_BAN; None where no row can ban (RL
    # rollouts): no masking is traced at all, so such callers run the program they ran before bans existed.
    banned: jax.Array | None

    @classmethod
    def stack(cls, configs) -> SamplingParams:
        """Per-row arrays of `configs`; `banned` is None unless some config bans an id."""
        for config in configs:
            config.validate()

        def column(name, dtype):
            return jnp.asarray([getattr(c, name) for c in configs], dtype)

        keys = jnp.stack([jax.random.key_data(jax.random.key(c.seed)) for c in configs])
        banned = jnp.asarray(banned_rows(configs)) if any(c.banned_ids for c in configs) else None
        return cls(column("temperature", jnp.float32), column("top_k", jnp.int32), column("top_p", jnp.float32),
                   column("min_p", jnp.float32), column("repetition_penalty", jnp.float32),
                   column("presence_penalty", jnp.float32), column("frequency_penalty", jnp.float32), keys, banned)


def ban(x, banned, value):
    """`x` [batch, vocab] with each row's `banned` ids [batch, n] set to `value` (NO_BAN padding is dropped)."""
    return x.at[jnp.arange(x.shape[0])[:, None], banned].set(value, mode="drop")


def apply_penalties(logits, params: SamplingParams, counts, seen):
    """counts [batch, vocab]: times each token was generated; seen [batch, vocab] bool: in the prompt or generated."""
    rep = params.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - params.presence_penalty[:, None] * (counts > 0)
            - params.frequency_penalty[:, None] * counts.astype(jnp.float32))


def truncate(logits, params: SamplingParams):
    """Temperature-scaled logits with the tokens outside top-k, top-p and min-p masked."""
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temperature
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    keep = (params.top_k[:, None] == 0) | (rank < params.top_k[:, None])
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < params.top_p[:, None]  # the mass before this token
    keep &= probs >= params.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)  # the most likely token always survives
    # The smallest kept logit per row is the cut: ties at the cut are all kept, as HF does.
    cut = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= cut, scaled, _MASKED)


REPORTS = ("model", "tempered")


def sample(logits, params: SamplingParams, step, counts, seen, top_n: int = 0, rows=None, report: str = "model"):
    """(tokens [batch], their log-probs [batch], top-n ids and log-probs [batch, top_n]) for fp32 `logits`.

    counts/seen hold the penalty state of these rows, or, with `rows` [batch], of all slots (this batch's rows are
    gathered only when some row uses penalties); both None for a caller that keeps no penalty state (RL rollouts),
    whose rows must then ask for no penalties.

    `report`: "model" reports the model's log-probs, "tempered" log_softmax(logits / temperature) (greedy rows: 1),
    both before penalties, bans and truncation. Each row's banned ids (`params.banned`) are masked to -inf after the
    penalties, so neither greedy nor a draw can pick one, and they are left out of the top-n candidates.

    Row i draws with `fold_in(keys[i], step[i])` (`step` a scalar or [batch]: the index of the token being drawn),
    so its tokens depend on its own seed and step only, not on the batch it runs in.
    """
    if report not in REPORTS:
        raise ValueError(f"report={report!r}: must be one of {REPORTS}")
    if report == "tempered":
        logprobs = jax.nn.log_softmax(logits / jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None],
                                      axis=-1)
    else:
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    # Each stage runs only when some row asks for it: the sort behind top-k/top-p/min-p cost more than the whole
    # forward of a 57M model at batch 16 on CPU, and a greedy batch needs none of it.
    penalised = logits if counts is None else jax.lax.cond(
        (params.repetition_penalty != 1).any() | (params.presence_penalty != 0).any()
        | (params.frequency_penalty != 0).any(),
        lambda: apply_penalties(logits, params, *((counts, seen) if rows is None else (counts[rows], seen[rows]))),
        lambda: logits)
    sampled = params.temperature > 0
    needs_cut = (sampled & ((params.top_k > 0) | (params.top_p < 1) | (params.min_p > 0))).any()

    def choose(allowed, candidates):
        """(tokens, top-n ids, their log-probs): tokens picked from the `allowed` logits, top-n from `candidates`."""

        def draw():
            temperature = jnp.where(sampled, params.temperature, 1.0)[:, None]
            masked = jax.lax.cond(needs_cut, lambda: truncate(allowed, params), lambda: allowed / temperature)
            steps = jnp.broadcast_to(step, params.keys.shape[:1])
            keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(params.keys, steps)
            return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)

        greedy = _argmax(allowed)
        tokens = jnp.where(sampled, jax.lax.cond(sampled.any(), draw, lambda: greedy), greedy)
        if not top_n:
            return tokens, tokens[:, None][:, :0], candidates[:, :0]
        top_logprobs, top_ids = jax.lax.top_k(candidates, top_n)
        return tokens, top_ids.astype(jnp.int32), top_logprobs

    if params.banned is None:
        tokens, top_ids, top_logprobs = choose(penalised, logprobs)
    else:
        # One cond around the whole choice, skipped when no row of the batch bans anything: a cond around the logits
        # alone would return (copy) [batch, vocab] of them at every step, which cost a greedy batch of 32 a quarter
        # more sampling time on CPU.
        tokens, top_ids, top_logprobs = jax.lax.cond(
            (params.banned < logits.shape[-1]).any(),
            lambda: choose(ban(penalised, params.banned, -jnp.inf), ban(logprobs, params.banned, -jnp.inf)),
            lambda: choose(penalised, logprobs))
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_ids, top_logprobs


def _argmax(x):
    """jnp.argmax over the last axis (the first index of the maximum) as two plain reductions: XLA:CPU runs
    argmax's variadic reduce at half the speed (benchmarks/RESULTS.md, serving). A row with a NaN gets the last
    index rather than an out-of-range one."""
    first = jnp.where(x == x.max(axis=-1, keepdims=True), jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1])
    return jnp.minimum(first.min(axis=-1), x.shape[-1] - 1)
