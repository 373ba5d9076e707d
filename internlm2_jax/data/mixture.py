"""Quality-weighted mixture over shards: which record to read next, as a pure function of a few counters.

Semantics (per process; see `iterator.py` for how records are split between processes):
- Each shard has `n` records, a `weight` and `epochs`. Its **quota** for one pass over the mixture (a "round") is
  `round(epochs * n)` draws: `epochs=4` reads every record four times (the report's up-sampling of high-quality data),
  `epochs=0.5` reads half of the shard. Weight-0 shards are never read.
- Every draw picks one shard among those with quota left, with probability proportional to `weight` (so weights are
  document proportions while all shards are active), then takes that shard's next record. A shard's records are read
  in a fresh seeded permutation per pass (or in order with `shuffle=False`).
- When every quota is used up the round ends: with `repeat=True` a new round starts with new permutations and
  draws, otherwise the sampler is exhausted.

Everything random is derived from `(seed, stream, round, ...)` counters, never from a generator's running state, so
the sampler's state is just `round`, `draws` and the per-shard `consumed` counts (a small JSON dict), and restoring it
continues with exactly the same draws.

`share_epochs` turns weights that are meant as shares of everything drawn (the fine-tuning files' weights) into
these epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BLOCK = 4096  # uniforms drawn per counter-derived generator; amortises generator construction


def share_epochs(sizes: Sequence[int], weights: Sequence[float]) -> list[float]:
    """Per-shard epochs that make shard i's share of a round's draws `weights[i] / sum(weights)`: the shard with the
    most records per unit of weight is read once per round, the others repeated (fractionally) as often as their
    weight asks. With these epochs and the same weights every shard's quota runs out together, so the draws stay in
    proportion throughout the round. Shards without records or weight are never drawn (1.0 is a placeholder)."""
    used = [(n, w) for n, w in zip(sizes, weights, strict=True) if n > 0 and w > 0]
    if not used:
        return [1.0] * len(sizes)
    total = sum(w for _, w in used)
    round_draws = max(n * total / w for n, w in used)
    return [w / total * round_draws / n if n > 0 and w > 0 else 1.0 for n, w in zip(sizes, weights, strict=True)]


class MixtureSampler:
    def __init__(self, sizes: Sequence[int], weights: Sequence[float], epochs: Sequence[float], *, seed: int,
                 stream: int = 0, shuffle: bool = True, repeat: bool = True):
        if not len(sizes) == len(weights) == len(epochs):
            raise ValueError("sizes, weights and epochs must have one entry per shard")
        self.sizes = [int(n) for n in sizes]
        self.weights = np.asarray(weights, np.float64)
        if (self.weights < 0).any() or not np.isfinite(self.weights).all():
            raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
        self.quotas = [int(round(e * n)) if w > 0 else 0 for n, w, e in zip(self.sizes, weights, epochs, strict=True)]
        self.seed, self.stream, self.shuffle, self.repeat = int(seed), int(stream), shuffle, repeat
        self.round = 0
        self.draws = 0
        self.consumed = [0] * len(self.sizes)
        self._uniforms: tuple[tuple[int, int], np.ndarray] | None = None
        self._perms: dict[int, tuple[tuple[int, int], np.ndarray]] = {}

    @property
    def empty(self) -> bool:
        """True when a round would draw nothing (no records, or every weight 0)."""
        return sum(self.quotas) == 0

    def _uniform(self) -> float:
        block, offset = divmod(self.draws, _BLOCK)
        key = (self.round, block)
        if self._uniforms is None or self._uniforms[0] != key:
            rng = np.random.default_rng([self.seed, self.stream, self.round, block, 0])
            self._uniforms = (key, rng.random(_BLOCK))
        return float(self._uniforms[1][offset])

    def _record(self, shard: int, count: int) -> int:
        size = self.sizes[shard]
        epoch, index = divmod(count, size)
        if not self.shuffle:
            return index
        key = (self.round, epoch)
        cached = self._perms.get(shard)
        if cached is None or cached[0] != key:
            rng = np.random.default_rng([self.seed, self.stream, self.round, epoch, 1, shard])
            cached = (key, rng.permutation(size))
            self._perms[shard] = cached
        return int(cached[1][index])

    def next(self) -> tuple[int, int] | None:
        """`(shard, record)` of the next draw, with record in `range(sizes[shard])`; None when exhausted."""
        active = [s for s, quota in enumerate(self.quotas) if self.consumed[s] < quota]
        if not active:
            if not self.repeat or self.empty:
                return None
            self.round += 1
            self.draws = 0
            self.consumed = [0] * len(self.sizes)
            active = [s for s, quota in enumerate(self.quotas) if quota > 0]
        cumulative = np.cumsum(self.weights[active])
        pick = int(np.searchsorted(cumulative, self._uniform() * cumulative[-1], side="right"))
        shard = active[min(pick, len(active) - 1)]
        record = self._record(shard, self.consumed[shard])
        self.consumed[shard] += 1
        self.draws += 1
        return shard, record

    def get_state(self) -> dict:
        return {"round": self.round, "draws": self.draws, "consumed": list(self.consumed)}

    def set_state(self, state: dict) -> None:
        consumed = [int(c) for c in state["consumed"]]
        if len(consumed) != len(self.sizes):
            raise ValueError(f"the state has {len(consumed)} shards, this mixture has {len(self.sizes)}")
        self.round, self.draws, self.consumed = int(state["round"]), int(state["draws"]), consumed
