"""The curation pipeline on one machine: work units mapped over processes, a global dedup step, a manifest, a report.

    formatting -> rule-based cleaning -> safety -> exact + MinHash-LSH fuzzy dedup -> quality tiers -> mixture

`run_local` maps the per-unit passes of `stages.py` over a process pool; `beam_runner.run_beam` maps the same
functions on Apache Beam and groups LSH buckets with a shuffle. Both call `resolve_duplicates` on the same edges, so
they write the same files. The output directory holds:

    shards/<source>/<tier>/U.jsonl     curated documents (provenance and per-stage decisions in `meta`)
    manifest.json                      the pretraining data manifest: per-shard tokens, tier epochs and weights
    removed/U-{filter,finalize}.jsonl  every removed document with its stage and reasons (bad input: raw content)
    report.json, report.md             the stage table, dedup clusters, tier histogram, LSH detection curve PNG
    work/                              per-unit intermediate files and summaries (what a resumed run skips)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from internlm2_jax.data.curation import stages
from internlm2_jax.data.curation.config import CurationConfig
from internlm2_jax.data.curation.dedup import connected_components, exact_groups, star_edges
from internlm2_jax.data.curation.report import build_report, write_report
from internlm2_jax.data.curation.sources import WorkUnit, plan_units
from internlm2_jax.data.manifest import ShardSpec, make_manifest, save_manifest

DEDUP_FILE = "work/dedup.npz"


class OutputDirError(ValueError):
    """The output directory holds a run made with a different configuration."""


@dataclasses.dataclass
class CurationResult:
    output_dir: Path
    report: dict[str, Any]
    manifest: Path | None  # None when nothing survived
    repositories_manifest: Path | None


def prepare_output(config: CurationConfig) -> tuple[Path, list[WorkUnit]]:
    """Plans the work units and claims the output directory; a directory of an earlier run of the same config is
    resumed (done units are skipped), one of another config is refused rather than mixed."""
    config.validate()
    out = Path(config.output_dir)
    marker = out / "work" / "config.json"
    fingerprint = config.fingerprint()
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise OutputDirError(f"{out} holds a curation run with another configuration (fingerprint "
                                 f"{previous.get('fingerprint')} != {fingerprint}); choose a new output_dir or "
                                 "delete it")
    elif out.exists() and any(out.iterdir()):
        raise OutputDirError(f"{out} exists and is not a curation output directory; choose a new output_dir")
    units = plan_units(config.inputs, config.unit_bytes)
    (out / "work").mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint, "config": config.to_json(),
                                  "units": len(units)}, indent=1) + "\n")
    return out, units


def _progress(config: CurationConfig, units: Sequence[WorkUnit], desc: str):
    from tqdm import tqdm  # not tqdm.auto: without ipywidgets it warns in every notebook

    return tqdm(total=sum(u.size for u in units), unit="B", unit_scale=True, desc=desc,
                disable=not config.progress, dynamic_ncols=True)


def map_units(fn: Callable[[WorkUnit], dict], units: Sequence[WorkUnit], config: CurationConfig,
              desc: str) -> list[dict]:
    """`fn` over every unit on `num_workers` processes, with a bar of MB/s and docs/s; results in unit order."""
    workers = config.num_workers or os.cpu_count() or 1
    results: dict[int, dict] = {}
    start, docs = time.perf_counter(), 0
    with _progress(config, units, desc) as bar:
        if workers == 1:
            outputs: Iterable = ((u, fn(u)) for u in units)
            pool = None
        else:  # fork is fast and needs no `__main__` guard, but not once JAX's threads exist: then spawn
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn" if "jax" in sys.modules else "fork"))
            outputs = zip(units, pool.map(fn, units), strict=True)
        try:
            for unit, summary in outputs:
                results[unit.index] = summary
                docs += summary["docs"]
                bar.update(unit.size)
                bar.set_postfix(docs_s=f"{docs / max(time.perf_counter() - start, 1e-9):.0f}")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return [results[u.index] for u in units]


def fuzzy_edges(arrays: dict[str, np.ndarray], config: CurationConfig, out: Path) -> np.ndarray:
    """LSH edges on one machine: `dedup.bucket_edges` of every bucket, vectorised (`dedup.star_edges`), verified on
    the signatures or on the exact shingle sets."""
    mode, threshold = config.dedup.verify, config.dedup.minhash.threshold
    edges = star_edges(arrays["keys"], arrays["band_keys"], arrays["signatures"],
                       threshold if mode == "signature" else None)
    if mode == "exact":
        edges = edges[stages.ShingleStore(out).verified(edges, threshold)]
    return edges


def resolve_duplicates(groups: Iterable[Sequence[int]], edges: Iterable[tuple[int, int]], ids: dict[int, str],
                       *, max_edges: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Which documents go, and which kept document each duplicates; the same on every runner.

    Exact copies point at the smallest key with the same text. Near duplicates point at the smallest key of their
    LSH connected component; a copy of a near duplicate stays an exact duplicate of its twin.
    """
    kept: dict[int, tuple[int, bool]] = {}
    for group in groups:
        first = min(group)
        kept.update({k: (first, True) for k in group if k != first})
    # The same edge comes from several bands (and, on Beam, from several workers): count and join each once.
    edges = np.unique(np.asarray(edges if isinstance(edges, np.ndarray) else list(edges), np.int64).reshape(-1, 2),
                      axis=0)
    members, roots = connected_components(edges, edges.ravel(), max_edges=max_edges)
    clusters: dict[int, int] = {}
    for key, r in zip(members.tolist(), roots.tolist(), strict=True):
        clusters[r] = clusters.get(r, 0) + 1
        if key != r and key not in kept:
            kept[key] = (r, False)
    keys = np.array(sorted(kept), np.int64)
    duplicates = {"keys": keys,
                  "kept_key": np.array([kept[k][0] for k in keys.tolist()], np.int64),
                  "exact": np.array([kept[k][1] for k in keys.tolist()], bool),
                  "kept_id": np.array([ids.get(kept[k][0], "") for k in keys.tolist()], dtype=str)}
    sizes = sorted(clusters.values(), reverse=True)
    stats = {"exact_duplicates": int(duplicates["exact"].sum()),
             "near_duplicates": int((~duplicates["exact"]).sum()), "lsh_edges": len(edges),
             "clusters": len(sizes), "documents_in_clusters": int(sum(sizes)), "largest_clusters": sizes[:10]}
    return duplicates, stats


def save_duplicates(out: Path, duplicates: dict[str, np.ndarray], stats: dict[str, Any]) -> None:
    tmp = out / "work" / f".dedup.tmp-{os.getpid()}.npz"
    np.savez(tmp, **duplicates)
    os.replace(tmp, out / DEDUP_FILE)
    (out / "work" / "dedup.json").write_text(json.dumps(stats, indent=1) + "\n")


def _load_kept_arrays(units: Sequence[WorkUnit], out: Path) -> dict[str, np.ndarray]:
    parts = [stages.load_unit_arrays(u, out) for u in units]
    return {name: np.concatenate([p[name] for p in parts]) for name in ("keys", "hashes", "signatures", "band_keys")}


def _kept_ids(units: Sequence[WorkUnit], out: Path, wanted: set[int]) -> dict[int, str]:
    ids = {}
    for unit in units:
        arrays = stages.load_unit_arrays(unit, out)
        ids.update((k, i) for k, i in zip(arrays["keys"].tolist(), arrays["ids"].tolist(), strict=True) if k in wanted)
    return ids


def dedup_local(config: CurationConfig, units: Sequence[WorkUnit], out: Path) -> dict[str, Any]:
    """Exact and fuzzy dedup over every unit's hashes and signatures (about 600 bytes per document in memory)."""
    if (out / "work" / "dedup.json").exists():
        return json.loads((out / "work" / "dedup.json").read_text())
    arrays = _load_kept_arrays(units, out)
    groups = exact_groups(arrays["keys"], arrays["hashes"]) if config.dedup.exact else []
    edges = fuzzy_edges(arrays, config, out) if config.dedup.fuzzy else np.zeros((0, 2))
    wanted = {min(g) for g in groups} | set(np.unique(edges).tolist())
    duplicates, stats = resolve_duplicates(groups, edges, _kept_ids(units, out, wanted),
                                           max_edges=config.dedup.max_edges)
    save_duplicates(out, duplicates, stats)
    return stats


def write_manifests(config: CurationConfig, out: Path, finalized: Sequence[dict]) -> tuple[Path | None, Path | None]:
    """The mixture: one manifest shard per output file, `epochs` = the tier's sampling weight, and `weight` =
    epochs x documents, so every shard's quota runs out at the same time within a round."""
    by_source = {spec.source_name: spec for spec in config.inputs}
    paths = []
    files = {"manifest.json": [s for summary in finalized for s in summary["shards"]],
             "manifest_repositories.json": [summary["repository_shard"] for summary in finalized
                                            if summary["repository_shard"]]}
    for name, shards in files.items():
        specs = []
        for s in shards:
            source = by_source.get(s["source"]) or by_source[s["source"].removesuffix("-repositories")]
            epochs = stages.tier_weight(config, source, s["tier"])
            specs.append(ShardSpec(path=s["path"], format="jsonl", source=s["source"], tier=s["tier"],
                                   num_tokens=s["tokens"] if config.tokenizer else None,
                                   weight=epochs * s["docs"], epochs=epochs))
        if specs and any(s.weight > 0 for s in specs):
            save_manifest(make_manifest(specs, base_dir=out.resolve()), out / name)
            paths.append(out / name)
        else:
            paths.append(None)
    return paths[0], paths[1]


def run_local(config: CurationConfig) -> CurationResult:
    out, units = prepare_output(config)
    filtered = map_units(partial(stages.filter_unit, config=config, out_dir=out), units, config, "filter")
    dedup_stats = dedup_local(config, units, out)
    finalized = map_units(partial(stages.finalize_unit, config=config, out_dir=out), units, config, "finalize")
    return finish(config, out, units, filtered, finalized, dedup_stats)


def finish(config: CurationConfig, out: Path, units: Sequence[WorkUnit], filtered: Sequence[dict],
           finalized: Sequence[dict], dedup_stats: dict[str, Any]) -> CurationResult:
    manifest, repositories = write_manifests(config, out, finalized)
    report = build_report(config, units, filtered, finalized, dedup_stats)
    write_report(report, out)
    return CurationResult(out, report, manifest, repositories)
