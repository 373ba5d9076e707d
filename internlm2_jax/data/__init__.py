"""Packed pretraining data: manifest -> shard readers -> quality-weighted mixture -> `<s> text </s>` -> packed rows.

No JAX here: the pipeline produces numpy batches and a JSON-serialisable resume state.

- `manifest`: the data manifest (`load_manifest`, `save_manifest`, `manifest_hash`, `ShardSpec`, `ManifestError`).
- `readers`: JSONL, plain text, array_record files and tfds array_record datasets, with bad-record reporting.
- `packing`: sequential packing with segment ids, per-document positions, targets and loss mask.
- `mixture`: the counter-based weighted mixture with per-shard epochs.
- `iterator`: `PretrainDataIterator` (deterministic, exactly resumable, multi-host).
- `conversations`: SFT (OpenAI messages, Alpaca) and preference-pair JSONL -> packed rows with the same contract
  (`SFTDataIterator`, `PairDataIterator`); message conversion, domain prompts and the reward sequence live beside the
  chat template (`internlm2_jax.chat_prompts`).
- `corpus`: the stdlib code corpus (`stdlib_corpus`, `split_source`, `basic_clean`); `make demo`'s curated dataset,
  which trains a tokenizer and runs curation over it, is a recipe (`internlm2_jax.recipes.stdlib_data`).
- `curation/` (and the `curate` CLI): cleaning, safety, exact and MinHash-LSH dedup, quality tiers, the mixture.
- `writers`: JSONL shards + manifest, array_record files, tfds datasets.
"""

from internlm2_jax.data.conversations import PairDataIterator, SFTDataIterator
from internlm2_jax.data.corpus import CorpusDocument, basic_clean, stdlib_corpus
from internlm2_jax.data.iterator import BadDataError, PretrainDataIterator
from internlm2_jax.data.manifest import (
    Manifest,
    ManifestError,
    ShardSpec,
    load_manifest,
    make_manifest,
    manifest_hash,
    save_manifest,
)
from internlm2_jax.data.mixture import MixtureSampler
from internlm2_jax.data.packing import PACKED_FIELDS, pack_documents
from internlm2_jax.data.readers import BAD_KINDS, BadRecord
from internlm2_jax.data.writers import write_array_record, write_jsonl_shards, write_manifest, write_tfds_text_dataset

__all__ = [
    "BAD_KINDS",
    "PACKED_FIELDS",
    "BadDataError",
    "BadRecord",
    "CorpusDocument",
    "Manifest",
    "ManifestError",
    "MixtureSampler",
    "PairDataIterator",
    "PretrainDataIterator",
    "SFTDataIterator",
    "ShardSpec",
    "basic_clean",
    "load_manifest",
    "make_manifest",
    "manifest_hash",
    "pack_documents",
    "save_manifest",
    "stdlib_corpus",
    "write_array_record",
    "write_jsonl_shards",
    "write_manifest",
    "write_tfds_text_dataset",
]
