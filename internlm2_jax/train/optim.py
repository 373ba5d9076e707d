"""AdamW with InternLM2's recipe (spec §5.4): linear warmup, cosine to 10% of peak, global-norm clipping.

InternEvo applies weight decay to every parameter, norms and embeddings included; `no_decay` takes regular
expressions over parameter paths (e.g. `"norm"`) for those who want the usual exclusions.

Objectives that train several models in one state (PPO's actor and critic beside a frozen reference) name parameter
groups: each trainable group has its own AdamW settings and schedule (`optax.multi_transform` by group), clipped by
one global norm; parameters in no group are frozen and get no optimizer state.
"""

from __future__ import annotations

from __future__ import annotations

import dataclasses
import re
from typing import Any

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
    # Named groups with their own settings (then `trainable` stays empty: the groups' patterns are what trains).
    groups: tuple[ParamGroup, ...] = ()

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> OptimizerConfig:
        """The inverse of `dataclasses.asdict` (what checkpoints record): lists back to tuples, groups rebuilt."""
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        fields["groups"] = tuple(ParamGroup.from_dict(g) for g in fields.get("groups", ()))
        return cls(**fields)

    @property
    def trained(self) -> tuple[str, ...]:
        """The patterns of the parameters that train (and get optimizer state); empty: all of them."""
        return tuple(p for g in self.groups for p in g.patterns) if self.groups else self.trainable

    def __post_init__(self):
        if self.groups:
            names = [g.name for g in self.groups]
            if len(set(names)) != len(names):
                raise ValueError(f"optimizer.groups names must be unique, got {names}")
            if self.trainable:
                raise ValueError(f"optimizer.trainable={self.trainable} and optimizer.groups are exclusive: with "
                                 "groups, what trains is what their patterns match")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be >= 0 and total_steps "
                             f"({self.total_steps}) > 0")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than total_steps "
                             f"({self.total_steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for pattern in (*self.no_decay, *self.trained):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"optimizer pattern {pattern!r} is not a regular expression: {e}") from None


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Parameters whose path matches one of `patterns` (regular expressions; the first group that matches wins),
    trained with `optimizer`'s learning rate, schedule, betas and weight decay (its clip_norm is not used: one
    global norm clips every group)."""

    name: str
    patterns: tuple[str, ...]
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig())

    def __post_init__(self):
        if not self.patterns:
            raise ValueError(f"parameter group {self.name!r} needs at least one pattern")
        if self.optimizer.groups:
            raise ValueError(f"parameter group {self.name!r}: groups do not nest")
        object.__setattr__(self, "patterns", tuple(self.patterns))

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ParamGroup:
        return cls(fields["name"], tuple(fields["patterns"]), OptimizerConfig.from_dict(fields["optimizer"]))


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
                                              decay_steps=cfg.total_steps, end_value=cfg.peak_lr * cfg.min_lr_ratio)


def path_string(path) -> str:
    """'model/layers/0/attention/wqkv' for a jax key path (the trailing `.value` attribute of NNX variables dropped;
    a module or dictionary entry named "value", such as a value head, is kept)."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def decay_mask(cfg: OptimizerConfig, params):
    patterns = [re.compile(p) for p in cfg.no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(path_string(path)) for p in patterns), params)


def group_labels(cfg: OptimizerConfig, params):
    """Each parameter's group name (the first group whose pattern matches its path)."""
    compiled = [(g.name, [re.compile(p) for p in g.patterns]) for g in cfg.groups]

    def label(path, _):
        name = path_string(path)
        for group, patterns in compiled:
            if any(p.search(name) for p in patterns):
                return group
        raise ValueError(f"parameter {name!r} is trained but matches no optimizer group")

    return jax.tree_util.tree_map_with_path(label, params)


def _adamw(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=lambda params: decay_mask(cfg, params))


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW: one for all trained parameters, or one per group."""
    if not cfg.groups:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), _adamw(cfg))
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.multi_transform({g.name: _adamw(g.optimizer) for g in cfg.groups},
                                             lambda params: group_labels(cfg, params)))


def lr_schedules(cfg: OptimizerConfig) -> dict[str, optax.Schedule]:
    """The learning rates the step logs: `lr`, plus `lr/<group>` for each group (`lr` is the first group's)."""
    if not cfg.groups:
        return {"lr": lr_schedule(cfg)}
    return {"lr": lr_schedule(cfg.groups[0].optimizer),
            **{f"lr/{g.name}": lr_schedule(g.optimizer) for g in cfg.groups}}
