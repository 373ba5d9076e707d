"""Cached generation as pure functions over a static `KVCache`: `prefill`, `decode_step`, the on-device token loop
(`decode_chunk`, a `lax.while_loop` of up to `chunk` steps) and `generate`, the convenience API for notebooks.

`prefill(graphdef, params, cache, tokens, lengths)` runs padded prompts through the model once, writes their K/V
and returns logits of each row's last real token only; `decode_step(graphdef, params, cache, tokens)` appends one
token per row. Both are jitted once per shape (graphdef static) and donate the cache they are given, which they
update in place (do not reuse it after the call). Between chunks the host checks stop strings, which
need the tokenizer: a match ends the row and its text is cut at the match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from internlm2_jax.decode.sampling import SamplingConfig, SamplingParams, check_banned_ids, sample
from internlm2_jax.model.kv_cache import KVCache, init_cache
from internlm2_jax.parallel.mesh import data_parallel_size, mesh_of, within_mesh_of


@partial(jax.jit, static_argnums=0, static_argnames=("left_padded", "fresh"), donate_argnums=2)
def prefill(graphdef, params, cache: KVCache, tokens, lengths, *, left_padded: bool = False, fresh: bool = False):
    """(cache, fp32 logits [batch, vocab] at each row's last prompt token) for prompts [batch, T] padded on the
    right (or the left) to T, of `lengths` real tokens each; the cache must have room for T more slots. `fresh`:
    the cache is empty (static: the caller knows), so attention runs over the prompts alone with the model's kernel
    instead of over every cache slot."""
    model = nnx.merge(graphdef, params)
    size = tokens.shape[1]
    index = jnp.arange(size, dtype=jnp.int32)[None, :]
    positions = index - (size - lengths[:, None]) if left_padded else jnp.broadcast_to(index, tokens.shape)
    segments = ((positions >= 0) & (positions < lengths[:, None])).astype(jnp.int32)
    hidden, cache = model.model(tokens, jnp.maximum(positions, 0), segments, cache=cache, fresh_cache=fresh)
    last = jnp.full_like(lengths, size - 1) if left_padded else lengths - 1
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return cache.replace(lengths=cache.lengths + lengths), model.logits(hidden)


def _decode(model, cache: KVCache, tokens):
    positions = cache.lengths[:, None]
    hidden, cache = model.model(tokens[:, None], positions, jnp.ones_like(positions), cache=cache)
    return cache.replace(lengths=cache.lengths + 1), model.logits(hidden[:, 0])


@partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_step(graphdef, params, cache: KVCache, tokens):
    """(cache, fp32 logits [batch, vocab] of the next token) after appending `tokens` [batch]."""
    return _decode(nnx.merge(graphdef, params), cache, tokens)


@struct.dataclass
class GenerationState:
    cache: KVCache
    logits: jax.Array  # [batch, vocab]: the distribution of the next token
    tokens: jax.Array  # [batch, max_new] generated ids
    logprobs: jax.Array  # [batch, max_new]
    top_ids: jax.Array  # [batch, max_new, top_n]
    top_logprobs: jax.Array  # [batch, max_new, top_n]
    # Penalty state, None where no row uses penalties (RL rollouts: [B, 92544] int32 is 190 MB at B = 512).
    counts: jax.Array | None  # [batch, vocab] int32: generated count of each token (presence/frequency penalties)
    seen: jax.Array | None  # [batch, vocab] bool: in the prompt or generated (repetition penalty)
    generated: jax.Array  # [batch] int32
    done: jax.Array  # [batch] bool
    step: jax.Array  # [] int32


@partial(jax.jit, static_argnums=0, static_argnames=("chunk", "report"), donate_argnums=2)
def decode_chunk(graphdef, params, state: GenerationState, sampling: SamplingParams, stop_ids, max_new, *,
                 chunk: int, report: str = "model") -> GenerationState:
    """Up to `chunk` sample-and-decode steps on device, stopping early once every row is done; `report` picks the
    log-probs recorded (`sample`)."""
    model = nnx.merge(graphdef, params)
    rows = jnp.arange(state.tokens.shape[0])

    def body(carry):
        i, st = carry
        token, logprob, top_ids, top_logprobs = sample(st.logits, sampling, st.step, st.counts, st.seen,
                                                       st.top_ids.shape[-1], report=report)
        active = ~st.done
        at = jnp.minimum(st.generated, st.tokens.shape[1] - 1)
        if st.counts is not None:
            hit = jax.nn.one_hot(token, st.counts.shape[1], dtype=jnp.int32) * active[:, None]
            st = st.replace(counts=st.counts + hit, seen=st.seen | (hit > 0))
        st = st.replace(
            tokens=st.tokens.at[rows, at].set(jnp.where(active, token, st.tokens[rows, at])),
            logprobs=st.logprobs.at[rows, at].set(jnp.where(active, logprob, st.logprobs[rows, at])),
            top_ids=st.top_ids.at[rows, at].set(jnp.where(active[:, None], top_ids, st.top_ids[rows, at])),
            top_logprobs=st.top_logprobs.at[rows, at].set(
                jnp.where(active[:, None], top_logprobs, st.top_logprobs[rows, at])),
            generated=st.generated + active,
            done=st.done | (active & (jnp.isin(token, stop_ids) | (st.generated + 1 >= max_new))),
            step=st.step + 1)
        cache, logits = _decode(model, st.cache, token)  # finished rows decode filler: their outputs are frozen
        return i + 1, st.replace(cache=cache, logits=logits)

    _, state = jax.lax.while_loop(lambda c: (c[0] < chunk) & ~jnp.all(c[1].done), body, (0, state))
    return state


GREEDY = SamplingConfig()


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated ids, a stop token included
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]  # per generated token, the top-n ids and their log-probs
    finish_reason: str  # "stop" (a stop token or string) or "length"
    text: str | None = None  # with a tokenizer: the decoded text, cut before a stop string


def _split_model(model):
    return model if isinstance(model, tuple) else nnx.split(model)


def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingConfig | Sequence[SamplingConfig] = GREEDY, stop_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), tokenizer=None, top_n: int = 0, chunk: int = 32,
                 cache_dtype=None, kv_dtype: str | None = None) -> list[Completion]:
    """Generates for token-id prompts with a static cache of `max(len(prompt)) + max_new_tokens` slots.

    `model` is an `InternLM2ForCausalLM` or its `(graphdef, params)`; `sampling` one config for every row or one per
    row (a row's `banned_ids` are never generated). Stop strings need the `tokenizer` and are checked every `chunk`
    steps. `kv_dtype` "int8" / "int4" quantizes the cache's K/V (model/kv_quant.py) instead of `cache_dtype`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    graphdef, params = _split_model(model)
    cfg = nnx.merge(graphdef, params).cfg
    configs = list(sampling) if isinstance(sampling, Sequence) else [sampling] * len(prompts)
    if len(configs) != len(prompts):
        raise ValueError(f"{len(configs)} sampling configs for {len(prompts)} prompts")
    for config in configs:
        check_banned_ids(config.banned_ids, vocab_size=cfg.vocab_size, stop_ids=stop_ids)
    with within_mesh_of(params):
        return _generate(graphdef, params, cfg, prompts, configs, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                         stop_strings=stop_strings, tokenizer=tokenizer, top_n=top_n, chunk=chunk,
                         cache_dtype=cache_dtype, kv_dtype=kv_dtype)


def _generate(graphdef, params, cfg, prompts, configs, *, max_new_tokens, stop_ids, stop_strings, tokenizer, top_n,
              chunk, cache_dtype, kv_dtype) -> list[Completion]:
    # On a mesh the rows split over the data-parallel axes: padding rows (one token each, ended at once) make them
    # divide, and their completions are dropped.
    mesh = mesh_of(params)
    real = len(prompts)
    pad = -real % data_parallel_size(mesh)
    prompts, configs = [*prompts, *[[0]] * pad], [*configs, *[GREEDY] * pad]
    # Prompts are right-padded to a power of two, so a notebook's stream of prompts compiles a few shapes, not one
    # per length (padding slots hold segment 0 and are never attended).
    batch, longest = len(prompts), max(16, 1 << (max(len(p) for p in prompts) - 1).bit_length())
    tokens = np.zeros((batch, longest), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    cache = init_cache(cfg, batch, longest + max_new_tokens, cache_dtype, mesh=mesh, kv_dtype=kv_dtype)
    cache, logits = prefill(graphdef, params, cache, jnp.asarray(tokens), lengths)
    seen = np.zeros((batch, cfg.vocab_size), bool)
    for i, p in enumerate(prompts):
        seen[i, list(p)] = True
    state = GenerationState(
        cache=cache, logits=logits, tokens=jnp.zeros((batch, max_new_tokens), jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        top_ids=jnp.zeros((batch, max_new_tokens, top_n), jnp.int32),
        top_logprobs=jnp.zeros((batch, max_new_tokens, top_n), jnp.float32),
        counts=jnp.zeros((batch, cfg.vocab_size), jnp.int32), seen=jnp.asarray(seen),
        generated=jnp.zeros((batch,), jnp.int32), done=jnp.asarray(np.arange(batch) >= real),
        step=jnp.zeros((), jnp.int32))
    params_by_row = SamplingParams.stack(configs)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    cut_at: dict[int, int] = {}  # row -> character offset of the first stop string in its text
    while True:
        state = decode_chunk(graphdef, params, state, params_by_row, stops, max_new_tokens, chunk=chunk)
        if stop_strings:
            state = _apply_stop_strings(state, tokenizer, stop_strings, cut_at)
        if np.asarray(state.done).all():
            break
    return _completions(state, stop_ids, cut_at, tokenizer)[:real]


def _apply_stop_strings(state: GenerationState, tokenizer, stop_strings, cut_at) -> GenerationState:
    """Ends every row whose text now contains a stop string, keeping its tokens up to the one completing it."""
    tokens, generated, done = np.asarray(state.tokens), np.array(state.generated), np.array(state.done)
    for row in range(len(done)):
        ids = tokens[row, :generated[row]].tolist()
        if row in cut_at or not any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop_strings):
            continue
        for n in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            found = [text.find(s) for s in stop_strings if s in text]
            if found:
                cut_at[row], generated[row], done[row] = min(found), n, True
                break
    return state.replace(generated=jnp.asarray(generated), done=jnp.asarray(done))


def _completions(state: GenerationState, stop_ids, cut_at, tokenizer) -> list[Completion]:
    tokens, logprobs = np.asarray(state.tokens), np.asarray(state.logprobs)
    top_ids, top_logprobs, generated = np.asarray(state.top_ids), np.asarray(state.top_logprobs), \
        np.asarray(state.generated)
    out = []
    for row in range(tokens.shape[0]):
        n = int(generated[row])
        ids = tokens[row, :n].tolist()
        stopped = row in cut_at or (n > 0 and ids[-1] in set(stop_ids))
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if row in cut_at:
                text = text[:cut_at[row]]
        out.append(Completion(ids, logprobs[row, :n].tolist(),
                              [dict(zip(top_ids[row, i].tolist(), top_logprobs[row, i].tolist(), strict=True))
                               for i in range(n)], "stop" if stopped else "length", text))
    return out


def generate(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[Mapping[str, Any]]], *,
             max_new_tokens: int = 128, chat_template: str = "internlm2_chat", **kwargs) -> list[Completion]:
    """Completions of strings (encoded with BOS, stopping at `</s>`) or of chat conversations (lists of messages,
    rendered by the one chat template with a generation prompt, stopping at `</s>` or `<|im_end|>`)."""
    from internlm2_jax.chat_template import get_chat_template

    if all(isinstance(p, str) for p in prompts):
        ids = [tokenizer.encode(p, add_bos=True, allow_special=False) for p in prompts]
        stop_ids = [tokenizer.eos_id]
    else:
        template = get_chat_template(chat_template)
        ids = [template.encode(messages, tokenizer, add_generation_prompt=True)[0] for messages in prompts]
        stop_ids = [tokenizer.token_id("</s>"), tokenizer.token_id("<|im_end|>")]
    kwargs.setdefault("stop_ids", stop_ids)
    return generate_ids(model, ids, max_new_tokens=max_new_tokens, tokenizer=tokenizer, **kwargs)
