"""Random-access shard readers: JSONL, plain text files, array_record files and tfds array_record datasets.

Every reader is a sequence of documents: `len(shard)` records, and `shard.read(i)` returns the text of record `i` or
a `BadRecord` saying what is wrong with it and where (`file:line` for JSONL). Readers never raise for bad data: the
iterator decides (count and skip, or raise in strict mode). Random access is what makes a per-shard shuffle, the
multi-host split (record index modulo process count) and exact resume cheap: a position is just an index.

JSONL files are indexed once on open (one streaming pass finding newlines), then each record is one ranged read:
a process holds offsets, never the file, and reads only the records it draws. JSONL and text shards are read through
`etils.epath`, so they may live in a bucket (`gs://...`); array_record files are random access by design (read by
array_record's own file layer); tfds array_record datasets are read offline without TensorFlow through
`tfds.builder_from_directory(dir).as_data_source(split)` (tfrecord would need TensorFlow).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple, Protocol

import numpy as np
from etils import epath

from internlm2_jax.data.manifest import Manifest, ShardSpec

# Kinds of bad data, counted separately in the iterator's statistics.
MALFORMED_JSON = "malformed_json"
MISSING_TEXT_FIELD = "missing_text_field"
NON_STRING_TEXT = "non_string_text"
INVALID_UTF8 = "invalid_utf8"
EMPTY_DOCUMENT = "empty_document"
BAD_KINDS = (MALFORMED_JSON, MISSING_TEXT_FIELD, NON_STRING_TEXT, INVALID_UTF8, EMPTY_DOCUMENT)


class BadRecord(NamedTuple):
    kind: str  # one of BAD_KINDS
    where: str  # file:line, file#record or dir[split]#record
    detail: str

    def message(self) -> str:
        return f"{self.where}: {self.kind}: {self.detail}"


class ShardReader(Protocol):
    name: str

    def __len__(self) -> int: ...

    def read(self, index: int) -> str | BadRecord: ...

    def close(self) -> None: ...


def _check_text(text: str, where: str) -> str | BadRecord:
    if not text.strip():
        return BadRecord(EMPTY_DOCUMENT, where, "empty or whitespace-only text")
    try:
        text.encode("utf-8")  # JSON "\ud800" escapes decode to lone surrogates, which no tokenizer can encode
    except UnicodeEncodeError as e:
        return BadRecord(INVALID_UTF8, where, f"lone surrogate at character {e.start}")
    return text


def _decode(data: bytes, where: str) -> str | BadRecord:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(INVALID_UTF8, where, f"invalid UTF-8 at byte {e.start}")


def _text_from_json(data: bytes, text_field: str, where: str) -> str | BadRecord:
    decoded = _decode(data, where)
    if isinstance(decoded, BadRecord):
        return decoded
    if not decoded.strip():
        return BadRecord(EMPTY_DOCUMENT, where, "blank line")
    try:
        obj: Any = json.loads(decoded)
    except json.JSONDecodeError as e:
        return BadRecord(MALFORMED_JSON, where, f"{e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return BadRecord(MALFORMED_JSON, where, f"expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        return BadRecord(MISSING_TEXT_FIELD, where, f"no {text_field!r} field (fields: {sorted(obj)[:8]})")
    text = obj[text_field]
    if not isinstance(text, str):
        return BadRecord(NON_STRING_TEXT, where, f"{text_field!r} is a {type(text).__name__}, not a string")
    return _check_text(text, where)


def _line_spans(path: epath.Path, chunk_bytes: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Start and end byte offsets of every line (the newline excluded); a final line without newline counts."""
    newlines = []
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A) + size)
            size += len(chunk)
    ends = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends + 1]).astype(np.int64)
    if starts[-1] < size:  # the last line has no trailing newline
        ends = np.concatenate([ends, [size]])
    else:
        starts = starts[:-1]
    return starts, ends.astype(np.int64)


class JsonlReader:
    """One JSON object per line; record i is line i + 1 (blank lines count as empty documents)."""

    def __init__(self, path: epath.Path, text_field: str = "text"):
        self.path, self.name, self.text_field = path, str(path), text_field
        self._starts, self._ends = _line_spans(path)
        self._file = None

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def fingerprint(self) -> str:
        """sha256 of every line's offsets: which records exist and how long each is, known from the index without
        reading the file again (an edit that keeps every line's length is not seen)."""
        return hashlib.sha256(self._starts.tobytes() + self._ends.tobytes()).hexdigest()

    def where(self, index: int) -> str:
        return f"{self.path}:{index + 1}"

    def line(self, index: int) -> bytes:
        """The bytes of record `index` (without its newline or a CR before it): one seek and one read."""
        if self._file is None:
            self._file = self.path.open("rb")
        start, end = int(self._starts[index]), int(self._ends[index])
        self._file.seek(start)
        data = self._file.read(end - start)
        return data[:-1] if data.endswith(b"\r") else data

    def read(self, index: int) -> str | BadRecord:
        return _text_from_json(self.line(index), self.text_field, self.where(index))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TextFilesReader:
    """Plain text: a file is one document; a directory is every non-hidden file under it, in sorted order."""

    def __init__(self, path: epath.Path):
        self.name = str(path)
        if path.is_dir():
            self._files = sorted(_visible_files(path))
        else:
            self._files = [path]
            path.stat()  # a missing file fails here, at open, not at the first read

    def __len__(self) -> int:
        return len(self._files)

    def read(self, index: int) -> str | BadRecord:
        path = self._files[index]
        decoded = _decode(path.read_bytes(), str(path))
        return decoded if isinstance(decoded, BadRecord) else _check_text(decoded, str(path))

    def close(self) -> None:
        pass


def _visible_files(directory: epath.Path):
    """Files under `directory`, skipping hidden names at every level. By listing, not `rglob` or `walk`: epath
    supports neither for URLs (no `**`; fsspec's walk drops the `gs://`)."""
    for child in directory.iterdir():
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _visible_files(child)
        else:
            yield child


class ArrayRecordFileReader:
    """A plain array_record file whose records are UTF-8 text (`record_format="text"`) or JSON objects ("json")."""

    def __init__(self, path: epath.Path, record_format: str = "text", text_field: str = "text"):
        from array_record.python.array_record_module import ArrayRecordReader  # installed with grain

        if not path.is_file():
            raise FileNotFoundError(f"array_record file not found: {path}")
        self.path, self.name = path, str(path)
        self.record_format, self.text_field = record_format, text_field
        # No readahead: the mixture reads records in shuffled order, where readahead only wastes work.
        self._reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
        self._len = self._reader.num_records()

    def __len__(self) -> int:
        return self._len

    def read(self, index: int) -> str | BadRecord:
        data = self._reader.read([index])[0]
        where = f"{self.path}#{index}"
        if self.record_format == "json":
            return _text_from_json(data, self.text_field, where)
        decoded = _decode(data, where)
        return decoded if isinstance(decoded, BadRecord) else _check_text(decoded, where)

    def close(self) -> None:
        self._reader.close()


class TfdsReader:
    """A tensorflow-datasets dataset prepared in the array_record file format, read offline without TensorFlow."""

    def __init__(self, directory: epath.Path, split: str = "train", text_field: str = "text"):
        if not (directory / "dataset_info.json").is_file():
            raise FileNotFoundError(f"{directory} is not a tfds dataset directory (no dataset_info.json); give the "
                                    f"versioned directory, e.g. .../my_dataset/1.0.0")
        import tensorflow_datasets as tfds  # imported only when a tfds shard is used: a slow import

        self.name = f"{directory}[{split}]"
        builder = tfds.builder_from_directory(str(directory))
        features = getattr(builder.info.features, "keys", lambda: [])()
        if features and text_field not in features:
            raise KeyError(f"{self.name}: no feature {text_field!r} (features: {sorted(features)})")
        self._source = builder.as_data_source(split)
        self.text_field = text_field

    def __len__(self) -> int:
        return len(self._source)

    def read(self, index: int) -> str | BadRecord:
        where = f"{self.name}#{index}"
        value = self._source[index][self.text_field]  # tfds Text features come back as bytes
        if isinstance(value, bytes):
            value = _decode(value, where)
            if isinstance(value, BadRecord):
                return value
        if not isinstance(value, str):
            return BadRecord(NON_STRING_TEXT, where, f"{self.text_field!r} is a {type(value).__name__}")
        return _check_text(value, where)

    def close(self) -> None:
        pass


def open_shard(shard: ShardSpec, manifest: Manifest) -> ShardReader:
    path = manifest.resolve(shard)
    if shard.format == "jsonl":
        return JsonlReader(path, shard.text_field)
    if shard.format == "text":
        return TextFilesReader(path)
    if shard.format == "array_record":
        if path.is_dir():
            return TfdsReader(path, shard.split, shard.text_field)
        return ArrayRecordFileReader(path, shard.record_format, shard.text_field)
    raise ValueError(f"unknown shard format {shard.format!r}")  # manifest validation makes this unreachable
