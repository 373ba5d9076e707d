"""The device side of the continuous-batching engine: one jitted step over the paged cache (forward, per-row
sampling, penalty-state update) and the per-row sampling arrays it takes, built on the host."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internlm2_jax.decode.sampling import SamplingConfig, SamplingParams, banned_rows, sample
from internlm2_jax.parallel.sharding import constrain


def engine_step(graphdef, params, cache, counts, seen, tokens, page_table, lengths, q_lengths, rope_lengths, slots,
                 emit, steps, sampling: SamplingParams, *, top_n: int, row_widths: tuple[int, ...] | None = None):
    """Runs [rows, chunk] new tokens through the model over the paged cache and samples after each row's last one.
    counts/seen [slots, vocab] are the penalty state: rows are gathered only when some row uses penalties, and the
    update touches one entry per row. `row_widths`: see `PagedKVCache`."""
    model = nnx.merge(graphdef, params)
    hidden, cache = model.model(tokens, cache=cache.with_step(page_table, lengths, q_lengths, rope_lengths,
                                                              row_widths))
    last = jnp.maximum(q_lengths - 1, 0)
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
    token, logprob, top_ids, top_logprobs = sample(logits, sampling, steps, counts, seen, top_n, rows=slots)
    counts, seen = _replicated(counts.at[slots, token].add(emit.astype(jnp.int32)),
                               seen.at[slots, token].set(seen[slots, token] | emit))
    empty = jnp.zeros((0,), jnp.int32)  # the step's view is not part of the cache between calls
    return cache.with_step(jnp.zeros((0, 0), jnp.int32), empty, empty, empty), counts, seen, token, logprob, \
        top_ids, top_logprobs


@functools.lru_cache(maxsize=8)
def jitted_engine_step(graphdef):
    """`engine_step` jitted for one model structure. The graphdef is bound rather than passed as a static argument,
    which jit would hash and compare on every call (a cost per call: benchmarks/RESULTS.md, serving); engines of
    equal structure share it, and its compiled programs."""
    return jax.jit(functools.partial(engine_step, graphdef), static_argnames=("top_n", "row_widths"),
                   donate_argnames=("cache", "counts", "seen"))


def _replicated(*arrays):
    """The penalty state keeps the layout it came in with on a mesh (replicated): donated from call to call, a
    layout XLA chose otherwise would be a new input sharding, and a recompile, at the next call."""
    return tuple(constrain(a, (None,) * a.ndim) for a in arrays)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def set_penalty_row(counts, seen, slot, counts_row, seen_row):
    return _replicated(counts.at[slot].set(counts_row), seen.at[slot].set(seen_row))


def key_data(seed: int) -> tuple[int, ...]:
    return tuple(np.asarray(jax.random.key_data(jax.random.key(seed))).tolist())


def uses_penalties(config: SamplingConfig) -> bool:
    return config.repetition_penalty != 1 or config.presence_penalty != 0 or config.frequency_penalty != 0


def stack_sampling(configs: list[SamplingConfig], keys: list[tuple[int, ...]], batch: int,
                    pad_key: tuple[int, ...]) -> SamplingParams:
    """Per-row sampling arrays, padding rows greedy; built on the host (no device work per request per step). Every
    batch carries its banned ids, padded to MAX_BANNED_IDS per row even when none bans anything, so requests with and
    without bans share the compiled programs."""
    pad = batch - len(configs)
    configs = configs + [SamplingConfig()] * pad
    keys = np.asarray(keys + [pad_key] * pad, np.uint32)

    def column(name, dtype):
        return np.asarray([getattr(c, name) for c in configs], dtype)

    return SamplingParams(column("temperature", np.float32), column("top_k", np.int32), column("top_p", np.float32),
                          column("min_p", np.float32), column("repetition_penalty", np.float32),
                          column("presence_penalty", np.float32), column("frequency_penalty", np.float32), keys,
                          banned_rows(configs))
