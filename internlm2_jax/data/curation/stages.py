"""The per-unit work of the pipeline: plain functions of (work unit, config, directory) that any runner maps.

Two passes touch the text; a global dedup step sits between them:

1. `filter_unit`: read -> rule-based cleaning -> safety. Survivors go to `work/kept/U.jsonl` with their MinHash
   signatures, LSH band keys, content hashes and token counts in `work/kept/U.npz` (and their shingle sets in
   `U.shingles.npz` for exact verification); everything removed goes to `removed/U-filter.jsonl` with its stage and
   reasons (bad input with its raw content).
2. (global) `pipeline.resolve_duplicates`: which keys are exact or near duplicates, and of which kept document.
3. `finalize_unit`: drop duplicates -> quality score and tier -> `shards/<source>/<tier>/U.jsonl`; with
   `repositories`, also one document per repository with its kept files in import order.

Every output file is written under a temporary name and renamed when complete, and a unit's summary JSON is written
last: a summary on disk means the unit is done, so a killed run resumes unit by unit. Workers hold one unit's
arrays and one batch of text at a time: memory is bounded by `unit_bytes`, not by the corpus.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from internlm2_jax.data.curation.cleaning import apply_cleaning
from internlm2_jax.data.curation.code import order_repository, repository_document
from internlm2_jax.data.curation.config import CurationConfig
from internlm2_jax.data.curation.dedup import content_hash, exact_jaccard
from internlm2_jax.data.curation.minhash import band_keys, shingle_hashes, signatures
from internlm2_jax.data.curation.quality import QualityClassifier, assign_tiers
from internlm2_jax.data.curation.safety import SafetyFilter
from internlm2_jax.data.curation.sources import KEY_BITS, Document, Reject, WorkUnit, read_unit

STAGES = ("read", "clean", "safety", "exact_dedup", "fuzzy_dedup", "quality")
BATCH = 256  # documents hashed/scored together: numpy work per call, bounded memory


class StageCounter:
    """Documents, tokens and bytes into and out of each stage, and why documents were removed."""

    def __init__(self):
        self.docs_in: Counter = Counter()
        self.docs_out: Counter = Counter()
        self.tokens_in: Counter = Counter()
        self.tokens_out: Counter = Counter()
        self.bytes_in: Counter = Counter()
        self.bytes_out: Counter = Counter()
        self.reasons: dict[str, Counter] = defaultdict(Counter)

    def passed(self, stage: str, tokens: int, size: int, kept: bool, reasons=()) -> None:
        self.docs_in[stage] += 1
        self.tokens_in[stage] += tokens
        self.bytes_in[stage] += size
        if kept:
            self.docs_out[stage] += 1
            self.tokens_out[stage] += tokens
            self.bytes_out[stage] += size
        else:
            self.reasons[stage].update(reasons)

    def to_json(self) -> dict[str, Any]:
        return {name: {k: v for k, v in getattr(self, name).items()}
                for name in ("docs_in", "docs_out", "tokens_in", "tokens_out", "bytes_in", "bytes_out")} | {
            "reasons": {stage: dict(c) for stage, c in self.reasons.items()}}

    @classmethod
    def merge(cls, parts) -> StageCounter:
        total = cls()
        for part in parts:
            for name in ("docs_in", "docs_out", "tokens_in", "tokens_out", "bytes_in", "bytes_out"):
                getattr(total, name).update(part.get(name, {}))
            for stage, reasons in part.get("reasons", {}).items():
                total.reasons[stage].update(reasons)
        return total


class Resources:
    """What a worker loads once per process: blocklists, the tokenizer and the quality classifier."""

    _cache: dict[str, Resources] = {}

    def __init__(self, config: CurationConfig):
        self.safety = SafetyFilter(config.safety)
        self.tokenizer = None
        if config.tokenizer:
            from internlm2_jax.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_file(config.tokenizer)
        self.classifier = QualityClassifier.load(config.quality.classifier) if config.quality.classifier else None

    @classmethod
    def get(cls, config: CurationConfig) -> Resources:
        key = json.dumps(config.to_json(), sort_keys=True)
        if key not in cls._cache:
            cls._cache[key] = cls(config)
        return cls._cache[key]

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text, allow_special=False))


def unit_name(unit: WorkUnit) -> str:
    return f"{unit.index:06d}"


class AtomicFile:
    """A text file written under a temporary name and renamed into place on close (all or nothing)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.lines += 1

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _resumable(kind: str):
    """A pass over one unit that is skipped when its summary `work/<kind>/U.json` exists, and writes that summary
    last, after every output file: the unit's done marker."""

    def wrap(run_pass):
        @functools.wraps(run_pass)
        def run(unit: WorkUnit, config: CurationConfig, out_dir: Path) -> dict[str, Any]:
            path = out_dir / "work" / kind / f"{unit_name(unit)}.json"
            if path.exists():
                return json.loads(path.read_text())
            summary = run_pass(unit, config, out_dir)
            _write_json_atomic(path, summary)
            return summary

        return run

    return wrap


def _removed_record(config: CurationConfig, stage: str, reasons, item: Document | Reject, **extra) -> dict:
    if isinstance(item, Reject):  # bad input keeps its raw content whatever keep_removed_text says: it is the record
        return {"key": item.key, "where": item.where, "stage": stage, "reasons": [item.reason],
                "detail": item.detail, "raw": item.raw}
    record = {"key": item.key, "id": item.id, "stage": stage, "reasons": list(reasons), "meta": item.meta, **extra}
    if config.keep_removed_text:
        record["text"] = item.text
    return record


@_resumable("filtered")
def filter_unit(unit: WorkUnit, config: CurationConfig, out_dir: Path) -> dict[str, Any]:
    """Pass 1 over one unit: read, clean, safety-filter, hash. Returns (and writes) the unit's summary."""
    spec = config.inputs[unit.input_index]
    resources = Resources.get(config)
    cleaning = config.code_cleaning if spec.cleaning_kind == "code" else config.text_cleaning
    counter = StageCounter()
    kept = AtomicFile(out_dir / "work" / "kept" / f"{unit_name(unit)}.jsonl")
    removed = AtomicFile(out_dir / "removed" / f"{unit_name(unit)}-filter.jsonl")
    keys, ids, tokens, hashes, sigs, shingle_sets, batch = [], [], [], [], [], [], []
    minhash = config.dedup.minhash

    def flush():
        if batch:
            sigs.append(signatures([d.text for d in batch], minhash))
            if config.dedup.verify == "exact":
                shingle_sets.extend(shingle_hashes(d.text, minhash.ngram) for d in batch)
            batch.clear()

    for item in read_unit(unit, spec, max_record_bytes=config.max_record_bytes):
        if isinstance(item, Reject):
            counter.passed("read", 0, len(item.raw.encode("utf-8", "replace")), False, [item.reason])
            removed.write(_removed_record(config, "read", (), item))
            continue
        size = len(item.text.encode("utf-8"))
        counter.passed("read", 0, size, True)
        cleaned = apply_cleaning(item.text, cleaning)
        if cleaned.text is None:
            counter.passed("clean", resources.count_tokens(item.text), size, False, cleaned.failed)
            removed.write(_removed_record(config, "clean", cleaned.failed, item))
            continue
        item.text = cleaned.text
        n_tokens = resources.count_tokens(item.text)
        counter.passed("clean", n_tokens, size, True)
        size = len(item.text.encode("utf-8"))
        verdict = resources.safety.check(item.text, url=item.meta.get("url"))
        counter.passed("safety", n_tokens, size, verdict.passed, verdict.reasons)
        if not verdict.passed:
            removed.write(_removed_record(config, "safety", verdict.reasons, item, counts=verdict.counts))
            continue
        item.meta["source"] = spec.source_name
        kept.write({"key": item.key, "id": item.id, "text": item.text, "meta": item.meta})
        keys.append(item.key)
        ids.append(item.id)
        tokens.append(n_tokens)
        hashes.append(content_hash(item.text))
        batch.append(item)
        if len(batch) == BATCH:
            flush()
    flush()
    all_sigs = np.concatenate(sigs) if sigs else np.zeros((0, minhash.num_perm), np.uint32)
    _save_npz(out_dir / "work" / "kept" / f"{unit_name(unit)}.npz", keys=np.asarray(keys, np.int64),
              ids=np.asarray(ids, dtype=str), tokens=np.asarray(tokens, np.int64),
              hashes=np.asarray(hashes, dtype="S"), signatures=all_sigs,
              band_keys=band_keys(all_sigs, *minhash.banding))
    if config.dedup.verify == "exact":
        _save_npz(ShingleStore.path(out_dir, unit.index), keys=np.asarray(keys, np.int64),
                  offsets=np.cumsum([0] + [len(h) for h in shingle_sets]),
                  shingles=np.concatenate(shingle_sets) if shingle_sets else np.zeros(0, np.uint64))
    kept.commit()
    removed.commit()
    return {"unit": unit.index, "docs": counter.docs_in["read"], "kept": len(keys), "counts": counter.to_json()}


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class ShingleStore:
    """The exact shingle sets of kept documents, read back from their units' files for exact verification; a few
    units are cached, so edges sorted by unit read each file about once."""

    def __init__(self, out_dir: Path, cached_units: int = 4):
        self.out_dir, self.cached_units = out_dir, cached_units
        self._units: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def path(out_dir: Path, unit_index: int) -> Path:
        return out_dir / "work" / "kept" / f"{unit_index:06d}.shingles.npz"

    def get(self, key: int) -> np.ndarray:
        unit = key >> KEY_BITS
        if unit not in self._units:
            if len(self._units) >= self.cached_units:
                self._units.pop(next(iter(self._units)))
            with np.load(self.path(self.out_dir, unit)) as data:
                self._units[unit] = (data["keys"], data["offsets"], data["shingles"])
        keys, offsets, shingles = self._units[unit]
        i = int(np.searchsorted(keys, key))
        return shingles[offsets[i]:offsets[i + 1]]

    def verified(self, edges: np.ndarray, threshold: float) -> np.ndarray:
        """Mask of the edges whose two documents' exact Jaccard reaches `threshold`."""
        edges = np.asarray(edges, np.int64).reshape(-1, 2)
        keep = np.zeros(len(edges), bool)
        for i in np.lexsort((edges[:, 1] >> KEY_BITS, edges[:, 0] >> KEY_BITS)):
            keep[i] = exact_jaccard(self.get(int(edges[i, 0])), self.get(int(edges[i, 1]))) >= threshold
        return keep


def load_unit_arrays(unit: WorkUnit, out_dir: Path) -> dict[str, np.ndarray]:
    with np.load(out_dir / "work" / "kept" / f"{unit_name(unit)}.npz") as data:
        return {k: data[k] for k in data.files}


def read_kept(unit: WorkUnit, out_dir: Path):
    with open(out_dir / "work" / "kept" / f"{unit_name(unit)}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


_DUPLICATES: dict[str, dict[str, np.ndarray]] = {}


def load_duplicates(out_dir: Path) -> dict[str, np.ndarray]:
    """The global dedup decision (sorted `keys` with their `kept_key`, `kept_id`, `exact` flag), once per process."""
    path = out_dir / "work" / "dedup.npz"
    tag = f"{path.resolve()}:{path.stat().st_mtime_ns}"
    if tag not in _DUPLICATES:
        with np.load(path) as data:
            _DUPLICATES[tag] = {k: data[k] for k in data.files}
    return _DUPLICATES[tag]


@_resumable("finalized")
def finalize_unit(unit: WorkUnit, config: CurationConfig, out_dir: Path) -> dict[str, Any]:
    """Pass 2 over one unit: drop duplicates, score, tier, write output shards (and repository documents)."""
    spec = config.inputs[unit.input_index]
    resources = Resources.get(config)
    scored = is_scored(config, spec)
    counter = StageCounter()
    removed = AtomicFile(out_dir / "removed" / f"{unit_name(unit)}-finalize.jsonl")
    outputs: dict[str, AtomicFile] = {}
    shards: dict[str, dict[str, Any]] = {}
    repos: dict[str, dict[str, str]] = defaultdict(dict)
    arrays = load_unit_arrays(unit, out_dir)
    tokens = dict(zip(arrays["keys"].tolist(), arrays["tokens"].tolist(), strict=True))
    duplicates = load_duplicates(out_dir)
    dup_keys = duplicates["keys"]
    batch: list[dict[str, Any]] = []

    def emit():
        scores = resources.classifier.score([r["text"] for r in batch]) if scored else [None] * len(batch)
        tiers = assign_tiers(np.asarray(scores), config.quality.tiers) if scored else ["default"] * len(batch)
        for record, score, tier in zip(batch, scores, tiers, strict=True):
            n_tokens, size = tokens[record["key"]], len(record["text"].encode("utf-8"))
            keep = tier_weight(config, spec, tier) > 0
            counter.passed("quality", n_tokens, size, keep, [f"tier_{tier}"])
            record["meta"].setdefault("curation", {})["quality"] = {"score": None if score is None else
                                                                    round(float(score), 4), "tier": tier}
            if not keep:
                removed.write(_removed_record(config, "quality", [f"tier_{tier}"], _as_doc(record)))
                continue
            name = f"{spec.source_name}/{tier}"
            if name not in outputs:
                outputs[name] = AtomicFile(out_dir / "shards" / name / f"{unit_name(unit)}.jsonl")
                shards[name] = {"source": spec.source_name, "tier": tier, "docs": 0, "tokens": 0, "bytes": 0,
                                "path": f"shards/{name}/{unit_name(unit)}.jsonl"}
            outputs[name].write({"id": record["id"], "text": record["text"], "meta": record["meta"]})
            for field, value in (("docs", 1), ("tokens", n_tokens), ("bytes", size)):
                shards[name][field] += value
            if config.repositories and spec.format == "code":  # a code unit holds whole repositories
                repos[record["meta"]["repo"]][record["meta"]["path"]] = record["text"]
        batch.clear()

    for record in read_kept(unit, out_dir):
        key = record["key"]
        n_tokens, size = tokens[key], len(record["text"].encode("utf-8"))
        i = np.searchsorted(dup_keys, key)
        is_dup = i < len(dup_keys) and dup_keys[i] == key
        exact = bool(is_dup and duplicates["exact"][i])
        counter.passed("exact_dedup", n_tokens, size, not exact, ["exact_duplicate"])
        if not exact:
            counter.passed("fuzzy_dedup", n_tokens, size, not is_dup, ["near_duplicate"])
        if is_dup:
            reason = "exact_duplicate" if exact else "near_duplicate"
            removed.write(_removed_record(config, "exact_dedup" if exact else "fuzzy_dedup", [reason],
                                          _as_doc(record), duplicate_of=str(duplicates["kept_id"][i]),
                                          duplicate_of_key=int(duplicates["kept_key"][i])))
            continue
        batch.append(record)
        if len(batch) == config.quality.batch_size:
            emit()
    if batch:
        emit()
    repo_shard = _write_repositories(unit, spec, out_dir, repos, resources) if repos else None
    for f in outputs.values():
        f.commit()
    removed.commit()
    return {"unit": unit.index, "docs": len(tokens), "counts": counter.to_json(),
            "shards": sorted(shards.values(), key=lambda s: s["path"]), "repository_shard": repo_shard}


def is_scored(config: CurationConfig, spec) -> bool:
    """Whether a source's documents are scored into quality tiers (else they are all in tier "default")."""
    return bool(config.quality.classifier) and spec.cleaning_kind in config.quality.kinds


def tier_weight(config: CurationConfig, spec, tier: str) -> float:
    """The sampling weight of a tier of a source: the tier's weight (1 for unscored sources and repository
    documents) times the source's."""
    scored = is_scored(config, spec) and tier != "long"
    return (config.quality.tiers.weight(tier) if scored else 1.0) * spec.weight


def _as_doc(record: dict[str, Any]) -> Document:
    return Document(record["key"], record["id"], record["text"], record["meta"])


def _write_repositories(unit: WorkUnit, spec, out_dir: Path, repos: dict[str, dict[str, str]],
                        resources: Resources) -> dict[str, Any]:
    """One long document per repository: its kept files in import-dependency order (the report's long-context code)."""
    name = f"{spec.source_name}-repositories/long"
    out = AtomicFile(out_dir / "shards" / name / f"{unit_name(unit)}.jsonl")
    shard = {"source": f"{spec.source_name}-repositories", "tier": "long", "docs": 0, "tokens": 0, "bytes": 0,
             "path": f"shards/{name}/{unit_name(unit)}.jsonl"}
    for repo in sorted(repos):
        files = repos[repo]
        order = order_repository(files)
        text = repository_document({path: files[path] for path in order}, repo)
        out.write({"id": repo, "text": text, "meta": {"repo": repo, "files": order, "source": shard["source"]}})
        shard["docs"] += 1
        shard["tokens"] += resources.count_tokens(text)
        shard["bytes"] += len(text.encode("utf-8"))
    out.commit()
    return shard
