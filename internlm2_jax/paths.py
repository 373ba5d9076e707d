"""Paths a user gives (run and model directories, manifests and shards, tokenizers, outputs) are local or URLs
(`gs://bucket/run`, `s3://...`), and always `etils.epath.Path`, the type orbax uses: a URL stays a URL end to end.
`pathlib.Path` would fold "gs://b/run" into "gs:/b/run", and `resolve()` / `absolute()` (pathlib's or epath's) would
turn that into a local folder; `absolute` below resolves local paths only.

Object stores have no directories (`mkdir` is a no-op, a prefix exists while an object has it) and no appends:
`open_append` rewrites the whole object instead.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path; a local one with `~` expanded and made absolute (orbax refuses relative local paths),
    a URL as it is."""
    path = epath.Path(path)
    return path if is_url(path) else path.expanduser().resolve()


def resolve_in(directory: epath.Path | None, path: str | os.PathLike) -> epath.Path:
    """`path` as a file in `directory` names it (a manifest's shards, a suite's data): relative paths start at
    `directory` (None: the current directory), absolute ones and URLs are kept (joining a URL would mangle it)."""
    path = epath.Path(path).expanduser()
    return path if path.is_absolute() or directory is None else directory / path  # a URL is absolute


class _RewrittenObject:
    """Appends to an object in a bucket, which cannot be appended to: the content is kept and the whole object is
    written again on every flush (what tensorboardX's own GCS writer does; metrics and event files stay small)."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._data = bytearray(path.read_bytes() if path.exists() else b"")

    def write(self, data: bytes) -> int:
        self._data += data
        return len(data)

    def flush(self) -> None:
        self.path.write_bytes(bytes(self._data))

    def close(self) -> None:
        self.flush()


def open_append(path: str | os.PathLike) -> BinaryIO:
    """A binary file appending to `path` (created if missing): an ordinary file locally, a rewritten object for a
    URL (its appends reach the bucket on `flush` and `close`)."""
    path = epath.Path(path)
    return _RewrittenObject(path) if is_url(path) else path.open("ab")
