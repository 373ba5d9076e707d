"""The data manifest: which shards the pretraining loader reads, how, and in what proportions.

A manifest is a JSON file (the data-curation issue emits it; `write_jsonl_shards` writes one for the demo):

    {"version": 1,
     "shards": [{"path": "code/high-00000.jsonl", "format": "jsonl", "text_field": "text",
                 "source": "code", "tier": "high", "num_tokens": 1234567, "weight": 2.0, "epochs": 4}]}

Shard fields:
- `path` (required): relative paths are relative to the manifest file's directory, so a data directory can move
  (into a bucket too: a manifest at `gs://b/data/manifest.json` reads `gs://b/data/<path>`); a URL is used as it is.
- `format` (required): `jsonl` (one JSON object per line, the document in `text_field`), `text` (a file is one
  document; a directory means every file under it, sorted, one document each) or `array_record` (a plain
  array_record file whose records are UTF-8 text, or JSON objects with `record_format: "json"`; or a directory
  written by tensorflow-datasets in the array_record file format, read offline with `split`).
- `text_field` ("text"), `source` (required), `tier` ("default"), `num_tokens` (optional, informational).
- `weight` (1.0): relative probability of drawing the next document from this shard (see `mixture.py`).
- `epochs` (1.0): how many passes over this shard make one pass over the mixture (high-quality data repeated, as in
  the report); fractional values take part of a pass.
- `split` ("train", tfds only) and `record_format` ("text" | "json", array_record files only).

Unknown keys are errors (a typo such as "wieght" must not silently fall back to a default). `manifest_hash` is a
sha256 of the normalised content (defaults filled in, paths as written), so it does not change when the directory
moves; checkpoints record it and the iterator refuses to resume on a different manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from internlm2_jax.paths import absolute, resolve_in

MANIFEST_VERSION = 1
FORMATS = ("jsonl", "array_record", "text")
RECORD_FORMATS = ("text", "json")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the shard index and the field."""


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    path: str
    format: str
    source: str
    text_field: str = "text"
    tier: str = "default"
    num_tokens: int | None = None
    weight: float = 1.0
    epochs: float = 1.0
    split: str = "train"
    record_format: str = "text"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(ShardSpec)}
_REQUIRED = ("path", "format", "source")


@dataclasses.dataclass(frozen=True)
class Manifest:
    shards: tuple[ShardSpec, ...]
    version: int = MANIFEST_VERSION
    base_dir: epath.Path | None = None  # where relative shard paths start; None: the current directory

    def resolve(self, shard: ShardSpec) -> epath.Path:
        return resolve_in(self.base_dir, shard.path)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "shards": [s.to_json() for s in self.shards]}

    @property
    def hash(self) -> str:
        return manifest_hash(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_shard(index: int, raw: Any) -> tuple[ShardSpec | None, list[str]]:
    where = f"shards[{index}]"
    if not isinstance(raw, Mapping):
        return None, [f"{where}: must be an object, got {type(raw).__name__}"]
    errors = [f"{where}.{key}: unknown field (known: {', '.join(sorted(_FIELDS))})" for key in raw
              if key not in _FIELDS]
    errors += [f"{where}.{key}: required field is missing" for key in _REQUIRED if key not in raw]
    for key in ("path", "source", "text_field", "tier", "split"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key]):
            errors.append(f"{where}.{key}: must be a non-empty string, got {raw[key]!r}")
    if "format" in raw and raw["format"] not in FORMATS:
        errors.append(f"{where}.format: must be one of {', '.join(FORMATS)}, got {raw['format']!r}")
    if "record_format" in raw and raw["record_format"] not in RECORD_FORMATS:
        errors.append(f"{where}.record_format: must be one of {', '.join(RECORD_FORMATS)}, "
                      f"got {raw['record_format']!r}")
    num_tokens = raw.get("num_tokens")
    if num_tokens is not None and (not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0):
        errors.append(f"{where}.num_tokens: must be a non-negative integer or null, got {num_tokens!r}")
    if "weight" in raw and not (_is_number(raw["weight"]) and raw["weight"] >= 0):
        errors.append(f"{where}.weight: must be a finite number >= 0, got {raw['weight']!r}")
    if "epochs" in raw and not (_is_number(raw["epochs"]) and raw["epochs"] > 0):
        errors.append(f"{where}.epochs: must be a finite number > 0, got {raw['epochs']!r}")
    if errors:
        return None, errors
    values = dict(raw)
    values["weight"] = float(values.get("weight", 1.0))
    values["epochs"] = float(values.get("epochs", 1.0))
    return ShardSpec(**values), []


def manifest_from_json(data: Any, *, base_dir: str | os.PathLike | None = None,
                       origin: str = "<manifest>") -> Manifest:
    """Validates a parsed manifest; raises `ManifestError` listing every problem found (shard index and field)."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"{origin}: the manifest must be a JSON object, got {type(data).__name__}")
    errors = [f"{key}: unknown top-level field (known: shards, version)" for key in data
              if key not in ("version", "shards")]
    version = data.get("version")
    if version != MANIFEST_VERSION:
        errors.append(f"version: this loader reads manifest version {MANIFEST_VERSION}, got {version!r}")
    raw_shards = data.get("shards")
    shards: list[ShardSpec] = []
    if not isinstance(raw_shards, list) or not raw_shards:
        errors.append(f"shards: must be a non-empty list, got {raw_shards!r}"[:200])
    else:
        for index, raw in enumerate(raw_shards):
            shard, shard_errors = _check_shard(index, raw)
            errors += shard_errors
            if shard is not None:
                shards.append(shard)
        if not errors and not any(s.weight > 0 for s in shards):
            errors.append("shards: every weight is 0, so nothing would ever be drawn")
    if errors:
        raise ManifestError(f"{origin}: invalid data manifest:\n  " + "\n  ".join(errors))
    return Manifest(tuple(shards), version=MANIFEST_VERSION, base_dir=epath.Path(base_dir) if base_dir else None)


def make_manifest(shards: Sequence[ShardSpec | Mapping[str, Any]], *,
                  base_dir: str | os.PathLike | None = None) -> Manifest:
    """A validated manifest from shard specs or plain dicts (the "list of sources" form the iterator accepts)."""
    raw = [s.to_json() if isinstance(s, ShardSpec) else dict(s) for s in shards]
    return manifest_from_json({"version": MANIFEST_VERSION, "shards": raw}, base_dir=base_dir)


def load_manifest(path: str | os.PathLike) -> Manifest:
    path = epath.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from e
    return manifest_from_json(data, base_dir=absolute(path).parent, origin=str(path))


def save_manifest(manifest: Manifest, path: str | os.PathLike) -> epath.Path:
    """Writes `manifest` as JSON. Paths are written as they are in the specs (relative ones stay relative)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def manifest_hash(manifest: Manifest) -> str:
    canonical = json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
