"""The one config mechanism of every CLI: frozen dataclasses, changed from the command line by `--set a.b=value`.

Values are parsed by the declared type of the field they replace (int, float, bool, str, tuples, Optional, nested
dataclasses), so `--set train.steps=1e3` is an error that names the field, not a silent float.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any


class OverrideError(ValueError):
    """A `--set` names a field that does not exist or gives a value of the wrong type."""


def _parse(text: str, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text in ("None", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(text, arg, where)
            except OverrideError as e:
                errors.append(str(e))
        raise OverrideError(errors[0] if errors else f"{where}: cannot parse {text!r}")
    if annotation is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise OverrideError(f"{where}: expected true/false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise OverrideError(f"{where}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise OverrideError(f"{where}: expected a number, got {text!r}") from None
    if annotation is str or annotation is typing.Any:
        return text
    if origin is tuple:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(t.strip() for t in text.split(",") if t.strip())
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if typing.get_origin(annotation) is typing.Literal:
        if text not in args:
            raise OverrideError(f"{where}: expected one of {args}, got {text!r}")
        return text
    raise OverrideError(f"{where}: fields of type {annotation} cannot be set from the command line")


def apply_overrides(config: Any, assignments: Sequence[str]) -> Any:
    """A copy of `config` (a frozen dataclass tree) with each `path.to.field=value` applied, in order."""
    for assignment in assignments:
        if "=" not in assignment:
            raise OverrideError(f"--set {assignment!r}: expected path.to.field=value")
        path, text = assignment.split("=", 1)
        config = _set(config, path.strip().split("."), text.strip(), path.strip())
    return config


def _set(node: Any, keys: list[str], text: str, where: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise OverrideError(f"{where}: {type(node).__name__} has no fields to set")
    fields = {f.name: f for f in dataclasses.fields(node)}
    key = keys[0]
    if key not in fields:
        raise OverrideError(f"{where}: {type(node).__name__} has no field {key!r}; fields: {sorted(fields)}")
    hints = typing.get_type_hints(type(node))
    if len(keys) == 1:
        value = _parse(text, hints[key], where)
    else:
        child = getattr(node, key)
        if child is None:  # e.g. `--set model.lora.rank=8` on a model without adapters: start from the defaults
            child = _default_instance(hints[key], where.rsplit(".", len(keys) - 1)[0])
        value = _set(child, keys[1:], text, where)
    try:
        return dataclasses.replace(node, **{key: value})
    except ValueError as e:  # the dataclass's own validation, e.g. ConfigError
        raise OverrideError(f"{where}={text}: {e}") from None


def _default_instance(annotation: Any, where: str) -> Any:
    """The default-constructed dataclass of an `X | None` field that is None, so that its fields can be set."""
    candidates = [a for a in (typing.get_args(annotation) or (annotation,))
                  if isinstance(a, type) and dataclasses.is_dataclass(a)]
    if len(candidates) != 1:
        raise OverrideError(f"{where} is None and its type {annotation} is not one dataclass; set {where} as a whole")
    try:
        return candidates[0]()
    except (TypeError, ValueError) as e:  # required fields, or defaults its own validation refuses
        raise OverrideError(f"{where} is None and {candidates[0].__name__} has no usable defaults ({e})") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass tree (what checkpoints and run directories record)."""
    return dataclasses.asdict(config)
