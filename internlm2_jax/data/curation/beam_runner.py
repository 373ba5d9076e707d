"""The curation pipeline on Apache Beam, for corpora beyond one machine: DirectRunner locally and in the tests,
Dataflow, Flink or Spark on a cluster (pass their pipeline options). No cluster layer of our own.

The same per-unit functions as the single-machine runner do the text work (`stages.filter_unit`,
`stages.finalize_unit`, each writing its unit's files atomically, so Beam's retries are harmless); the global steps
become shuffles:

- exact dedup: documents grouped by content hash;
- fuzzy dedup: (band, band key) buckets grouped by a GroupByKey, each bucket turned into star edges from its
  smallest key (`dedup.bucket_edges`, verified on the signatures that travel with the keys, or on the exact
  shingle sets read from the units' files); then connected
  components by union-find in ONE worker (`pipeline.resolve_duplicates`), which bounds it to `dedup.max_edges`
  edges (~40 bytes each: 100M edges in ~4 GB). Both runners build the same edges and keep the smallest key of each
  component, so they write identical files.

The output directory must be a filesystem every worker sees (local disk for DirectRunner, a shared mount on a
cluster).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from internlm2_jax.data.curation import stages
from internlm2_jax.data.curation.config import CurationConfig
from internlm2_jax.data.curation.dedup import bucket_edges
from internlm2_jax.data.curation.pipeline import CurationResult, finish, prepare_output, resolve_duplicates, \
    save_duplicates
from internlm2_jax.data.curation.sources import WorkUnit

LOCAL_OPTIONS = ("--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing")


def _filter(unit: WorkUnit, config: CurationConfig, out: str) -> WorkUnit:
    stages.filter_unit(unit, config, Path(out))
    return unit


def _documents(unit: WorkUnit, out: str):
    """(key, content hash, signature, band keys) of every kept document of a filtered unit."""
    arrays = stages.load_unit_arrays(unit, Path(out))
    yield from zip(arrays["keys"].tolist(), arrays["hashes"].tolist(), arrays["signatures"], arrays["band_keys"],
                   strict=True)


def _bucket_entries(doc):
    key, _, signature, keys_of_bands = doc
    for band, band_key in enumerate(keys_of_bands.tolist()):
        if band_key:  # 0: an empty document, in no bucket
            yield (band, band_key), (key, signature)


def _edges(bucket, threshold: float | None):
    _, members = bucket
    members = sorted(members, key=lambda m: m[0])
    if len(members) < 2:
        return []
    keys = np.array([k for k, _ in members], np.int64)
    signature_of = {k: s for k, s in members} if threshold is not None else None
    return bucket_edges(keys, signature_of, threshold)


_STORES: dict[str, stages.ShingleStore] = {}


def _exact_edge(edge, threshold: float, out: str) -> bool:
    store = _STORES.setdefault(out, stages.ShingleStore(Path(out)))
    return bool(store.verified(np.array([edge]), threshold)[0])


def _ids(unit: WorkUnit, out: str):
    arrays = stages.load_unit_arrays(unit, Path(out))
    yield from zip(arrays["keys"].tolist(), arrays["ids"].tolist(), strict=True)


def _resolve(_, groups, edges, ids, config: CurationConfig, out: str) -> dict:
    duplicates, stats = resolve_duplicates(groups, edges, ids, max_edges=config.dedup.max_edges)
    save_duplicates(Path(out), duplicates, stats)
    return stats


def _finalize(unit: WorkUnit, _resolved, config: CurationConfig, out: str) -> int:
    stages.finalize_unit(unit, config, Path(out))
    return unit.index


def run_beam(config: CurationConfig, options: Sequence[str] = LOCAL_OPTIONS) -> CurationResult:
    """Runs the pipeline on Beam with `options` (command-line style pipeline options) and returns the same result
    as `pipeline.run_local`."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    out, units = prepare_output(config)
    where = str(out)
    threshold = config.dedup.minhash.threshold
    with beam.Pipeline(options=PipelineOptions(list(options))) as p:
        filtered = (p | "units" >> beam.Create(units) | "spread" >> beam.Reshuffle()
                    | "filter" >> beam.Map(_filter, config, where))
        docs = filtered | "documents" >> beam.FlatMap(_documents, where)
        groups = (docs | "by hash" >> beam.Map(lambda d: (d[1], d[0])) | "group hashes" >> beam.GroupByKey()
                  | "copies" >> beam.FlatMap(lambda kv: [sorted(kv[1])] if len(kv[1]) > 1 else []))
        if not config.dedup.exact:
            groups = p | "no groups" >> beam.Create([])
        edges = (docs | "buckets" >> beam.FlatMap(_bucket_entries) | "group buckets" >> beam.GroupByKey()
                 | "edges" >> beam.FlatMap(_edges, threshold if config.dedup.verify == "signature" else None))
        if config.dedup.verify == "exact":
            edges = edges | "exact jaccard" >> beam.Filter(_exact_edge, threshold, where)
        if not config.dedup.fuzzy:
            edges = p | "no edges" >> beam.Create([])
        # Only the ids of documents that can be kept copies are needed: members of groups and edges.
        wanted = ((groups | "group keys" >> beam.FlatMap(lambda g: g[:1]),
                   edges | "edge keys" >> beam.FlatMap(lambda e: e))
                  | "wanted" >> beam.Flatten() | "wanted pairs" >> beam.Map(lambda k: (k, None)))
        ids = ({"wanted": wanted, "id": filtered | "ids" >> beam.FlatMap(_ids, where)}
               | "join ids" >> beam.CoGroupByKey()
               | "wanted ids" >> beam.FlatMap(lambda kv: [(kv[0], kv[1]["id"][0])] if kv[1]["wanted"] else []))
        resolved = (p | "once" >> beam.Create([None])
                    | "resolve" >> beam.Map(_resolve, beam.pvalue.AsList(groups), beam.pvalue.AsList(edges),
                                            beam.pvalue.AsDict(ids), config, where))
        _ = filtered | "finalize" >> beam.Map(_finalize, beam.pvalue.AsSingleton(resolved), config, where)
    read = [json.loads((out / "work" / kind / f"{stages.unit_name(u)}.json").read_text())
            for kind in ("filtered", "finalized") for u in units]
    dedup_stats = json.loads((out / "work" / "dedup.json").read_text())
    return finish(config, out, units, read[:len(units)], read[len(units):], dedup_stats)
