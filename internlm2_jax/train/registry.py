"""Registries: the objectives a train step can minimise and the data formats the launcher can read, by name.

The built-in ones register themselves with the same calls a user's experiment file makes, so an experiment can add
an objective (`register_objective("simpo", SimPOObjective)`) or a data format without touching the library.

An objective is registered as a factory of its default config: a frozen dataclass of the objective's settings with
a `name` field and `build() -> Objective` (see `train.objectives`). `Experiment.objective` holds a registered name
(its default config) or such a config, so `--set objective.beta=0.2` reaches the settings through `overrides`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _definition(value: Any) -> str:
    """Where a registered value was defined (module and qualified name); a record's `factory` speaks for it."""
    target = getattr(value, "factory", value)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"


class Registry:
    """Names -> registered values, filled at import time.

    `builtins` names the modules whose import registers the built-in entries; they are imported on the first lookup,
    so the built-ins are all there however the registry was reached. Registering a name again with the same
    definition (an experiment file loaded twice) replaces the entry; another definition under a taken name is an
    error, so a typo cannot silently shadow a built-in."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()):
        self.kind, self._builtins, self._entries = kind, builtins, {}

    def register(self, name: str, value: Any) -> Any:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} is registered under a non-empty string name, got {name!r}")
        old = self._entries.get(name)
        if old is not None and _definition(old) != _definition(value):
            raise ValueError(f"{self.kind} {name!r} is already registered by {_definition(old)}; "
                             f"choose another name than for {_definition(value)}")
        self._entries[name] = value
        return value

    def names(self) -> tuple[str, ...]:
        for module in self._builtins:
            importlib.import_module(module)
        return tuple(sorted(self._entries))

    def get(self, name: str) -> Any:
        names = self.names()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(names)}")
        return self._entries[name]


OBJECTIVES = Registry("objective", builtins=("internlm2_jax.train.objectives", "internlm2_jax.train.rl.objectives"))


def register_objective(name: str, factory: Callable[[], Any]) -> Callable[[], Any]:
    """Makes `name` an objective: `factory()` (usually the config class) gives its default config, whose `name`
    field must be `name` (checkpoints record it and resuming compares it)."""
    default = factory()
    if getattr(default, "name", None) != name or not callable(getattr(default, "build", None)):
        raise ValueError(f"objective {name!r}: {_definition(factory)}() must give a config with name={name!r} and a "
                         f"build() method, got {default!r}")
    return OBJECTIVES.register(name, factory)


def objective_config(objective: Any) -> Any:
    """The config of `Experiment.objective`: a registered name stands for its default config; a config is kept."""
    if isinstance(objective, str):
        return OBJECTIVES.get(objective)()
    if callable(getattr(objective, "build", None)) and isinstance(getattr(objective, "name", None), str):
        return objective
    raise ValueError(f"objective must be a registered name ({', '.join(OBJECTIVES.names())}) or an objective "
                     f"config with `name` and `build()`, got {objective!r}")
