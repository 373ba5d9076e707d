"""The long-context mixture: a curation run's outputs -> one data manifest for the 32K phase (spec §5.2-§5.4).

What the report says (spec §5.3/§5.4, mostly [R?]) and what we take from it:
- Repository-level code: a repository's files concatenated in import-dependency order, "so the 32K context sees
  whole repositories" (§5.2). Here: the curation pipeline's repository documents (`repositories=True`,
  `curation/code.py`), which are the `manifest_repositories.json` of a curation run.
- Long-context data is first selected by length, "long documents only" (§5.3a), thresholds chosen per domain. Here:
  documents of the ordinary curated manifest at least `long_threshold` long. The report's statistical and
  perplexity filters (§5.3b/c) are not implemented.
- "About 50% of this phase's data is <= 4K long" (§5.4 [R?]): `replay_share = 0.5` of the tokens come from the
  ordinary documents shorter than `long_threshold` (4096: the phase-1 row length), so short contexts are not
  forgotten.
Our own choices (the report gives no numbers): `long_upweight = 2` and `repository_upweight = 1` (below), and
`min_repository_files = 2` (a one-file "repository", e.g. a top-level stdlib module, is the file itself, which is
already an ordinary document).

Sources of the output manifest, each written as JSONL shards under `<out_dir>/long_context/`, so the directory
moves as one:
- `repositories/`: repository documents, source `<curated source>-repositories` (as the pipeline names it);
- `long/`: the long ordinary documents, source `<source>-long`;
- `replay/`: the other (short) ordinary documents, source `<source>-replay`.
One output shard per input shard and role; a shard keeps its input's `tier`.

Weights, in the existing manifest terms (`data/mixture.py`): a round of the mixture reads shard i `epochs_i` times.
- long shards: `epochs = curated epochs x long_upweight` (tiers keep their relative up-sampling);
- repository shards: `epochs = curated epochs x repository_upweight`;
- replay shards: `epochs = curated epochs x replay_scale`, with `replay_scale` solved so that replay is exactly
  `replay_share` of a round's length units (tokens or bytes): replay_units / (replay_units + long_units) = share.
- `weight = epochs x documents`, the curation pipeline's convention: every shard's quota then runs out together, so
  the proportions hold throughout a round, not only on average.
The up-weight factors therefore set how often each long document repeats per round and the balance between the two
long sources; the replay share alone sets how much short data comes with them.

Lengths: per document, counted here (a manifest only has per-shard totals). `length_unit="tokens"` counts the text's
tokens as the curation pipeline does (`encode(text, allow_special=False)`, without BOS/EOS), and every shard's sum
is checked against the manifest's own `num_tokens` where it has one: a mismatch means another tokenizer than the one
curation counted with, which is an error rather than a silently different threshold. `length_unit="bytes"` counts
UTF-8 bytes and needs no tokenizer.

The result is an ordinary manifest: `PretrainDataIterator` (data format `pretrain`) reads it and packs the
documents into rows of `train.seq_len`, cutting a document longer than a row at the row end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from internlm2_jax.data.manifest import Manifest, ShardSpec, load_manifest
from internlm2_jax.data.writers import write_manifest

LENGTH_UNITS = ("tokens", "bytes")
ROLES = ("repositories", "long", "replay")
OUTPUT_SUBDIR = "long_context"
REPORT_FILE = "long_context_report.json"
REPORT_LENGTHS = (4096, 32768)  # the phase-1 and phase-2 row lengths: what the length distribution is cut at


class LengthCounter(Protocol):
    def encode(self, text: str, *, allow_special: bool = True) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class LongContextMixConfig:
    long_threshold: int = 4096  # a document at least this long (in `length_unit`) is long: the phase-1 row length
    length_unit: str = "tokens"  # "tokens" (needs the tokenizer) | "bytes"
    long_upweight: float = 2.0  # long documents' epochs = their curated epochs x this (our choice)
    repository_upweight: float = 1.0  # repository documents' epochs = their curated epochs x this (our choice)
    replay_share: float = 0.5  # share of a round's tokens from short documents (spec §5.4: ~50% <= 4K)
    min_repository_files: int = 2  # fewer files: the "repository" is one file, already an ordinary document

    def __post_init__(self):
        if self.length_unit not in LENGTH_UNITS:
            raise ValueError(f"LongContextMixConfig.length_unit: must be one of {', '.join(LENGTH_UNITS)}, "
                             f"got {self.length_unit!r}")
        if isinstance(self.long_threshold, bool) or not isinstance(self.long_threshold, int) \
                or self.long_threshold <= 0:
            raise ValueError(f"LongContextMixConfig.long_threshold: must be an integer > 0, "
                             f"got {self.long_threshold!r}")
        for name in ("long_upweight", "repository_upweight"):
            value = getattr(self, name)
            if not (_is_number(value) and value > 0):
                raise ValueError(f"LongContextMixConfig.{name}: must be a finite number > 0 (leave a source out by "
                                 f"giving it no documents, not weight 0), got {value!r}")
        if not (_is_number(self.replay_share) and 0 <= self.replay_share < 1):
            raise ValueError(f"LongContextMixConfig.replay_share: must be in [0, 1) (1 would leave no room for "
                             f"long data), got {self.replay_share!r}")
        if isinstance(self.min_repository_files, bool) or not isinstance(self.min_repository_files, int) \
                or self.min_repository_files < 1:
            raise ValueError(f"LongContextMixConfig.min_repository_files: must be an integer >= 1, "
                             f"got {self.min_repository_files!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


DEFAULT_CONFIG = LongContextMixConfig()


@dataclasses.dataclass
class LengthStats:
    """Documents and length units of a set of documents, and how many of them sit in documents longer than each of
    `REPORT_LENGTHS` (fixed counters rather than every length, so a corpus of any size fits in memory)."""

    documents: int = 0
    units: int = 0
    longest: int = 0
    units_over: dict[int, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(REPORT_LENGTHS, 0))
    documents_over: dict[int, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(REPORT_LENGTHS, 0))

    def add(self, length: int) -> None:
        self.documents += 1
        self.units += length
        self.longest = max(self.longest, length)
        for cut in REPORT_LENGTHS:
            if length > cut:
                self.units_over[cut] += length
                self.documents_over[cut] += 1

    def merge(self, other: LengthStats) -> None:
        self.documents += other.documents
        self.units += other.units
        self.longest = max(self.longest, other.longest)
        for cut in REPORT_LENGTHS:
            self.units_over[cut] += other.units_over[cut]
            self.documents_over[cut] += other.documents_over[cut]

    def share_over(self, cut: int) -> float:
        return self.units_over[cut] / self.units if self.units else 0.0


@dataclasses.dataclass(frozen=True)
class OutputShard:
    role: str  # one of ROLES
    spec: ShardSpec
    stats: LengthStats


@dataclasses.dataclass(frozen=True)
class LongContextResult:
    manifest: Path
    config: LongContextMixConfig
    replay_scale: float  # the replay shards' epochs = curated epochs x this
    shards: tuple[OutputShard, ...]

    def role_stats(self, role: str) -> LengthStats:
        total = LengthStats()
        for shard in self.shards:
            if shard.role == role:
                total.merge(shard.stats)
        return total

    def round_units(self, role: str | None = None) -> float:
        """Length units one round of the mixture reads (epochs x units), of one role or of all."""
        return sum(s.spec.epochs * s.stats.units for s in self.shards if role in (None, s.role))

    def round_share_over(self, cut: int) -> float:
        """Share of a round's units that sit in documents longer than `cut`: the length distribution the model sees."""
        total = self.round_units()
        return sum(s.spec.epochs * s.stats.units_over[cut] for s in self.shards) / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        roles = {}
        for role in ROLES:
            stats = self.role_stats(role)
            roles[role] = {"documents": stats.documents, self.config.length_unit: stats.units,
                           "longest": stats.longest, "round_share": self.round_units(role) / self.round_units(),
                           **{f"share_over_{cut}": stats.share_over(cut) for cut in REPORT_LENGTHS},
                           **{f"documents_over_{cut}": stats.documents_over[cut] for cut in REPORT_LENGTHS}}
        return {"config": dataclasses.asdict(self.config), "manifest": str(self.manifest),
                "replay_scale": self.replay_scale, "roles": roles,
                "round": {f"share_over_{cut}": self.round_share_over(cut) for cut in REPORT_LENGTHS},
                "shards": [{"role": s.role, "path": s.spec.path, "source": s.spec.source, "tier": s.spec.tier,
                            "documents": s.stats.documents, self.config.length_unit: s.stats.units,
                            "epochs": s.spec.epochs, "weight": s.spec.weight} for s in self.shards]}


def format_report(result: LongContextResult) -> str:
    """A table of the three roles: documents, length units, a round's share, and the length distribution."""
    unit = result.config.length_unit
    over = " ".join(f"{'>' + _short(cut):>8}" for cut in REPORT_LENGTHS)
    lines = [f"{'role':<13}{'docs':>8}{unit:>13}{'longest':>10}{'round share':>13} {over}  (share of {unit} in "
             f"documents longer than)"]
    for role in ROLES:
        stats = result.role_stats(role)
        shares = " ".join(f"{stats.share_over(cut):>8.1%}" for cut in REPORT_LENGTHS)
        lines.append(f"{role:<13}{stats.documents:>8}{stats.units:>13,}{stats.longest:>10,}"
                     f"{result.round_units(role) / result.round_units():>13.1%} {shares}")
    round_over = " ".join(f"{result.round_share_over(cut):>8.1%}" for cut in REPORT_LENGTHS)
    lines.append(f"{'one round':<13}{'':>8}{round(result.round_units()):>13,}{'':>10}{1:>13.1%} {round_over}")
    lines.append(f"replay_scale {result.replay_scale:.4g} (replay epochs = curated epochs x this); long documents "
                 f"x{result.config.long_upweight:g}, repositories x{result.config.repository_upweight:g}")
    return "\n".join(lines)


def _short(cut: int) -> str:
    return f"{cut // 1024}K" if cut % 1024 == 0 else str(cut)


def _length(text: str, config: LongContextMixConfig, tokenizer: LengthCounter | None) -> int:
    if config.length_unit == "bytes":
        return len(text.encode("utf-8"))
    assert tokenizer is not None  # checked before any document is read
    return len(tokenizer.encode(text, allow_special=False))


def _read_records(manifest: Manifest, shard: ShardSpec):
    if shard.format != "jsonl":
        raise ValueError(f"{manifest.resolve(shard)}: format {shard.format!r}; the long-context mixture reads the "
                         "curation pipeline's JSONL shards only")
    with manifest.resolve(shard).open("r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _check_counted(manifest: Manifest, shard: ShardSpec, counted: int, config: LongContextMixConfig) -> None:
    if config.length_unit == "tokens" and shard.num_tokens is not None and shard.num_tokens != counted:
        raise ValueError(f"{manifest.resolve(shard)}: counted {counted} tokens, the manifest's num_tokens says "
                         f"{shard.num_tokens}: the tokenizer given is not the one the curation run counted with")


class _ShardWriter:
    """One output JSONL shard of a role, opened on its first document (a role with no documents writes no file)."""

    def __init__(self, out: Path, role: str, name: str, *, keep: bool = True):
        self.path = out / OUTPUT_SUBDIR / role / f"{name}.jsonl"
        self.keep = keep  # False: only count (replay_share 0 reads no short data, so none is written)
        self.stats = LengthStats()
        self._file = None

    def write(self, record: dict[str, Any], length: int) -> None:
        self.stats.add(length)
        if not self.keep:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _progress(manifests: Sequence[Manifest], progress: bool):
    from tqdm import tqdm  # not tqdm.auto: without ipywidgets it warns in every notebook

    total = sum(m.resolve(s).stat().length for m in manifests for s in m.shards)
    return tqdm(total=total, unit="B", unit_scale=True, desc="long-context mixture", disable=not progress,
                dynamic_ncols=True)


def _split_shards(curated: Manifest, repositories: Manifest, out: Path, config: LongContextMixConfig,
                  tokenizer: LengthCounter | None, progress: bool) -> list[tuple[str, ShardSpec, _ShardWriter]]:
    """Reads every curated shard once, writing each document to its role's shard; (role, input shard, writer)."""
    outputs = []
    with _progress([curated, repositories], progress) as bar:
        for i, shard in enumerate(repositories.shards):
            writer = _ShardWriter(out, "repositories", f"{shard.source}-{shard.tier}-{i:05d}")
            counted = 0
            try:
                for record in _read_records(repositories, shard):
                    length = _length(record["text"], config, tokenizer)
                    counted += length
                    files = record.get("meta", {}).get("files")
                    if files is None:
                        raise ValueError(f"{repositories.resolve(shard)}: record {record.get('id')!r} has no "
                                         "meta.files: not a repository document of the curation pipeline")
                    if len(files) >= config.min_repository_files:
                        writer.write(record, length)
            finally:
                writer.close()
            _check_counted(repositories, shard, counted, config)
            outputs.append(("repositories", shard, writer))
            bar.update(repositories.resolve(shard).stat().length)
        for i, shard in enumerate(curated.shards):
            name = f"{shard.source}-{shard.tier}-{i:05d}"
            long = _ShardWriter(out, "long", name)
            short = _ShardWriter(out, "replay", name, keep=config.replay_share > 0)
            counted = 0
            try:
                for record in _read_records(curated, shard):
                    length = _length(record["text"], config, tokenizer)
                    counted += length
                    (long if length >= config.long_threshold else short).write(record, length)
            finally:
                long.close()
                short.close()
            _check_counted(curated, shard, counted, config)
            outputs += [("long", shard, long), ("replay", shard, short)]
            bar.update(curated.resolve(shard).stat().length)
    return outputs


def _load(path: str | Path | None, field: str, hint: str) -> Manifest:
    if path is None or not Path(path).is_file():
        raise ValueError(f"{field}: no manifest at {path!r}; {hint}")
    return load_manifest(path)


def build_long_context_manifest(curated_manifest: str | Path | None, repositories_manifest: str | Path | None,
                                out_dir: str | Path, config: LongContextMixConfig = DEFAULT_CONFIG, *,
                                tokenizer: LengthCounter | None = None, overwrite: bool = False,
                                progress: bool = True) -> LongContextResult:
    """Writes `<out_dir>/manifest.json`, its shards under `<out_dir>/long_context/` and `long_context_report.json`,
    from a curation run's `manifest.json` (`curated_manifest`) and `manifest_repositories.json`
    (`repositories_manifest`); see the module docstring for the roles and weights.

    `tokenizer` counts tokens for `length_unit="tokens"`: use the one the curation run counted with and the run will
    train with. An `out_dir` holding an earlier mixture is refused unless `overwrite` (which removes only the files
    this function writes).
    """
    if config.length_unit == "tokens" and tokenizer is None:
        raise ValueError("tokenizer: LongContextMixConfig.length_unit='tokens' needs the tokenizer to count with "
                         "(or set length_unit='bytes')")
    curated = _load(curated_manifest, "curated_manifest", "give the manifest.json of a curation run")
    repositories = _load(repositories_manifest, "repositories_manifest",
                         "curate code trees with repositories=True (`--set repositories=true`), which writes "
                         "manifest_repositories.json")
    out = Path(out_dir)
    previous = [p for p in (out / "manifest.json", out / OUTPUT_SUBDIR, out / REPORT_FILE) if p.exists()]
    if previous and not overwrite:
        raise FileExistsError(f"out_dir: {out} already holds {', '.join(p.name for p in previous)}; pass "
                              "overwrite=True (--overwrite) to replace them")
    for path in previous:
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    outputs = _split_shards(curated, repositories, out, config, tokenizer, progress)
    found = {role: sum(w.stats.documents for r, _, w in outputs if r == role) for role in ROLES}
    if not found["repositories"] and not found["long"]:
        raise ValueError(f"long_threshold / min_repository_files: no ordinary document reaches long_threshold="
                         f"{config.long_threshold} {config.length_unit} and no repository document has "
                         f"min_repository_files={config.min_repository_files} files: nothing long to train on")
    if config.replay_share > 0 and not found["replay"]:
        raise ValueError(f"replay_share: {config.replay_share} asks for short data, but every ordinary document "
                         f"reaches long_threshold={config.long_threshold} {config.length_unit}; raise the threshold "
                         "or set replay_share=0")

    scale = {"repositories": config.repository_upweight, "long": config.long_upweight}
    long_units = sum(shard.epochs * scale[role] * w.stats.units for role, shard, w in outputs if role != "replay")
    replay_units = sum(shard.epochs * w.stats.units for role, shard, w in outputs if role == "replay")
    # replay_scale * replay_units / (replay_scale * replay_units + long_units) = replay_share
    scale["replay"] = (config.replay_share / (1 - config.replay_share) * long_units / replay_units
                       if replay_units else 0.0)

    shards = []
    for role, shard, writer in outputs:
        if not writer.stats.documents or not writer.keep:
            continue
        source = shard.source if role == "repositories" else f"{shard.source}-{role}"
        epochs = shard.epochs * scale[role]
        spec = ShardSpec(path=writer.path.relative_to(out).as_posix(), format="jsonl", source=source,
                         tier=shard.tier, num_tokens=writer.stats.units if config.length_unit == "tokens" else None,
                         weight=epochs * writer.stats.documents, epochs=epochs)
        shards.append(OutputShard(role, spec, writer.stats))
    write_manifest([s.spec for s in shards], out)
    result = LongContextResult(out / "manifest.json", config, scale["replay"], tuple(shards))
    (out / REPORT_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    return result
