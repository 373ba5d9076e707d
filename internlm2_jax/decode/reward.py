"""Reward-model inference: `score(model, tokenizer, conversations, domain=...)` -> one float per conversation.

Each conversation is rendered exactly as the reward model was trained on it (`chat_prompts.reward_sequence`:
the domain's system turn, the messages through the chat template, the reward token), and scored at its last token.
Conversations are sorted by length and scored in batches padded to a few lengths (`padded_length`), so a stream of
requests compiles a handful of shapes. The released InternLM2 reward models were evaluated without the
conditional system prompt (RewardBench): `domain=None` scores the bare conversation.

On a mesh (the reward model's parameters placed on one) the scoring function runs under it, rows padded to a
multiple of the data-parallel degree (`scoring.padded_rows`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internlm2_jax.chat_prompts import DOMAIN_PROMPTS, reward_sequence
from internlm2_jax.decode.scoring import padded_length, padded_rows
from internlm2_jax.model import InternLM2ForRewardModel
from internlm2_jax.model.transformer import last_token_scores
from internlm2_jax.parallel.mesh import within_mesh_of


@functools.partial(jax.jit, static_argnums=(0,))
def score_rows(graphdef, params, tokens, lengths):
    """Scores [rows] of right-padded reward-model rows (`lengths` real tokens each, the reward token last)."""
    model = nnx.merge(graphdef, params)
    segments = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
    return last_token_scores(model(tokens, None, segments), segments)


def score_ids(model: InternLM2ForRewardModel, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
              max_len: int | None = None) -> np.ndarray:
    """Scores of already-rendered id sequences (each ending with the reward token), in their order."""
    if not isinstance(model, InternLM2ForRewardModel):
        raise TypeError(f"score needs an InternLM2ForRewardModel, got {type(model).__name__}")
    limit = max_len or model.cfg.max_position_embeddings
    for i, ids in enumerate(sequences):
        if not 0 < len(ids) <= limit:
            raise ValueError(f"conversation {i} renders to {len(ids)} tokens; the limit is {limit} (max_len)")
    graphdef, params = nnx.split(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = np.zeros(len(sequences), np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        # Full batches keep one shape per length; padding rows (length 0) are scored and dropped.
        rows = padded_rows(params, batch_size if len(order) > batch_size else len(chunk))
        tokens = np.zeros((rows, padded_length(len(sequences[chunk[-1]]))), np.int32)
        lengths = np.zeros(rows, np.int32)
        for row, i in enumerate(chunk):
            tokens[row, :len(sequences[i])] = sequences[i]
            lengths[row] = len(sequences[i])
        with within_mesh_of(params):
            out[chunk] = np.asarray(score_rows(graphdef, params, tokens, lengths))[:len(chunk)]
    return out


def score(model: InternLM2ForRewardModel, tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]], *,
          domain: str | Sequence[str | None] | None = None, domain_prompts: Mapping[str, str] = DOMAIN_PROMPTS,
          batch_size: int = 16, max_len: int | None = None) -> np.ndarray:
    """The reward of each conversation (template message lists, prompt and response together); `domain` is one
    domain for all, one per conversation, or None for no conditional system prompt."""
    domains = [domain] * len(conversations) if domain is None or isinstance(domain, str) else list(domain)
    if len(domains) != len(conversations):
        raise ValueError(f"{len(domains)} domains for {len(conversations)} conversations")
    sequences = [reward_sequence(messages, d, tokenizer, domain_prompts)
                 for messages, d in zip(conversations, domains, strict=True)]
    return score_ids(model, sequences, batch_size=batch_size, max_len=max_len)
