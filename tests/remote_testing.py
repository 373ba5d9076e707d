"""A fake Google Cloud Storage bucket for tests: everything written to `gs://` lands in one in-memory store, reached
the two ways production reaches a bucket, so the real client code of both runs:

- `etils.epath` (our code, orbax's metadata files and directory listings) uses fsspec's "gs" protocol, which gcsfs
  serves in production and `FakeGcsFileSystem` serves here;
- tensorstore (orbax's array data) uses its own GCS HTTP driver, pointed by TENSORSTORE_GCS_HTTP_URL at
  `FakeGcsServer`: a local HTTP server speaking the part of the GCS JSON API that driver uses (insert, get with byte
  ranges, list, delete, with generation preconditions), with tensorstore's fixed test token for credentials.

Like GCS, an object appears whole when its write finishes, there are no directories (only name prefixes) and an
object cannot be appended to. (A plain module, not conftest.py: only the remote-storage tests use it.)
"""

from __future__ import annotations

import contextlib
import http.server
import importlib
import io
import json
import threading
import urllib.parse
from collections.abc import Iterator

import fsspec
from fsspec.spec import AbstractFileSystem


class ObjectStore:
    """Objects by "bucket/name", each with the generation (a store-wide counter) of the write that made it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, int]] = {}
        self._generation = 0
        self.unhandled: list[str] = []  # requests the fake server does not implement (a test asserts none)
        self.bytes_read = 0  # bytes epath has read (what a reader costs in transfers)

    def put(self, name: str, data: bytes) -> int:
        with self._lock:
            self._generation += 1
            self._objects[name] = (bytes(data), self._generation)
            return self._generation

    def get(self, name: str) -> tuple[bytes, int] | None:
        with self._lock:
            return self._objects.get(name)

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._objects.pop(name, None) is not None

    def names(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n in self._objects if n.startswith(prefix))

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self.unhandled.clear()
            self.bytes_read = 0


STORE = ObjectStore()


# ---- what epath sees: an fsspec filesystem ---------------------------------------------------------------------------

class _Download(io.BytesIO):
    """A read of an object that counts the bytes it delivers (gcsfs fetches what is read, in ranges)."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        STORE.bytes_read += len(data)
        return data


class _Upload(io.BytesIO):
    """A write that becomes the object when closed, as a GCS upload does."""

    def __init__(self, name: str):
        super().__init__()
        self.object_name = name

    def close(self) -> None:
        if not self.closed:
            STORE.put(self.object_name, self.getvalue())
        super().close()


class FakeGcsFileSystem(AbstractFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path) -> str:
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.strip("/")

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        if STORE.get(path) is not None:
            entries = [self.info(path)]
        else:
            children = {}
            for name in STORE.names(path + "/"):
                child = name[len(path) + 1:].split("/", 1)[0]
                full = f"{path}/{child}"
                children[full] = self.info(full)
            if not children:
                raise FileNotFoundError(path)
            entries = list(children.values())
        return entries if detail else [e["name"] for e in entries]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        found = STORE.get(path)
        if found is not None:
            return {"name": path, "size": len(found[0]), "type": "file"}
        if STORE.names(path + "/"):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if mode == "rb":
            found = STORE.get(path)
            if found is None:
                raise FileNotFoundError(path)
            return _Download(found[0])
        if mode == "wb":
            return _Upload(path)
        raise NotImplementedError(f"GCS objects cannot be opened with mode {mode!r} (no appends)")

    def mkdir(self, path, create_parents=True, **kwargs):
        pass  # no directories: a prefix exists while an object has it

    def makedirs(self, path, exist_ok=False):
        pass

    def rmdir(self, path):
        pass

    def rm(self, path, recursive=False, maxdepth=None):
        for p in path if isinstance(path, list) else [path]:
            p = self._strip_protocol(p)
            names = ([p] if STORE.get(p) is not None else []) + (STORE.names(p + "/") if recursive else [])
            if not names:
                raise FileNotFoundError(p)
            for name in names:
                STORE.delete(name)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        names = [src] if STORE.get(src) is not None else STORE.names(src + "/")
        if not names:
            raise FileNotFoundError(src)
        for name in names:  # GCS renames are copies and deletes, object by object
            STORE.put(dst + name[len(src):], STORE.get(name)[0])
            STORE.delete(name)


# ---- what tensorstore sees: the GCS JSON API over HTTP ---------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _metadata(self, name: str, data: bytes, generation: int) -> dict:
        bucket, object_name = name.split("/", 1)
        return {"kind": "storage#object", "bucket": bucket, "name": object_name, "size": str(len(data)),
                "generation": str(generation), "metageneration": "1"}

    def _preconditions_fail(self, query: dict, found: tuple[bytes, int] | None) -> int | None:
        """The status GCS answers when `ifGenerationMatch` / `ifGenerationNotMatch` fail (0 means "no object")."""
        generation = found[1] if found else 0
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
            return 412
        if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
            return 304
        return None

    def _route(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = url.path.split("/")
        if parts[1:4] == ["upload", "storage", "v1"] and parts[4] == "b" and self.command == "POST":
            return self._insert(parts[5], query, body)
        if parts[1:3] == ["storage", "v1"] and parts[3] == "b" and len(parts) >= 6 and parts[5] == "o":
            bucket = parts[4]
            if len(parts) == 6 and self.command == "GET":
                return self._list(bucket, query)
            name = f"{bucket}/{urllib.parse.unquote('/'.join(parts[6:]))}"
            if self.command == "GET":
                return self._get(name, query)
            if self.command == "DELETE":
                return self._delete(name, query)
        STORE.unhandled.append(f"{self.command} {self.path}")
        self._reply(501, b'{"error": {"code": 501, "message": "not implemented by the fake bucket"}}')

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = _route

    def _insert(self, bucket: str, query: dict, body: bytes) -> None:
        name = f"{bucket}/{query['name']}"
        if (status := self._preconditions_fail(query, STORE.get(name))) is not None:
            return self._reply(412 if status == 304 else status)
        generation = STORE.put(name, body)
        self._reply(200, json.dumps(self._metadata(name, body, generation)).encode(),
                    {"Content-Type": "application/json"})

    def _get(self, name: str, query: dict) -> None:
        found = STORE.get(name)
        if (status := self._preconditions_fail(query, found)) is not None:
            return self._reply(status)
        if found is None:
            return self._reply(404, b'{"error": {"code": 404, "message": "No such object"}}')
        data, generation = found
        if query.get("alt") != "media":
            return self._reply(200, json.dumps(self._metadata(name, data, generation)).encode(),
                               {"Content-Type": "application/json"})
        headers = {"x-goog-generation": str(generation), "x-goog-metageneration": "1",
                   "Content-Type": "application/octet-stream"}
        ranged = self.headers.get("Range", "").removeprefix("bytes=")
        if not ranged:
            return self._reply(200, data, headers)
        first, _, last = ranged.partition("-")
        start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        if start >= len(data) and len(data) > 0:
            return self._reply(416, b"", headers)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._reply(206, data[start:end + 1], headers)

    def _delete(self, name: str, query: dict) -> None:
        found = STORE.get(name)
        if (status := self._preconditions_fail(query, found)) is not None:
            return self._reply(412 if status == 304 else status)
        self._reply(204 if STORE.delete(name) else 404)

    def _list(self, bucket: str, query: dict) -> None:
        prefix = f"{bucket}/{query.get('prefix', '')}"
        names = [n for n in STORE.names(prefix)
                 if n[len(bucket) + 1:] >= query.get("startOffset", "")
                 and ("endOffset" not in query or n[len(bucket) + 1:] < query["endOffset"])
                 and n[len(bucket) + 1:] > query.get("pageToken", "")]
        page = names[:int(query.get("maxResults", 1000))]
        items = [self._metadata(n, *STORE.get(n)) for n in page if STORE.get(n) is not None]
        reply = {"kind": "storage#objects", "items": items}
        if len(names) > len(page):
            reply["nextPageToken"] = page[-1][len(bucket) + 1:]
        self._reply(200, json.dumps(reply).encode(), {"Content-Type": "application/json"})


_server: http.server.ThreadingHTTPServer | None = None


def _start_server() -> str:
    """One server per process (tensorstore reads its endpoint once); returns its URL."""
    global _server
    if _server is None:
        _server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        _server.daemon_threads = True
        threading.Thread(target=_server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{_server.server_port}"


@contextlib.contextmanager
def fake_gcs(monkeypatch) -> Iterator[ObjectStore]:
    """Routes `gs://` (epath, fsspec and tensorstore) to an empty in-memory bucket store for the duration."""
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", _start_server())
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")  # tensorstore's credentials for tests
    monkeypatch.setenv("EPATH_USE_TF", "false")  # epath's fsspec backend, as without TensorFlow
    # A flat-namespace bucket: what orbax would ask the storage client (not installed) before deleting a step.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    registry = importlib.import_module("fsspec.registry")._registry  # `fsspec.registry` is its read-only view
    before = {protocol: registry.get(protocol) for protocol in FakeGcsFileSystem.protocol}
    for protocol in FakeGcsFileSystem.protocol:
        fsspec.register_implementation(protocol, FakeGcsFileSystem, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    STORE.clear()
    try:
        yield STORE
    finally:
        STORE.clear()
        backend.fsspec_backend._get_filesystem.cache_clear()
        for protocol, implementation in before.items():
            if implementation is None:
                registry.pop(protocol, None)
            else:
                registry[protocol] = implementation
