"""Log-probabilities of given tokens (no generation): the server's `echo` with `logprobs` and its perplexity endpoint.

One jitted forward over right-padded rows; the vocabulary-sized logits exist one chunk of positions at a time, as in
training's chunked loss, so a long prompt does not materialise [seq, vocab] fp32 logits.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_CHUNK = 256


@partial(jax.jit, static_argnums=0, static_argnames="top_n")
def _score(graphdef, params, tokens, lengths, *, top_n: int):
    model = nnx.merge(graphdef, params)
    batch, size = tokens.shape
    segments = (jnp.arange(size)[None, :] < lengths[:, None]).astype(jnp.int32)
    hidden = model(tokens, segment_ids=segments, return_hidden=True)[:, :-1]
    targets = tokens[:, 1:]
    chunk = min(_CHUNK, size - 1)
    pad = (-(size - 1)) % chunk
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
    chosen, top_ids, top_logprobs = jax.lax.map(one_chunk, chunks)

    def unchunk(x):
        return x.swapaxes(0, 1).reshape(batch, n * chunk, *x.shape[3:])[:, :size - 1]

    return unchunk(chosen), unchunk(top_ids), unchunk(top_logprobs)


def padded_length(n: int) -> int:
    """Rows are padded to a power of two up to 256 tokens, then to a multiple of 256: a handful of shapes for a
    stream of lengths, without padding a 300-token row to 512."""
    return max(16, 1 << (n - 1).bit_length()) if n <= 256 else -(-n // 256) * 256


def score_tokens(model, prompts, *, top_n: int = 0):
    """Per prompt, (log-probs [len - 1] of tokens 1.. given their prefix, top-n ids [len - 1, top_n] and their
    log-probs), as numpy arrays. `model` is an `InternLM2ForCausalLM` or its (graphdef, params). Rows are padded to
    few lengths (`padded_length`), so a stream of different lengths compiles a handful of shapes, not one per
    length."""
    graphdef, params = model if isinstance(model, tuple) else nnx.split(model)
    if any(len(p) < 2 for p in prompts):
        raise ValueError("scoring needs prompts of at least 2 tokens (the first token has no log-prob)")
    size = padded_length(max(len(p) for p in prompts))
    tokens = np.zeros((len(prompts), size), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    chosen, top_ids, top_logprobs = jax.device_get(_score(graphdef, params, tokens, lengths, top_n=top_n))
    return [(chosen[i, :n - 1], top_ids[i, :n - 1], top_logprobs[i, :n - 1]) for i, n in enumerate(lengths)]
