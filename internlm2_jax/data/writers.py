"""Writing documents as shards the loader reads: JSONL shards plus a manifest (the demo's corpus -> shards ->
iterator path), plain array_record files, and a tensorflow-datasets dataset in the array_record file format."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from etils import epath

from internlm2_jax.data.corpus import CorpusDocument
from internlm2_jax.data.manifest import Manifest, ShardSpec, make_manifest, save_manifest
from internlm2_jax.paths import absolute

MANIFEST_FILE = "manifest.json"


def _as_record(doc: str | CorpusDocument | Mapping[str, Any], text_field: str) -> dict[str, Any]:
    if isinstance(doc, str):
        return {text_field: doc}
    if isinstance(doc, CorpusDocument):
        return {"id": doc.name, text_field: doc.text}
    return dict(doc)


def write_jsonl_shards(documents: Iterable[str | CorpusDocument | Mapping[str, Any]], directory: str | os.PathLike, *,
                       name: str, source: str, tier: str = "default", num_shards: int = 1, weight: float = 1.0,
                       epochs: float = 1.0, text_field: str = "text", tokenizer: Any = None) -> list[ShardSpec]:
    """Writes `documents` round-robin into `num_shards` files `{name}-0000i-of-0000n.jsonl` under `directory` and
    returns their shard specs (paths relative to `directory`, where the manifest goes; local or a URL). With a
    `tokenizer`, each spec's `num_tokens` counts the `<s> text </s>` tokens."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"{name}-{i:05d}-of-{num_shards:05d}.jsonl" for i in range(num_shards)]
    counts = [0] * num_shards
    files = [(directory / n).open("w", encoding="utf-8") for n in names]
    try:
        for i, doc in enumerate(documents):
            record = _as_record(doc, text_field)
            files[i % num_shards].write(json.dumps(record, ensure_ascii=False) + "\n")
            if tokenizer is not None and isinstance(record.get(text_field), str):
                counts[i % num_shards] += len(tokenizer.encode(record[text_field], allow_special=False)) + 2
    finally:
        for f in files:
            f.close()
    return [ShardSpec(path=n, format="jsonl", source=source, tier=tier, text_field=text_field,
                      num_tokens=counts[i] if tokenizer is not None else None, weight=weight, epochs=epochs)
            for i, n in enumerate(names)]


def write_manifest(shards: Sequence[ShardSpec], directory: str | os.PathLike,
                   filename: str = MANIFEST_FILE) -> Manifest:
    """Validates and saves a manifest of `shards` (paths relative to `directory`) and returns it, loaded."""
    directory = absolute(directory)
    manifest = make_manifest(list(shards), base_dir=directory)
    save_manifest(manifest, directory / filename)
    return manifest


def write_array_record(records: Iterable[str | bytes | Mapping[str, Any]], path: str | Path) -> Path:
    """One array_record file: strings are stored as UTF-8, bytes as they are, dicts as JSON objects (read them
    with `record_format: "json"`)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")  # one record per chunk: cheap random access
    try:
        for record in records:
            if isinstance(record, str):
                record = record.encode("utf-8")
            elif isinstance(record, Mapping):
                record = json.dumps(record, ensure_ascii=False).encode("utf-8")
            writer.write(record)
    finally:
        writer.close()
    return path


def write_tfds_text_dataset(splits: Mapping[str, Sequence[str]], data_dir: str | Path, *,
                            name: str = "text_documents", version: str = "1.0.0") -> Path:
    """Prepares a tfds dataset with one `text` feature in the array_record file format, offline and without
    TensorFlow, and returns its versioned directory (what a manifest `array_record` shard points at)."""
    # tensorflow-datasets 4.9.10 imports `importlib_resources` here but declares it only for Python < 3.9
    # (tensorflow/datasets#11212): requirements.txt pins it.
    import tensorflow_datasets as tfds

    # A one-off builder class: not registered (tfds refuses a second class of the same name in one process).
    class TextDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(texts) for split, texts in splits.items()}

        def _generate_examples(self, texts):
            for i, text in enumerate(texts):
                yield i, {"text": text}

    TextDocuments.name = name  # the dataset's directory name (tfds derives it from the class name otherwise)
    builder = TextDocuments(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)
