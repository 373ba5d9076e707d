"""AdamW with InternLM2's recipe (spec §5.4): linear warmup, cosine to 10% of peak, global-norm clipping.

InternEvo applies weight decay to every parameter, norms and embeddings included; `no_decay` takes regular
expressions over parameter paths (e.g. `"norm"`) for those who want the usual exclusions.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    peak_lr: float = 3e-4
    warmup_steps: int = 2000
    total_steps: int = 100_000
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: tuple[str, ...] = ()
    clip_norm: float = 1.0
    # Regular expressions over parameter paths: only these are trained (and get optimizer moments); empty = all.
    # LoRA: ("lora_",); a LoRA reward model also trains its head: ("lora_", "v_head").
    trainable: tuple[str, ...] = ()

    def __post_init__(self):
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be >= 0 and total_steps "
                             f"({self.total_steps}) > 0")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than total_steps "
                             f"({self.total_steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for pattern in (*self.no_decay, *self.trainable):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"optimizer pattern {pattern!r} is not a regular expression: {e}") from None


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
                                              decay_steps=cfg.total_steps, end_value=cfg.peak_lr * cfg.min_lr_ratio)


def path_string(path) -> str:
    """'model/layers/0/attention/wqkv' for a jax key path (the trailing `.value` of NNX variables dropped)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name != "value":
            parts.append(str(name))
    return "/".join(parts)


def decay_mask(cfg: OptimizerConfig, params):
    patterns = [re.compile(p) for p in cfg.no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(path_string(path)) for p in patterns), params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=lambda params: decay_mask(cfg, params)),
    )
