"""Reading and writing safetensors files without torch, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets) and the raw
bytes. Reading takes each tensor with one ranged read of its bytes, so a tensor costs host memory only when it is
asked for; writing plans every shard from shapes alone and streams each tensor's bytes, so neither direction ever
holds two copies of a model. Both go through `etils.epath`, so a model directory may be in a bucket (`gs://...`):
ranged reads are what a bucket offers (a memory map would only work on local disk), and the same code reads local
files. bf16 goes through `ml_dtypes` (a jax dependency), which numpy alone cannot represent.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
from etils import epath

from internlm2_jax.paths import is_url

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or directory is malformed or does not fit the config; the message names what and where."""


class SafetensorsFile:
    """One `.safetensors` file: its header, and each tensor read when it is asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        size = self.path.stat().length
        with self.path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: header length {header_len} exceeds the file size {size}; "
                                      "the file is truncated or not safetensors")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor '{name}' ends at byte {self._data_start + end} but the "
                                      f"file has {size} bytes; the file is truncated")
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {entry['dtype']}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def read(self, name: str) -> np.ndarray:
        """The tensor, read-only (copy it before changing it)."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        if end == begin:
            return np.zeros(entry["shape"], dtype)
        with self.path.open("rb") as f:  # opened per tensor: no handle outlives the reader's use
            f.seek(self._data_start + begin)
            data = f.read(end - begin)
        return np.frombuffer(data, dtype).reshape(entry["shape"])


class CheckpointReader:
    """All tensors of a HF model directory: sharded with an index, one `model.safetensors`, or several files."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = epath.Path(directory)
        index = self.directory / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{self.directory}: no *.safetensors files (only safetensors weights are read)")
        self._files = {}
        for name in files:
            if not (self.directory / name).exists():
                raise CheckpointError(f"{self.directory}: {INDEX_NAME} names '{name}', which does not exist")
            self._files[name] = SafetensorsFile(self.directory / name)
        self._where: dict[str, SafetensorsFile] = {}
        for file in self._files.values():
            for key in file.keys():
                self._where[key] = file
        if weight_map is not None:
            for key, file_name in weight_map.items():
                if key not in self._where:
                    raise CheckpointError(f"{self.directory}: the index maps '{key}' to {file_name}, "
                                          "but no file holds it")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)


# A tensor to write: its name, shape, dtype and a function that produces its values when the writer gets to it.
TensorSpec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_checkpoint(directory: str | os.PathLike, tensors: Iterable[TensorSpec], *,
                     max_shard_bytes: int = 4 << 30, metadata: dict[str, str] | None = None) -> list[epath.Path]:
    """Writes tensors as HF-style safetensors shards (plus the index when there is more than one shard)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[TensorSpec]] = [[]]
    shard_bytes = 0
    for spec in tensors:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        total += write_safetensors_file(directory / name, shard, metadata or {"format": "pt"})
        weight_map.update({spec[0]: name for spec in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    elif (directory / INDEX_NAME).exists():
        (directory / INDEX_NAME).unlink()
    return [directory / n for n in names]


def write_safetensors_file(path: epath.Path, specs: list[TensorSpec], metadata: dict[str, str]) -> int:
    """One safetensors file at `path`; returns its data bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype, _ in specs:
        dtype = np.dtype(dtype)
        if dtype not in _CODES:
            raise CheckpointError(f"cannot write tensor '{name}' of dtype {dtype} to safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # keeps tensor data 8-byte aligned, as the reference writer does
    # A crash mid-write must never leave a half-written file under the final name: locally it is written under a
    # temporary name and renamed; an upload to a bucket is an object only once finished (a rename would copy it).
    tmp = path if is_url(path) else path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in specs:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise CheckpointError(f"tensor '{name}' was planned as {tuple(shape)} but produced {array.shape}")
            f.write(array.tobytes())
    if tmp != path:
        tmp.replace(path)
    return offset
