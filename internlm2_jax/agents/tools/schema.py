"""JSON Schema from Python type hints and Google-style docstrings (what `@tool` announces to the model), and the way
back: validated JSON arguments turned into the values the hints ask for (dataclasses built, ints made floats).

Supported hints: str, int, float, bool, Any, Literal[...] (an enum), X | None and Optional[X] (null allowed),
list/Sequence/set/tuple[X, ...] (an array), dict[str, X] (an object of X), a TypedDict or a dataclass (an object
with its fields), and Annotated[X, ...] whose string metadata is the description and whose mapping metadata is
merged into the schema (e.g. `Annotated[int, {"minimum": 1}]`). Anything else is refused when the tool is made, not
when the model calls it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import re
import types
from collections.abc import Callable, Mapping
from typing import (Annotated, Any, Literal, NotRequired, Required, Union, get_args, get_origin, get_type_hints,
                    is_typeddict)

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARRAYS = {list, set, frozenset, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Set}
_SECTIONS = {"args", "arguments", "parameters", "returns", "return", "raises", "yields", "examples", "example",
             "notes", "note", "see also"}
_ARG_LINE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def function_schema(fn: Callable[..., Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(description, parameters schema, hints by parameter name) of a function; the description is the docstring's
    text before its first section, and each `Args:` entry describes its parameter."""
    description, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
    hints = get_type_hints(fn, include_extras=True)
    properties, required, kept = {}, [], {}
    for name, parameter in inspect.signature(fn).parameters.items():
        where = f"{fn.__qualname__}({name})"
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
            raise TypeError(f"{where}: a tool's parameters are named JSON fields; *args, **kwargs and positional-only "
                            "parameters cannot be given")
        if name not in hints:
            raise TypeError(f"{where}: has no type hint, so the model could not be told what to pass")
        schema = type_schema(hints[name], where)
        if name in arg_docs:
            schema.setdefault("description", arg_docs[name])
        if parameter.default is parameter.empty:
            required.append(name)
        elif _is_json(parameter.default):
            schema["default"] = parameter.default
        properties[name] = schema
        kept[name] = hints[name]
    return description, _object(properties, required), kept


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the text before the first section, {parameter: description} from its `Args:` section), each paragraph on
    one line."""
    description, args, section, current, indent = [], {}, None, None, None
    for line in inspect.cleandoc(doc).splitlines():
        stripped = line.strip()
        if not line.startswith((" ", "\t")) and stripped.rstrip(":").lower() in _SECTIONS and stripped.endswith(":"):
            section, current, indent = stripped.rstrip(":").lower(), None, None
            continue
        if section is None:
            description.append(line)
        elif section in ("args", "arguments", "parameters") and stripped:
            depth = len(line) - len(line.lstrip())
            match = _ARG_LINE.match(stripped)
            if match and (indent is None or depth <= indent):
                indent, current = depth, match.group(1)
                args[current] = match.group(2).strip()
            elif current is not None:  # a continuation line of the current entry
                args[current] = f"{args[current]} {stripped}".strip()
    # Docstring lines are wrapped for the source file, not for the model: each paragraph becomes one line.
    paragraphs = "\n".join(description).strip().split("\n\n")
    return "\n".join(" ".join(paragraph.split()) for paragraph in paragraphs if paragraph.strip()), args


def type_schema(hint: Any, where: str) -> dict[str, Any]:
    """The JSON Schema of values of type `hint`; `where` names the parameter in the error for an unsupported hint."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        schema = type_schema(args[0], where)
        for meta in args[1:]:
            if isinstance(meta, str):
                schema["description"] = meta
            elif isinstance(meta, Mapping):
                schema.update(meta)
        return schema
    if hint is Any:
        return {}
    if origin is None and hint in _SIMPLE:  # (generic aliases may carry unhashable Annotated metadata)
        return {"type": _SIMPLE[hint]}
    if origin is Literal:
        kinds = sorted({_json_kind(value) for value in args})
        if "other" in kinds:
            raise TypeError(f"{where}: Literal values must be str, int, float, bool or None, got {args!r}")
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin in (Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        schema = (type_schema(options[0], where) if len(options) == 1
                  else {"anyOf": [type_schema(option, where) for option in options]})
        return _nullable(schema) if len(options) < len(args) else schema
    if origin in _ARRAYS or (origin is None and hint in _ARRAYS):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"{where}: only tuple[X, ...] is supported (fixed-length tuples have no plain schema)")
        return {"type": "array", "items": type_schema(args[0], where) if args else {}}
    if origin in (dict, collections.abc.Mapping) or (origin is None and hint in (dict, collections.abc.Mapping)):
        if args and args[0] is not str:
            raise TypeError(f"{where}: JSON object keys are strings, got dict[{args[0]!r}, ...]")
        return {"type": "object", "additionalProperties": type_schema(args[1], where) if args else {}}
    if is_typeddict(hint) or (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        fields = _record_fields(hint)
        properties = {name: type_schema(field_hint, f"{where}.{name}") for name, (field_hint, _) in fields.items()}
        return _object(properties, [name for name, (_, needed) in fields.items() if needed])
    raise TypeError(f"{where}: {hint!r} has no JSON Schema here; use str, int, float, bool, Literal, a list, "
                    "dict[str, X], a TypedDict or a dataclass")


def from_json(value: Any, hint: Any) -> Any:
    """`value` (already valid under `type_schema(hint)`) as the hint wants it: dataclasses built, JSON integers as
    float where a float is wanted, arrays as the tuple or set asked for."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return from_json(value, args[0])
    if value is None:
        return None
    if hint is float:
        return float(value)
    if hint is int:
        return int(value)  # JSON Schema counts 2.0 as an integer; the function should get 2
    if origin in (Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        return from_json(value, options[0]) if len(options) == 1 else value
    if origin in _ARRAYS and args:
        items = [from_json(item, args[0]) for item in value]
        return origin(items) if origin in (tuple, set, frozenset) else items
    if origin in (dict, collections.abc.Mapping) and args:
        return {key: from_json(item, args[1]) for key, item in value.items()}
    if is_typeddict(hint) or (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        fields = _record_fields(hint)
        converted = {name: from_json(item, fields[name][0]) for name, item in value.items()}
        return hint(**converted)
    return value


def _record_fields(hint: type) -> dict[str, tuple[Any, bool]]:
    """{field: (its hint, whether it is required)} of a TypedDict or a dataclass."""
    hints = get_type_hints(hint, include_extras=True)
    if is_typeddict(hint):  # (Required[X] / NotRequired[X] say what __required_keys__ already says)
        return {name: (_unwrap_required(hints[name]), name in hint.__required_keys__) for name in hints}
    missing = dataclasses.MISSING
    return {field.name: (hints[field.name], field.default is missing and field.default_factory is missing)
            for field in dataclasses.fields(hint) if field.init}


def _unwrap_required(hint: Any) -> Any:
    return get_args(hint)[0] if get_origin(hint) in (Required, NotRequired) else hint


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    # Extra keys are refused: a misspelt optional argument would otherwise be dropped without a word.
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        schema = {**schema, "type": [kind, "null"]}
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number"}.get(type(value), "other")


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True

