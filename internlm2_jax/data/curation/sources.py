"""Curation inputs: JSONL shards and trees of code or text files, cut into work units that are read as streams.

A **work unit** is the grain of parallelism and of resumption: a byte range of a JSONL file (about `unit_bytes`,
cut at line boundaries, so one huge file still spreads over every worker) or a batch of files of a tree (for code,
whole repositories: a repository never straddles two units). Units are numbered in a fixed order (inputs as given,
files sorted), and a document's integer **key** is `unit << 32 | record`, so "keep the smallest key" in dedup means
"keep the first occurrence in input order" on every runner and for any number of workers.

Reading never raises for bad data: a record that cannot be a document (malformed JSON, invalid UTF-8, a binary file,
an empty text, a missing or non-string text field, an oversized record) becomes a `Reject` carrying the raw content,
so the pipeline can quarantine it with its reason and location. Nothing vanishes silently.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "code", "text")
KINDS = ("code", "text")
KEY_BITS = 32  # records per unit < 2**32


class InputError(ValueError):
    """An input that cannot be read at all (missing path, unknown format); bad records are `Reject`s instead."""


@dataclasses.dataclass(frozen=True)
class InputConfig:
    path: str  # a JSONL file, a directory or glob of *.jsonl files, or the root of a code/text tree
    format: str = "jsonl"  # "jsonl" | "code" (a tree of source files) | "text" (a tree of text files)
    source: str = ""  # the name in the manifest and the report; default: the path's name
    kind: str = ""  # which cleaning preset: "code" | "text"; default: "code" for code trees, else "text"
    text_field: str = "text"
    id_field: str = "id"  # JSONL: a field to use as the document id (default id: file:line)
    suffixes: tuple[str, ...] = (".py",)  # code trees: the files that are documents
    repo_depth: int = 1  # code trees: how many leading path components name a repository
    weight: float = 1.0  # multiplies the tier weights of this source in the manifest

    @property
    def source_name(self) -> str:
        return self.source or Path(self.path.rstrip("/")).name.split(".")[0] or "input"

    @property
    def cleaning_kind(self) -> str:
        return self.kind or ("code" if self.format == "code" else "text")

    def validate(self, where: str) -> None:
        if self.format not in FORMATS:
            raise InputError(f"{where}.format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.kind and self.kind not in KINDS:
            raise InputError(f"{where}.kind: must be one of {', '.join(KINDS)} or empty, got {self.kind!r}")
        if self.repo_depth < 1:
            raise InputError(f"{where}.repo_depth: must be >= 1, got {self.repo_depth}")
        if not (self.weight >= 0):
            raise InputError(f"{where}.weight: must be >= 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    index: int
    input_index: int
    path: str  # the JSONL file, or the tree root
    start: int = 0  # JSONL: byte range [start, end), starting at a line start
    end: int = 0
    first_line: int = 1  # JSONL: the line number of `start`
    files: tuple[str, ...] = ()  # trees: paths relative to `path`
    size: int = 0  # bytes, for progress and balancing

    def key(self, record: int) -> int:
        return (self.index << KEY_BITS) | record


@dataclasses.dataclass
class Document:
    key: int
    id: str  # human-readable provenance: "file:line", the record's own id, or the tree-relative path
    text: str
    meta: dict[str, Any]


@dataclasses.dataclass
class Reject:
    key: int
    where: str  # file:line or file path
    reason: str  # malformed_json | invalid_utf8 | binary | empty | missing_text_field | non_string_text | oversized
    detail: str
    raw: str  # the raw content, undecodable bytes backslash-escaped, so nothing is lost


def _jsonl_files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    return [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]


def _line_aligned_ranges(path: Path, unit_bytes: int) -> list[tuple[int, int, int]]:
    """(start, end, first_line) byte ranges of about `unit_bytes`, each starting at a line start."""
    size = path.stat().st_size
    ranges, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + unit_bytes, size))
            f.readline()  # finish the line the cut falls into
            end = min(f.tell(), size) if start + unit_bytes < size else size
            f.seek(start)
            lines = f.read(end - start).count(b"\n")
            ranges.append((start, end, line))
            start, line = end, line + lines
    return ranges


def _tree_files(root: Path, suffixes: tuple[str, ...] | None) -> list[tuple[str, int]]:
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts):
            if suffixes is None or p.suffix in suffixes:
                files.append((p.relative_to(root).as_posix(), p.stat().st_size))
    return files


def _file_batches(files: list[tuple[str, int]], unit_bytes: int, repo_depth: int | None):
    """Consecutive files of about `unit_bytes`; with `repo_depth`, a repository (the first `repo_depth` path
    components) is never split, because dependency ordering needs all of its files together."""
    batch, size, previous = [], 0, None
    for rel, file_size in files:
        group = "/".join(rel.split("/")[:repo_depth]) if repo_depth else rel
        if batch and group != previous and size >= unit_bytes:
            yield batch
            batch, size = [], 0
        batch.append((rel, file_size))
        size += file_size
        previous = group
    if batch:
        yield batch


def plan_units(inputs: tuple[InputConfig, ...], unit_bytes: int) -> list[WorkUnit]:
    """Cuts every input into work units, in a fixed order; raises `InputError` for a missing or empty input."""
    units: list[WorkUnit] = []
    for i, spec in enumerate(inputs):
        spec.validate(f"inputs[{i}]")
        root = Path(spec.path).expanduser()
        if spec.format == "jsonl":
            files = _jsonl_files(spec.path)
            if not files:
                raise InputError(f"inputs[{i}].path: no JSONL file at {spec.path!r}")
            for f in files:
                for start, end, line in _line_aligned_ranges(f, unit_bytes):
                    units.append(WorkUnit(len(units), i, str(f), start, end, line, size=end - start))
            continue
        if not root.is_dir():
            raise InputError(f"inputs[{i}].path: {spec.path!r} is not a directory (format {spec.format!r} reads "
                             "a tree)")
        files = _tree_files(root, spec.suffixes if spec.format == "code" else None)
        if not files:
            raise InputError(f"inputs[{i}].path: no files under {spec.path!r}")
        for batch in _file_batches(files, unit_bytes, spec.repo_depth if spec.format == "code" else None):
            units.append(WorkUnit(len(units), i, str(root), files=tuple(r for r, _ in batch),
                                  size=sum(s for _, s in batch)))
    if len(units) >= 1 << (63 - KEY_BITS):
        raise InputError(f"{len(units)} work units is too many for 64-bit document keys: raise unit_bytes")
    return units


def _escaped(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def _jsonl_record(line: bytes, size: int, spec: InputConfig, key: int, where: str,
                  max_bytes: int) -> Document | Reject:
    def reject(reason, detail):
        return Reject(key, where, reason, detail, _escaped(line))

    if size > max_bytes:
        return reject("oversized", f"{size} bytes > max_record_bytes {max_bytes} (first {len(line)} bytes kept)")
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return reject("invalid_utf8", f"invalid UTF-8 at byte {e.start}")
    if not decoded.strip():
        return reject("empty", "blank line")
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        return reject("malformed_json", f"{e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return reject("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    if spec.text_field not in obj:
        return reject("missing_text_field", f"no {spec.text_field!r} field (fields: {sorted(obj)[:8]})")
    text = obj.pop(spec.text_field)
    if not isinstance(text, str):
        return reject("non_string_text", f"{spec.text_field!r} is a {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a "\ud800" escape decodes to a lone surrogate no tokenizer can encode
        return reject("invalid_utf8", f"lone surrogate at character {e.start}")
    if not text.strip():
        return reject("empty", "empty or whitespace-only text")
    meta = obj.pop("meta", None)
    meta = dict(meta) if isinstance(meta, dict) else ({} if meta is None else {"meta": meta})
    meta.update(obj)  # other top-level fields (url, repo, ...) are kept with the document
    doc_id = obj.get(spec.id_field) if isinstance(obj.get(spec.id_field), str) else where
    meta["provenance"] = where
    return Document(key, doc_id, text, meta)


def _tree_record(root: Path, rel: str, spec: InputConfig, key: int, max_bytes: int) -> Document | Reject:
    path = root / rel
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        return Reject(key, str(path), "unreadable", str(e), "")
    if size > max_bytes:
        return Reject(key, str(path), "oversized", f"{size} bytes > max_record_bytes {max_bytes}",
                      _escaped(data[:4096]))
    if b"\x00" in data[:8192]:  # how git and grep tell binary files: text never contains NUL
        return Reject(key, str(path), "binary", "NUL byte in the first 8 KB", _escaped(data[:4096]))
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the text
    except UnicodeDecodeError as e:
        return Reject(key, str(path), "invalid_utf8", f"invalid UTF-8 at byte {e.start}", _escaped(data))
    if not text.strip():
        return Reject(key, str(path), "empty", "empty or whitespace-only file", text)
    meta: dict[str, Any] = {"provenance": str(path), "path": rel}
    if spec.format == "code":  # the path within its repository, as imports see it
        parts = rel.split("/")
        meta["repo"], meta["path"] = "/".join(parts[:spec.repo_depth]), "/".join(parts[spec.repo_depth:]) or rel
    return Document(key, rel, text, meta)


def read_unit(unit: WorkUnit, spec: InputConfig, *, max_record_bytes: int) -> Iterator[Document | Reject]:
    """The unit's records in order, as documents or rejects; memory is one record at a time."""
    if unit.files:
        root = Path(unit.path)
        for record, rel in enumerate(unit.files):
            yield _tree_record(root, rel, spec, unit.key(record), max_record_bytes)
        return
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        position, line_no = unit.start, unit.first_line
        record = 0
        while position < unit.end:
            line = f.readline(max_record_bytes + 2)  # bounded: a 10 GB line must not be read into memory
            size = len(line)
            while not line.endswith(b"\n") and position + size < unit.end:
                chunk = f.readline(1 << 20)  # skip the rest of an oversized line
                if not chunk:
                    break
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            position += size
            body = line.rstrip(b"\r\n")
            yield _jsonl_record(body, size if size > len(line) else len(body), spec, unit.key(record),
                                f"{unit.path}:{line_no}", max_record_bytes)
            record += 1
            line_no += 1
