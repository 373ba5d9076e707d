"""The curation pipeline's configuration: frozen dataclasses, changed from the command line with `--set a.b=value`.

Defaults are the report's (§3.1): MinHash over word 5-grams with 128 hash functions at Jaccard 0.7; code scored into
high/moderate/low tiers with high up-sampled and low dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from internlm2_jax.data.curation.cleaning import CleaningConfig
from internlm2_jax.data.curation.minhash import MinHashConfig
from internlm2_jax.data.curation.quality import TierConfig
from internlm2_jax.data.curation.safety import SafetyConfig
from internlm2_jax.data.curation.sources import InputConfig


VERIFY_MODES = ("signature", "exact", "none")


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    exact: bool = True  # drop exact copies (same text after cleaning), keeping the smallest key
    fuzzy: bool = True  # MinHash-LSH near-duplicate clusters, keeping the smallest key
    minhash: MinHashConfig = dataclasses.field(default_factory=MinHashConfig)
    # Keep an LSH edge only when the pair's Jaccard reaches the threshold: "signature" (estimated from the 128 rows,
    # free), "exact" (on the shingle sets, stored per unit: ~8 bytes per word of disk, exact precision) or "none".
    verify: str = "signature"
    max_edges: int = 100_000_000  # connected components run in one worker's memory (~60 bytes per edge)

    def __post_init__(self):
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"dedup.verify: must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        if self.max_edges < 1:
            raise ValueError(f"dedup.max_edges: must be >= 1, got {self.max_edges}")


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    classifier: str = ""  # a saved QualityClassifier (.npz); empty: no scoring, every document in tier "default"
    kinds: tuple[str, ...] = ("code",)  # which inputs (by cleaning kind) are scored into tiers
    tiers: TierConfig = dataclasses.field(default_factory=TierConfig)
    batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class CurationConfig:
    inputs: tuple[InputConfig, ...] = ()
    output_dir: str = "curated"
    text_cleaning: CleaningConfig = dataclasses.field(default_factory=CleaningConfig.for_text)
    code_cleaning: CleaningConfig = dataclasses.field(default_factory=CleaningConfig.for_code)
    safety: SafetyConfig = dataclasses.field(default_factory=SafetyConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)
    repositories: bool = False  # code trees: also one document per repository, files in import order (long context)
    tokenizer: str = ""  # a SentencePiece model to count tokens with; empty: whitespace-separated words are counted
    num_workers: int = 0  # processes; 0: one per CPU core; 1: in this process (debugging, profiling)
    unit_bytes: int = 32 << 20  # work unit size: the grain of parallelism, progress and resumption
    max_record_bytes: int = 16 << 20  # a longer record is quarantined as oversized, never read whole into memory
    keep_removed_text: bool = True  # write removed documents' text to removed/ (so a threshold can be audited)
    progress: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: at least one input is required")
        first: dict[str, int] = {}
        for i, spec in enumerate(self.inputs):
            spec.validate(f"inputs[{i}]")
            j = first.setdefault(spec.source_name, i)
            other = self.inputs[j]
            if (other.cleaning_kind, other.weight) != (spec.cleaning_kind, spec.weight):
                raise ValueError(f"inputs[{i}].source: {spec.source_name!r} is also inputs[{j}]'s source, with another "
                                 "kind or weight; name the sources apart")
        for name in ("unit_bytes", "max_record_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def fingerprint(self) -> str:
        """What decides the outputs (not the worker count or the progress bar): a resumed run must match it."""
        data = self.to_json()
        for key in ("num_workers", "progress", "output_dir"):
            data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
