"""Checking a call's arguments against its JSON Schema, with messages written for the model: each names the field
(`'point.x'`, `'items[2]'`) and says what was wrong and what was expected.

The subset that tool schemas use: `type` (one or a list), `enum`, `const`, `properties`, `required`,
`additionalProperties` (false or a schema), `items`, `anyOf`, `minimum`/`maximum`, `exclusiveMinimum`/
`exclusiveMaximum` (numbers), `minLength`/`maxLength`, `minItems`/`maxItems`. Other keywords (`pattern`, `format`,
`$ref`, ...) are not checked. The semantics are JSON Schema's (2.0 is an integer, `true` is not a number), so an
independent validator (`jsonschema`, in the tests) agrees on every schema this module accepts.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterator, Mapping
from typing import Any

MAX_ERRORS = 5  # enough to fix a call in one go; a list of a hundred bad items is not worth telling in full

_BOUNDS = (("minimum", "≥", operator.ge), ("maximum", "≤", operator.le), ("exclusiveMinimum", ">", operator.gt),
           ("exclusiveMaximum", "<", operator.lt))


def argument_errors(arguments: Any, schema: Mapping[str, Any] | None) -> list[str]:
    """What is wrong with `arguments` under `schema` (at most MAX_ERRORS messages); empty when nothing is, or when
    there is no schema."""
    if not isinstance(schema, Mapping):
        return []
    errors = []
    for error in _errors(arguments, schema, ""):
        errors.append(error)
        if len(errors) == MAX_ERRORS:
            break
    return errors


def json_type(value: Any) -> str:
    """The JSON type of a decoded JSON value ("integer" for ints, "number" for floats)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, types in (("integer", int), ("number", float), ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _is(value: Any, kind: str) -> bool:
    actual = json_type(value)
    if kind == "number":
        return actual in ("integer", "number")
    if kind == "integer":
        return actual == "integer" or (actual == "number" and math.isfinite(value) and value.is_integer())
    return actual == kind


def _label(path: str) -> str:
    return f"argument {path!r}" if path else "the arguments"


def _same(a: Any, b: Any) -> bool:
    """JSON equality: `true` is not 1, 1.0 is 1."""
    kind_a, kind_b = json_type(a), json_type(b)
    numbers = ("integer", "number")
    return a == b and (kind_a == kind_b or (kind_a in numbers and kind_b in numbers))


def _errors(value: Any, schema: Mapping[str, Any], path: str) -> Iterator[str]:
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not any(not next(_errors(value, option, path), None) for option in options):
            kinds = [option.get("type", "something else") for option in options]
            flat = [kind for kind in kinds for kind in ([kind] if isinstance(kind, str) else kind)]
            yield f"{_label(path)} must be {' or '.join(dict.fromkeys(flat))}, got {json_type(value)}"
            return
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is(value, kind) for kind in kinds):
            yield f"{_label(path)} must be {' or '.join(kinds)}, got {json_type(value)}"
            return  # the other keywords would only repeat the same mistake
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        allowed = ", ".join(json.dumps(option, ensure_ascii=False) for option in schema["enum"])
        yield f"{_label(path)} must be one of {allowed}; got {_short(value)}"
    if "const" in schema and not _same(value, schema["const"]):
        yield f"{_label(path)} must be {_short(schema['const'])}; got {_short(value)}"
    if json_type(value) in ("integer", "number"):
        for keyword, sign, holds in _BOUNDS:
            bound = schema.get(keyword)
            if isinstance(bound, (int, float)) and not isinstance(bound, bool) and not holds(value, bound):
                yield f"{_label(path)} must be {sign} {bound}, got {value}"
    if isinstance(value, (str, list)):
        unit, low, high = ("characters", "minLength", "maxLength") if isinstance(value, str) else (
            "items", "minItems", "maxItems")
        if isinstance(schema.get(low), int) and len(value) < schema[low]:
            yield f"{_label(path)} must have at least {schema[low]} {unit}, got {len(value)}"
        if isinstance(schema.get(high), int) and len(value) > schema[high]:
            yield f"{_label(path)} must have at most {schema[high]} {unit}, got {len(value)}"
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            yield from _errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        yield from _object_errors(value, schema, path)


def _object_errors(value: dict[str, Any], schema: Mapping[str, Any], path: str) -> Iterator[str]:
    prefix = f"{path}." if path else ""
    for name in schema.get("required", ()):
        if name not in value:
            yield f"{_label(prefix + name)} is required"
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            if isinstance(properties[name], Mapping):
                yield from _errors(item, properties[name], prefix + name)
        elif extra is False:
            expected = ", ".join(properties) or "no arguments"
            yield f"{_label(prefix + name)} is not expected (expected: {expected})"
        elif isinstance(extra, Mapping):
            yield from _errors(item, extra, prefix + name)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else f"{text[:limit]}…"
