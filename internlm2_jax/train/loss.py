"""The pretraining loss: next-token cross-entropy in fp32 over packed rows, from hidden states in chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]  # input_ids, targets, positions, segment_ids (int32), loss_mask (float32): [B, T]


def next_token_loss(model, batch: Batch, *, chunk_size: int = 1024,
                    dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target) over masked tokens, number of masked tokens), both fp32 scalars.

    Returning the sum and the count (not the mean) makes gradient accumulation exact: micro-batches with different
    numbers of real tokens are weighted by their tokens, as one big batch would be.
    """
    hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True,
                   dropout_rng=dropout_rng)
    logprobs = model.token_logprobs(hidden, batch["targets"], chunk_size=chunk_size)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(logprobs * mask), jnp.sum(mask)
