"""`PretrainDataIterator`: manifest -> shard readers -> weighted mixture -> `<s> text </s>` -> packed batches.

Contract:
- **Deterministic**: the batches are a function of (manifest, tokenizer, seq_len, batch_size, seed, process index and
  count, options); nothing depends on timing or threads.
- **Exact resume**: `get_state()` after a batch is a small JSON-serialisable dict (mixture counters, where the last
  row cut a document, statistics). An iterator built with the same arguments and given that state (`set_state` or
  `state=`) yields exactly the batches the first one would have yielded next. Checkpoint it beside the train state
  (orbax: `ocp.args.JsonSave(it.get_state())`).
- **Multi-host**: process `p` of `P` owns the records `p, p + P, p + 2P, ...` of every shard (disjoint, and together
  all of them) and runs its own mixture over them; `batch_size` is the number of rows **this process** yields, so the
  global batch is `batch_size * process_count`.
- **Bad data** is counted by kind with `file:line` examples, logged, and skipped; `strict=True` raises `BadDataError`
  naming file and line instead.

Why not a grain pipeline: grain's `MapDataset` mix/shuffle and `FirstFitPackIterDataset` would give the pieces, but
counting and reporting bad records, quota-based epochs per shard and a resume state that stays small and readable
are simpler to guarantee in ~300 lines of our own; readers use `array_record` (what grain's source wraps) directly.
Work runs on the calling thread: tokenizing with SentencePiece is far faster than a training step consumes tokens
at the scales this project runs on one host.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from internlm2_jax.data.manifest import Manifest, ShardSpec, load_manifest, make_manifest
from internlm2_jax.data.mixture import MixtureSampler
from internlm2_jax.data.packing import PACKED_FIELDS, PackItem, SequentialPacker, empty_rows
from internlm2_jax.data.readers import BAD_KINDS, BadRecord, ShardReader, open_shard

logger = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_EXAMPLES = 5  # bad-record examples kept (and logged) per kind


class BadDataError(ValueError):
    """Raised in strict mode for the first bad record; the message starts with `file:line` (or `file#record`)."""


class TextTokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = True) -> list[int]: ...


def _as_manifest(data: Manifest | str | os.PathLike | Sequence[ShardSpec | Mapping[str, Any]]) -> Manifest:
    if isinstance(data, Manifest):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_manifest(data)
    return make_manifest(list(data))


def _new_stats() -> dict[str, Any]:
    return {"batches": 0, "rows": 0, "documents": 0, "tokens": 0, "target_tokens": 0, "padding_tokens": 0,
            "padding_fraction": 0.0, "bad_records": 0, "bad_by_kind": {kind: 0 for kind in BAD_KINDS},
            "bad_examples": {}, "documents_by_source": {}, "documents_by_tier": {}, "document_tokens_by_source": {}}


def finish_batch(rows: list[dict[str, np.ndarray]], batch_size: int, seq_len: int, pad_id: int,
                 stats: dict[str, Any], *, pair_slots: int | None = None) -> dict[str, np.ndarray]:
    """Packed rows -> a batch of `batch_size` (the rest empty rows: segment 0, no loss; preference rows also an
    all-zero `pair_mask [pair_slots]`), counting rows, real tokens, targets and padding into `stats`."""
    fields = PACKED_FIELDS + (("pair_mask",) if pair_slots else ())
    filler = empty_rows(batch_size - len(rows), seq_len, pad_id)
    if pair_slots:
        filler["pair_mask"] = np.zeros((batch_size - len(rows), pair_slots), np.float32)
    batch = {name: np.concatenate([np.stack([row[name] for row in rows]), filler[name]]) for name in fields}
    real = int((batch["segment_ids"] > 0).sum())
    stats["batches"] += 1
    stats["rows"] += len(rows)
    stats["tokens"] += real
    stats["target_tokens"] += int(batch["loss_mask"].sum())
    stats["padding_tokens"] += len(rows) * seq_len - real
    stats["padding_fraction"] = stats["padding_tokens"] / max(1, stats["rows"] * seq_len)
    return batch


class PretrainDataIterator:
    """Yields dicts of numpy arrays `[batch_size, seq_len]`: `input_ids`, `targets`, `positions`, `segment_ids`
    (int32) and `loss_mask` (float32), as described in `packing.py`.

    `data` is a `Manifest`, a manifest file path, or a list of `ShardSpec`s / shard dicts (relative paths then
    start at the current directory). Documents are encoded as plain text (`allow_special=False`: a `<|im_start|>`
    typed in a web page stays text) between the tokenizer's BOS and EOS ids; rows are padded with `pad_id`.

    `repeat=True` (training) cycles over the mixture forever, each round with new permutations; `repeat=False`
    (evaluation) stops after one round, padding the last batch with empty rows (`loss_mask` 0).
    """

    def __init__(self, data: Manifest | str | os.PathLike | Sequence[ShardSpec | Mapping[str, Any]],
                 tokenizer: TextTokenizer,
                 seq_len: int, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1,
                 strict: bool = False, *, split_documents: bool = True, shuffle: bool = True, repeat: bool = True,
                 state: Mapping[str, Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in range(process_count={process_count})")
        self.manifest = _as_manifest(data)
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.strict, self.split_documents, self.shuffle, self.repeat = strict, split_documents, shuffle, repeat
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id

        self.readers: list[ShardReader] = [open_shard(s, self.manifest) for s in self.manifest.shards]
        # Records owned by this process in shard s: process_index + k * process_count for k < local_sizes[s].
        self.local_sizes = [len(range(self.process_index, len(r), self.process_count)) for r in self.readers]
        shards = self.manifest.shards
        self.sampler = MixtureSampler(self.local_sizes, [s.weight for s in shards], [s.epochs for s in shards],
                                      seed=self.seed, stream=self.process_index, shuffle=shuffle, repeat=repeat)
        if self.sampler.empty:
            sizes = ", ".join(f"{r.name}: {n}" for r, n in zip(self.readers, self.local_sizes, strict=True))
            raise ValueError(f"process {self.process_index}/{self.process_count} has no records to read "
                             f"(records per shard for this process: {sizes})")
        self.packer = SequentialPacker(self.seq_len, self.pad_id, split_documents=split_documents)
        self._stats = _new_stats()
        self._finished = False
        self._bad_in_a_row = 0
        if state is not None:
            self.set_state(state)

    # ---- documents --------------------------------------------------------------------------------------------

    def _tokenize(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, allow_special=False)
        return np.asarray([self.bos_id, *ids, self.eos_id], np.int32)

    def _read(self, shard: int, record: int) -> str | BadRecord:
        return self.readers[shard].read(record)

    def _count_bad(self, bad: BadRecord) -> None:
        if self.strict:
            raise BadDataError(f"{bad.message()} (strict mode; pass strict=False to count and skip bad records)")
        stats = self._stats
        stats["bad_records"] += 1
        stats["bad_by_kind"][bad.kind] = stats["bad_by_kind"].get(bad.kind, 0) + 1
        examples = stats["bad_examples"].setdefault(bad.kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(bad.message())
            logger.warning("skipping bad record %s", bad.message())

    def _pull(self) -> PackItem | None:
        """The next good document from the mixture; bad ones are counted (or raise in strict mode)."""
        while (draw := self.sampler.next()) is not None:
            shard, local = draw
            record = self.process_index + local * self.process_count
            text = self._read(shard, record)
            if isinstance(text, BadRecord):
                self._count_bad(text)
                self._bad_in_a_row += 1
                if self._bad_in_a_row > sum(self.sampler.quotas):  # a whole round without one good document
                    raise BadDataError(f"no usable document in a whole pass over the data; examples: "
                                       f"{self._stats['bad_examples']}")
                continue
            self._bad_in_a_row = 0
            tokens = self._tokenize(text)
            spec = self.manifest.shards[shard]
            stats = self._stats
            stats["documents"] += 1
            for key, name in (("documents_by_source", spec.source), ("documents_by_tier", spec.tier)):
                stats[key][name] = stats[key].get(name, 0) + 1
            by_source = stats["document_tokens_by_source"]
            by_source[spec.source] = by_source.get(spec.source, 0) + len(tokens)
            return PackItem(tokens, 0, key=(shard, record))
        return None

    # ---- batches ----------------------------------------------------------------------------------------------

    def __iter__(self) -> PretrainDataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._finished:
            raise StopIteration
        rows = []
        while len(rows) < self.batch_size and (row := self.packer.next_row(self._pull)) is not None:
            rows.append(row)
        if len(rows) < self.batch_size:
            self._finished = True  # only without repeat: the data ran out
            if not rows:
                raise StopIteration
        return finish_batch(rows, self.batch_size, self.seq_len, self.pad_id, self._stats)

    # ---- state ------------------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """What must match for a state to be resumed here."""
        return {"manifest_hash": self.manifest.hash, "tokenizer_sha256": getattr(self.tokenizer, "sha256", None),
                "seed": self.seed, "seq_len": self.seq_len, "process_index": self.process_index,
                "process_count": self.process_count, "split_documents": self.split_documents,
                "shuffle": self.shuffle, "repeat": self.repeat}

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable dict; resuming from it continues with exactly the next batch."""
        carry = self.packer.carry
        carry_state = None
        if carry is not None:
            shard, record = carry.key
            carry_state = {"shard": shard, "record": record, "offset": carry.offset, "length": len(carry.tokens)}
        return {"version": STATE_VERSION, **self._identity(), "mixture": self.sampler.get_state(),
                "carry": carry_state, "finished": self._finished, "bad_in_a_row": self._bad_in_a_row,
                "stats": copy.deepcopy(self._stats)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        differ = [f"{key}: state has {state.get(key)!r}, this iterator {value!r}"
                  for key, value in self._identity().items() if state.get(key) != value]
        if differ:
            raise ValueError("cannot resume this data iterator from the given state:\n  " + "\n  ".join(differ))
        self.sampler.set_state(state["mixture"])
        self._stats = copy.deepcopy(dict(state["stats"]))
        self._finished = bool(state["finished"])
        self._bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.packer.carry = None
        carry = state["carry"]
        if carry is not None:
            shard, record = int(carry["shard"]), int(carry["record"])
            text = self._read(shard, record)
            tokens = None if isinstance(text, BadRecord) else self._tokenize(text)
            if tokens is None or len(tokens) != carry["length"]:
                raise ValueError(f"{self.readers[shard].name} record {record} changed since the state was saved "
                                 f"(it no longer tokenizes to {carry['length']} tokens)")
            self.packer.carry = PackItem(tokens, int(carry["offset"]), key=(shard, record))

    # ---- statistics -------------------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """Documents, tokens, padding fraction, bad records by kind (with examples), documents by source/tier."""
        return copy.deepcopy(self._stats)

    def log_stats(self, level: int = logging.INFO) -> dict[str, Any]:
        s = self._stats
        bad = ", ".join(f"{k}={v}" for k, v in s["bad_by_kind"].items() if v) or "none"
        logger.log(level, "data: %d batches, %d rows, %d documents, %d tokens, padding %.2f%%, bad records %d (%s), "
                   "documents by source %s", s["batches"], s["rows"], s["documents"], s["tokens"],
                   100 * s["padding_fraction"], s["bad_records"], bad, s["documents_by_source"])
        return self.stats

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def __enter__(self) -> PretrainDataIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
