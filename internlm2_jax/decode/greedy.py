"""Greedy decoding by full recomputation: one fixed-size buffer, one compile, no KV cache.

Each new token reruns the whole prefix, so it costs O(T^2) per sequence. Within max_position_embeddings it is the
reference cached decoding must reproduce; beyond it, with dynamic NTK, full recomputation rotates every key with
the current length's base, while cached decoding (`generate.py`, like transformers') keeps each key's rotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, static_argnames=("max_new_tokens",))
def _generate(model, buffer, lengths, stop_ids, max_new_tokens: int):
    batch, size = buffer.shape
    positions = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))

    def step(carry, _):
        buffer, lengths, done = carry
        segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # later slots are padding
        logits = model(buffer, positions, segment_ids)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        token = jnp.where(done, 0, jnp.argmax(last, axis=-1).astype(jnp.int32))
        buffer = jnp.where((positions == lengths[:, None]) & ~done[:, None], token[:, None], buffer)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        return (buffer, lengths, done), None

    done = jnp.zeros((batch,), bool)
    (buffer, lengths, _), _ = jax.lax.scan(step, (buffer, lengths, done), None, length=max_new_tokens)
    return buffer, lengths


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuations (new tokens only, a stop token included if one was produced) of each prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    buffer = np.zeros((len(prompts), longest + max_new_tokens), np.int32)
    for i, p in enumerate(prompts):
        buffer[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    out, new_lengths = _generate(model, jnp.asarray(buffer), jnp.asarray(lengths), stops, max_new_tokens)
    out, new_lengths = np.asarray(out), np.asarray(new_lengths)
    return [out[i, lengths[i]: new_lengths[i]].tolist() for i in range(len(prompts))]
