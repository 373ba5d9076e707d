"""How a batch's tokens are laid out along the sequence before the `sequence` mesh axis splits them.

With causal attention split contiguously over `sp` shards, shard i holds the i-th slice of the row and attends to
everything before it: its work grows as i + 1/2, so the last shard does (2sp - 1)/sp times the mean and the others
wait. The zigzag ("dual chunk swap", MaxText's `reorder_sequence`) layout cuts each row into 2·sp chunks and gives
shard i chunks i and 2sp-1-i: one early and one late, the same work everywhere.

The permutation is applied to whole batches on the host, after packing and before the batch is placed on the mesh,
so the model never permutes activations. It is exact for every step because nothing depends on where a token sits:
attention masks come from positions and segment ids, per-token losses from per-token targets, and the per-document
reductions (`document_lengths`, `last_token_mask`) are segment reductions. The all-gather attention un-permutes the
gathered keys (`natural_order`) so the kernels' tile ranges stay tight; Ulysses keeps rows contiguous (its shards
hold whole sequences on a slice of the heads, so the balance comes for free).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh

LAYOUTS = ("contiguous", "zigzag")
# Per-example fields of a batch ([batch, pairs]), left as they are; every other field is per token ([batch, seq, ...])
# and is laid out, so a new per-token field (advantages, old log-probs) cannot be forgotten.
EXAMPLE_FIELDS = ("pair_mask", "reference_logps")


def zigzag_chunks(shards: int) -> np.ndarray:
    """The natural-order chunk held at each place of the zigzag layout: [0, 2sp-1, 1, 2sp-2, ...]."""
    order = []
    for i in range(shards):
        order += [i, 2 * shards - 1 - i]
    return np.asarray(order)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """The layout of rows over `shards` sequence shards: "contiguous" (the identity) or "zigzag"."""

    kind: str = "contiguous"
    shards: int = 1

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"sequence layout must be one of {LAYOUTS}, got {self.kind!r}")
        if self.shards < 1:
            raise ValueError(f"sequence layout needs at least one shard, got {self.shards}")

    @property
    def identity(self) -> bool:
        return self.kind == "contiguous" or self.shards == 1

    def check_length(self, length: int) -> None:
        """Raises naming the numbers when rows of `length` tokens cannot be laid out."""
        parts = 2 * self.shards if self.kind == "zigzag" else self.shards
        if length % parts:
            what = f"2 x mesh.sequence = {parts} chunks" if self.kind == "zigzag" else f"mesh.sequence = {parts}"
            raise ValueError(f"a {self.kind} layout over mesh.sequence={self.shards} cuts each row into {what}, "
                             f"but rows have {length} tokens: make train.seq_len a multiple of {parts}")

    def order(self, length: int) -> np.ndarray:
        """Token indices [length]: place j of the laid-out row holds natural token order[j]."""
        self.check_length(length)
        if self.identity:
            return np.arange(length)
        chunk = length // (2 * self.shards)
        return (zigzag_chunks(self.shards)[:, None] * chunk + np.arange(chunk)).reshape(-1)

    def apply(self, batch: dict) -> dict:
        """`batch` with every per-token field ([batch, seq, ...], all but EXAMPLE_FIELDS) laid out; numpy or jax
        arrays."""
        if self.identity:
            return batch
        tokens = {k: v for k, v in batch.items() if k not in EXAMPLE_FIELDS}
        lengths = {k: v.shape[1] if v.ndim > 1 else None for k, v in tokens.items()}
        if len(set(lengths.values())) > 1 or None in lengths.values():
            raise ValueError(f"a {self.kind} layout permutes every per-token field [batch, seq, ...] alike, but the "
                             f"batch's fields have lengths {lengths} (per-example fields must be one of "
                             f"{EXAMPLE_FIELDS})")
        order = self.order(next(iter(lengths.values()))) if lengths else None
        return {k: v if k in EXAMPLE_FIELDS else v[:, order] for k, v in batch.items()}

    def restore(self, x, axis: int = 1):
        """A per-token result in this layout (e.g. log-probs [batch, seq]) back in natural order along `axis`."""
        if self.identity:
            return x
        inverse = np.argsort(self.order(x.shape[axis]))
        return x.take(inverse, axis=axis)  # numpy and jax arrays alike


CONTIGUOUS = SequenceLayout()


def natural_order(x, layout: SequenceLayout, axis: int = 1):
    """A gathered zigzag sequence (every shard's tokens, shard by shard) back in natural order, as 2·sp static
    slices (no gather op): inside the attention, so the kernels see keys sorted by position."""
    if layout.identity:
        return x
    chunk = x.shape[axis] // (2 * layout.shards)
    place = np.argsort(zigzag_chunks(layout.shards))  # where each natural chunk sits in the laid-out row
    return jnp.concatenate([x[(slice(None),) * axis + (slice(p * chunk, (p + 1) * chunk),)] for p in place],
                           axis=axis)


def sequence_layout(strategy: str, mesh: Mesh | AbstractMesh | dict[str, int] | None) -> SequenceLayout:
    """The layout a training batch gets on `mesh` with the context-parallel `strategy`: zigzag for "all_gather"
    over mesh.sequence > 1, contiguous otherwise (Ulysses shards hold whole sequences)."""
    shape = {} if mesh is None else mesh if isinstance(mesh, dict) else {} if mesh.empty else dict(mesh.shape)
    shards = shape.get("sequence", 1)
    return SequenceLayout("zigzag" if strategy == "all_gather" and shards > 1 else "contiguous", shards)
