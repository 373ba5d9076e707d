"""Prompt data for online RL (docs/rlhf.md §2.11): what a rollout starts from.

`PromptBatch` is the contract between prompt sources and the RL loop (`train/rl/loop.py`) and its reward
sources (`train/rl/rewards.py`): numpy arrays the loop places on the mesh, plus each prompt's opaque `meta` (a
doctest, a reference answer) that reaches rule rewards on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    prompt_ids: np.ndarray  # [B, P] int32, right-padded with the tokenizer's pad id; each ends the generation prompt
    prompt_lengths: np.ndarray  # [B] int32, 1..P real tokens
    domain_ids: np.ndarray  # [B] int32: index into the source's `domains` tuple, -1 = none
    metas: tuple[Any, ...]  # [B] the records' "meta" values (None when absent), for rule rewards

    def __post_init__(self):
        rows = np.shape(self.prompt_ids)[0]
        if np.ndim(self.prompt_ids) != 2 or np.shape(self.prompt_lengths) != (rows,) or \
                np.shape(self.domain_ids) != (rows,) or len(self.metas) != rows:
            raise ValueError(f"PromptBatch: prompt_ids must be [B, P] with prompt_lengths, domain_ids and metas of "
                             f"B entries; got {list(np.shape(self.prompt_ids))}, {list(np.shape(self.prompt_lengths))}"
                             f", {list(np.shape(self.domain_ids))}, {len(self.metas)}")

    @property
    def size(self) -> int:
        return int(np.shape(self.prompt_ids)[0])
