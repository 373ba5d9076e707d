"""Log-probabilities of given tokens (no generation): the server's `echo` with `logprobs`, its perplexity endpoint,
and multiple-choice scoring; `cached_logprobs` scores through the decoding cache (a quantized cache's perplexity).

One jitted forward over right-padded rows; the vocabulary-sized logits exist one chunk of positions at a time, as in
training's chunked loss, so a long prompt does not materialise [seq, vocab] fp32 logits. `score_shared_prefix`
scores several continuations of one prefix with the prefix computed once (its K/V cached) and the continuations
side by side in one row under a tree mask: a multiple-choice question's context is the long part, its options
short.

On a mesh (parameters placed on one, e.g. by `artifacts.load_for_decoding`) each call runs under that mesh, so the
model's constraints split rows over the data-parallel axes and heads over `tensor`; rows are padded to a multiple of
the data-parallel degree (padding rows are scored and dropped).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internlm2_jax.model.kv_cache import SHARED_SEGMENT, init_cache
from internlm2_jax.parallel.mesh import data_parallel_size, mesh_of, within_mesh_of

_CHUNK = 256


def _chunked_logprobs(model, hidden, targets, top_n: int):
    """(log-probs of `targets`, top-n ids, their log-probs) for hidden states [batch, T, embed], with the
    vocabulary-sized logits made `_CHUNK` positions at a time."""
    batch, size = targets.shape
    chunk = min(_CHUNK, size)
    pad = (-size) % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk

    def one_chunk(args):
        h, t = args
        logprobs = jax.nn.log_softmax(model.logits(h), axis=-1)
        chosen = jnp.take_along_axis(logprobs, t[..., None], axis=-1)[..., 0]
        top_logprobs, top_ids = jax.lax.top_k(logprobs, top_n)
        return chosen, top_ids.astype(jnp.int32), top_logprobs

    chunks = (hidden.reshape(batch, n, chunk, -1).swapaxes(0, 1), targets.reshape(batch, n, chunk).swapaxes(0, 1))
    outputs = jax.lax.map(one_chunk, chunks)
    return tuple(x.swapaxes(0, 1).reshape(batch, n * chunk, *x.shape[3:])[:, :size] for x in outputs)


@partial(jax.jit, static_argnums=0, static_argnames="top_n")
def _score(graphdef, params, tokens, lengths, *, top_n: int):
    model = nnx.merge(graphdef, params)
    segments = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
    hidden = model(tokens, segment_ids=segments, return_hidden=True)[:, :-1]
    return _chunked_logprobs(model, hidden, tokens[:, 1:], top_n)


@partial(jax.jit, static_argnums=0, static_argnames=("top_n", "with_prefix"))
def _score_shared(graphdef, params, prefixes, prefix_lengths, continuations, branches, offsets, *, top_n: int,
                  with_prefix: bool):
    """Each prefix once, then its continuations side by side in one row on top of its cached K/V, under a tree mask
    (continuation j is segment j + 2: it sees the prefix and itself, not its siblings). prefixes [B, P];
    continuations, branches (the segment ids, 0 for padding) and offsets (each token's index in its continuation)
    [B, C]. Returns the prefix's scores [B, P - 1] (None without `with_prefix`: the prefix's vocabulary projection is
    skipped) and the continuations' [B, C] (each one's first token predicted by the prefix's last)."""
    model = nnx.merge(graphdef, params)
    (batch, size), width = prefixes.shape, continuations.shape[1]
    index = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), prefixes.shape)
    cache = init_cache(model.cfg, batch, size + width)
    hidden, cache = model.model(prefixes, index, (index < prefix_lengths[:, None]).astype(jnp.int32), cache=cache)
    prefix_scores = _chunked_logprobs(model, hidden[:, :-1], prefixes[:, 1:], top_n) if with_prefix else None
    last = jnp.take_along_axis(hidden, (prefix_lengths - 1)[:, None, None], axis=1)  # [B, 1, embed]
    hidden_c, _ = model.model(continuations, prefix_lengths[:, None] + offsets, branches, cache=cache)
    # A continuation token is predicted by the one before it in its own branch, its first by the prefix's last.
    previous = jnp.concatenate([last, hidden_c[:, :-1]], axis=1)
    inputs = jnp.where((offsets == 0)[..., None], last, previous)
    return prefix_scores, _chunked_logprobs(model, inputs, continuations, top_n)


def padded_length(n: int) -> int:
    """Rows are padded to a power of two up to 256 tokens, then to a multiple of 256: a handful of shapes for a
    stream of lengths, without padding a 300-token row to 512."""
    return max(16, 1 << (n - 1).bit_length()) if n <= 256 else -(-n // 256) * 256


def padded_rows(params, rows: int) -> int:
    """`rows` rounded up to a multiple of the data-parallel degree of the mesh `params` are placed on (1 without
    one), so the batch splits evenly over it."""
    ways = data_parallel_size(mesh_of(params))
    return -(-rows // ways) * ways


def score_tokens(model, prompts, *, top_n: int = 0):
    """Per prompt, (log-probs [len - 1] of tokens 1.. given their prefix, top-n ids [len - 1, top_n] and their
    log-probs), as numpy arrays. `model` is an `InternLM2ForCausalLM` or its (graphdef, params). Rows are padded to
    few lengths (`padded_length`), so a stream of different lengths compiles a handful of shapes, not one per
    length."""
    graphdef, params = model if isinstance(model, tuple) else nnx.split(model)
    if any(len(p) < 2 for p in prompts):
        raise ValueError("scoring needs prompts of at least 2 tokens (the first token has no log-prob)")
    size = padded_length(max(len(p) for p in prompts))
    rows = padded_rows(params, len(prompts))
    tokens = np.zeros((rows, size), np.int32)
    lengths = np.ones(rows, np.int32)  # padding rows: one token, nothing scored that is kept
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], lengths[i] = p, len(p)
    with within_mesh_of(params):
        chosen, top_ids, top_logprobs = jax.device_get(_score(graphdef, params, tokens, lengths, top_n=top_n))
    return [(chosen[i, :len(p) - 1], top_ids[i, :len(p) - 1], top_logprobs[i, :len(p) - 1])
            for i, p in enumerate(prompts)]


@partial(jax.jit, static_argnums=0)
def _cached_chunk(graphdef, params, cache, ids, targets, start):
    model = nnx.merge(graphdef, params)
    positions = start + jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    hidden, cache = model.model(ids, positions, jnp.ones_like(ids), cache=cache)
    return _chunked_logprobs(model, hidden, targets, 0)[0], cache


def cached_logprobs(model, rows, *, kv_dtype: str | None = None, chunk: int = 16) -> np.ndarray:
    """Log-probs [batch, T - 1] of tokens 1.. of `rows` [batch, T] given their prefix, the model fed `chunk` tokens
    per call through a static KV cache in the compute dtype or quantized to `kv_dtype` ("int8", "int4"): every query
    attends over K/V as decoding stores them (`score_tokens` attends over fresh ones), so this is how a cache
    format's error shows in perplexity."""
    rows = np.asarray(rows, np.int32)
    if rows.ndim != 2 or rows.shape[1] < 2 or chunk < 1:
        raise ValueError(f"cached_logprobs needs token rows [batch, T >= 2] and chunk >= 1, got shape {rows.shape} "
                         f"and chunk {chunk}")
    batch, length = rows.shape
    graphdef, params = nnx.split(model)
    targets = np.concatenate([rows[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)  # the last has no next token
    chosen = []
    with within_mesh_of(params):
        cache = init_cache(model.cfg, batch, length, kv_dtype=kv_dtype, mesh=mesh_of(params))
        for start in range(0, length, chunk):
            part, cache = _cached_chunk(graphdef, params, cache, rows[:, start:start + chunk],
                                        targets[:, start:start + chunk], jnp.int32(start))
            chosen.append(np.asarray(part))
    return np.concatenate(chosen, axis=1)[:, :-1]


def shares_prefix_exactly(cfg, longest: int) -> bool:
    """Whether scoring a prefix alone, then continuations on its cache, gives the one-forward numbers: not when
    dynamic NTK would pick the RoPE base from the prefix's length instead of the whole sequence's."""
    dynamic = cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic"
    return not dynamic or longest <= cfg.max_position_embeddings


PREFIX_MULTIPLE = 8


def score_shared_prefix(model, groups, *, top_n: int = 0, with_prefix: bool = True):
    """`groups`: (prefix ids, [continuation ids, ...]) each. Per group, per continuation, what `score_tokens` gives
    for prefix + continuation: (log-probs [len - 1] of tokens 1.., top-n ids, their log-probs); without
    `with_prefix`, only the continuation's part (its len entries), and the prefix's vocabulary projection is never
    computed. The prefix runs once per group and its continuations share one row; groups are padded to few shapes
    (prefixes to multiples of `PREFIX_MULTIPLE`, the continuations' row to a multiple of 8)."""
    graphdef, params = model if isinstance(model, tuple) else nnx.split(model)
    if any(len(prefix) < 1 or not continuations or any(len(c) < 1 for c in continuations)
           for prefix, continuations in groups):
        raise ValueError("every group needs a prefix and continuations of at least one token each")
    # Prefixes are the long part of these rows: padded to a multiple of 8 (not `padded_length`'s powers of two).
    # Callers batch prefixes of similar length, so this costs a few more shapes to compile and saves up to half the
    # tokens computed (faster than multiples of 32 on the eval benchmark, with as many shapes: benchmarks/RESULTS.md).
    size = -(-max(len(prefix) for prefix, _ in groups) // PREFIX_MULTIPLE) * PREFIX_MULTIPLE
    width = -(-max(sum(map(len, conts)) for _, conts in groups) // 8) * 8
    rows = padded_rows(params, len(groups))  # padding rows: a one-token prefix, no continuation (segment 0)
    prefixes = np.zeros((rows, size), np.int32)
    prefix_lengths = np.ones(rows, np.int32)
    continuations, branches, offsets = (np.zeros((rows, width), np.int32) for _ in range(3))
    starts = []
    for g, (prefix, conts) in enumerate(groups):
        prefixes[g, :len(prefix)], prefix_lengths[g] = prefix, len(prefix)
        at = 0
        starts.append([])
        for j, cont in enumerate(conts):
            span = slice(at, at + len(cont))
            continuations[g, span], offsets[g, span] = cont, np.arange(len(cont))
            branches[g, span] = SHARED_SEGMENT + 1 + j
            starts[-1].append(at)
            at += len(cont)
    with within_mesh_of(params):
        prefix_scores, continuation_scores = jax.device_get(_score_shared(
            graphdef, params, prefixes, prefix_lengths, continuations, branches, offsets, top_n=top_n,
            with_prefix=with_prefix))
    out = []
    for g, (prefix, conts) in enumerate(groups):
        scored = [tuple(x[g, at:at + len(cont)] for x in continuation_scores)
                  for at, cont in zip(starts[g], conts, strict=True)]
        if with_prefix:
            n = len(prefix) - 1
            scored = [tuple(np.concatenate([whole[g, :n], part]) for whole, part in zip(prefix_scores, parts,
                                                                                      strict=True))
                      for parts in scored]
        out.append(scored)
    return out
