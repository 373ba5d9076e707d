"""`make demo`'s dataset, built on this machine: the stdlib corpus (`data.corpus`) curated end to end.

An orchestration over the data primitives, not one of them: it trains a tokenizer and a quality classifier, runs the
curation pipeline, and writes the shards and manifests a run reads. Data primitives (corpus, writers, manifest,
curation) stay in `internlm2_jax.data`, which never needs this module.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import NamedTuple

from internlm2_jax.data.corpus import CorpusDocument, split_source, stdlib_corpus
from internlm2_jax.data.curation import CurationConfig, CurationResult, InputConfig, QualityConfig, run_local
from internlm2_jax.data.curation.quality import label_and_train
from internlm2_jax.data.manifest import load_manifest
from internlm2_jax.data.writers import write_jsonl_shards, write_manifest
from internlm2_jax.tokenizer import Tokenizer, train_tokenizer


class StdlibDataset(NamedTuple):
    tokenizer: Tokenizer
    train: list[CorpusDocument]  # the curated training pieces (each once; tiers weight them in the manifest)
    heldout: list[CorpusDocument]
    curation: CurationResult  # report, manifest, output directory


def write_stdlib_jsonl(documents: list[CorpusDocument], path: Path) -> Path:
    """Formatting: files as JSONL records with their provenance (the top-level package is the repository)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc.text, "id": doc.name, "repo": doc.name.split("/")[0], "path": doc.name},
                               ensure_ascii=False) + "\n")
    return path


def split_curated_shards(manifest_path: Path, out_dir: Path,
                         tokenizer: Tokenizer) -> tuple[list[CorpusDocument], Path]:
    """The curated files cut into pieces (`split_source`), each tier keeping its epochs, with `weight` = epochs x
    pieces as the pipeline sets it: the same mixture over smaller documents."""
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
