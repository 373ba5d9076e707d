"""The embedded default corpus: the running interpreter's Python standard library, a real code corpus on every
machine (the report stresses code data), with a deterministic held-out split and a basic cleaning step.

- Files are the stdlib's `*.py` files (not site-packages; the stdlib's own test suites only with
  `include_tests=True`: they are large and unusual code).
- The split is decided per file by a hash of its path relative to the stdlib root, so a file is on the same side
  on every machine and Python patch release, whatever `max_bytes` is (`heldout_fraction` of files are held out).
- Files are taken in hash order (a fixed pseudo-random order, so a `max_bytes` cap samples the whole library rather
  than its alphabetical start) until `max_bytes` of cleaned text is collected.
- `basic_clean` is the curation pipeline's code cleaning; `prepare_stdlib_dataset` runs the whole pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sysconfig
from pathlib import Path
from typing import Any, NamedTuple

from internlm2_jax.data.curation.cleaning import CleaningConfig, apply_cleaning

_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class CorpusDocument:
    name: str  # path relative to the stdlib root, e.g. "json/decoder.py"
    text: str


def basic_clean(text: str) -> str | None:
    """The code preset of the curation pipeline's rule-based cleaning, keeping blank-line runs: the normalised text,
    or None when a rule drops it (empty, binary or mostly non-text, generated, or with an overlong line)."""
    return apply_cleaning(text, CleaningConfig.for_code(max_blank_lines=None)).text


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _path_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def stdlib_files(*, include_tests: bool = False) -> list[str]:
    """Relative paths of the stdlib's `.py` files, in hash order."""
    root = stdlib_root()
    names = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if _SKIP_DIRS & set(parts) or (not include_tests and _TEST_DIRS & set(parts[:-1])):
            continue
        names.append("/".join(parts))
    return sorted(names, key=lambda name: (_path_hash(name), name))


def is_heldout(name: str, heldout_fraction: float) -> bool:
    return _path_hash(name) % 10_000 < round(heldout_fraction * 10_000)


def stdlib_corpus(split: str = "train", max_bytes: int | None = None, *, heldout_fraction: float = 0.05,
                  include_tests: bool = False, clean: bool = True) -> list[CorpusDocument]:
    """Cleaned documents of one split ("train" or "heldout") of the stdlib corpus, up to `max_bytes` of UTF-8 text.

    Files that are not valid UTF-8 (a few test files declare other encodings) or that `basic_clean` drops are left
    out; the split itself does not depend on cleaning or on `max_bytes`.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    root = stdlib_root()
    documents, total = [], 0
    for name in stdlib_files(include_tests=include_tests):
        if is_heldout(name, heldout_fraction) != (split == "heldout"):
            continue
        try:
            text = (root / name).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if clean:
            text = basic_clean(text)
            if text is None:
                continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            continue  # over the cap: a smaller file further on may still fit
        documents.append(CorpusDocument(name, text))
        total += size
    return documents


def split_source(doc: CorpusDocument, max_chars: int = 2000) -> list[CorpusDocument]:
    """Cuts a source file into pieces of at most about `max_chars` at top-level boundaries (a blank line followed
    by an unindented line), so a small batch mixes many files instead of holding one long file.

    A single top-level block longer than `max_chars` stays whole; the packer cuts it at row ends.
    """
    pieces, current, size = [], [], 0
    lines = doc.text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        at_boundary = i > 0 and not lines[i - 1].strip() and line[:1] not in (" ", "\t", "\n", "")
        if at_boundary and current and size + len(line) > max_chars:
            pieces.append("".join(current).strip("\n"))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current).strip("\n"))
    return [CorpusDocument(f"{doc.name}#{k}", text) for k, text in enumerate(pieces) if text]


class StdlibDataset(NamedTuple):
    tokenizer: Any
    train: list[CorpusDocument]  # the curated training pieces (each once; tiers weight them in the manifest)
    heldout: list[CorpusDocument]
    curation: Any  # the pipeline's CurationResult: report, manifest, output directory


def write_stdlib_jsonl(documents: list[CorpusDocument], path: Path) -> Path:
    """Formatting: files as JSONL records with their provenance (the top-level package is the repository)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc.text, "id": doc.name, "repo": doc.name.split("/")[0], "path": doc.name},
                               ensure_ascii=False) + "\n")
    return path


def split_curated_shards(manifest_path: Path, out_dir: Path, tokenizer) -> tuple[list[CorpusDocument], Path]:
    """The curated files cut into pieces (`split_source`), each tier keeping its epochs, with `weight` = epochs x
    pieces as the pipeline sets it: the same mixture over smaller documents."""
    from internlm2_jax.data.manifest import load_manifest
    from internlm2_jax.data.writers import write_jsonl_shards, write_manifest

    manifest = load_manifest(manifest_path)
    pieces_all, specs = [], []
    for i, shard in enumerate(manifest.shards):
        with open(manifest.resolve(shard), encoding="utf-8") as f:
            files = [json.loads(line) for line in f]
        pieces = [p for record in files for p in split_source(CorpusDocument(record["id"], record["text"]))]
        pieces_all += pieces
        specs += write_jsonl_shards(pieces, out_dir, name=f"{shard.source}-{shard.tier}-{i:05d}", source=shard.source,
                                    tier=shard.tier, epochs=shard.epochs, weight=shard.epochs * len(pieces),
                                    tokenizer=tokenizer)
    write_manifest(specs, out_dir)
    return pieces_all, out_dir / "manifest.json"


def prepare_stdlib_dataset(out_dir: str | Path, vocab_size: int, *, train_bytes: int = 6_000_000,
                           heldout_bytes: int = 400_000, num_shards: int = 4, tokenizer_docs: int = 3000,
                           num_workers: int = 0, progress: bool = True) -> StdlibDataset:
    """The embedded default dataset, curated: stdlib source -> JSONL -> our own tokenizer -> the code-quality
    classifier (trained on heuristic labels) -> the curation pipeline (clean -> dedup -> quality tiers -> weighted
    mixture) -> pieces. The held-out split is cleaned only, so it measures all of the library's code.

    Writes under `out_dir`: `raw/train.jsonl`, `tokenizer.model`, `quality.npz`, `curated/` (the pipeline's output
    and report), `train/manifest.json` and `heldout/manifest.json`.
    """
    from internlm2_jax.data.curation import CurationConfig, InputConfig, QualityConfig, run_local
    from internlm2_jax.data.curation.quality import label_and_train
    from internlm2_jax.data.writers import write_jsonl_shards, write_manifest
    from internlm2_jax.tokenizer import train_tokenizer

    out_dir = Path(out_dir)
    files = stdlib_corpus("train", max_bytes=train_bytes, clean=False)
    raw = write_stdlib_jsonl(files, out_dir / "raw" / "train.jsonl")
    sample = (p.text for d in files for p in split_source(d))
    tokenizer = train_tokenizer(itertools.islice(sample, tokenizer_docs), vocab_size,
                                output_path=out_dir / "tokenizer.model")
    classifier, _ = label_and_train([d.text for d in files])
    classifier.save(out_dir / "quality.npz")
    curation = run_local(CurationConfig(
        inputs=(InputConfig(str(raw), kind="code", source="python-stdlib"),), output_dir=str(out_dir / "curated"),
        quality=QualityConfig(classifier=str(out_dir / "quality.npz")), tokenizer=str(out_dir / "tokenizer.model"),
        unit_bytes=max(train_bytes // 8, 1 << 16), num_workers=num_workers, progress=progress))
    train_docs, _ = split_curated_shards(curation.manifest, out_dir / "train", tokenizer)
    heldout_docs = [p for d in stdlib_corpus("heldout", max_bytes=heldout_bytes) for p in split_source(d)]
    shards = write_jsonl_shards(heldout_docs, out_dir / "heldout", name="heldout", source="python-stdlib",
                                num_shards=num_shards, tokenizer=tokenizer)
    write_manifest(shards, out_dir / "heldout")
    return StdlibDataset(tokenizer, train_docs, heldout_docs, curation)
