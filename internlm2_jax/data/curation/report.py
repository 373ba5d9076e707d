"""The closing report of a curation run: documents and tokens in/out per stage and why each was removed, dedup
clusters, and the tier histogram of the mixture; as JSON (for scripts) and as a Markdown table (for people)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from internlm2_jax.data.curation.minhash import banding_report, detection_probability
from internlm2_jax.data.curation.stages import STAGES, StageCounter, tier_weight


def build_report(config, units, filtered: Sequence[dict], finalized: Sequence[dict], dedup: dict[str, Any]
                 ) -> dict[str, Any]:
    counts = StageCounter.merge([s["counts"] for s in filtered] + [s["counts"] for s in finalized])
    stages = []
    for stage in STAGES:
        stages.append({"stage": stage, "docs_in": counts.docs_in[stage], "docs_out": counts.docs_out[stage],
                       "tokens_in": counts.tokens_in[stage], "tokens_out": counts.tokens_out[stage],
                       "bytes_in": counts.bytes_in[stage], "bytes_out": counts.bytes_out[stage],
                       "removed_because": dict(counts.reasons[stage].most_common())})
    by_source = {spec.source_name: spec for spec in config.inputs}
    tiers: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {"docs": 0, "tokens": 0, "bytes": 0})
    for summary in finalized:
        for shard in summary["shards"]:
            row = tiers[(shard["source"], shard["tier"])]
            for field in ("docs", "tokens", "bytes"):
                row[field] += shard[field]
    tier_rows = []
    for (source, tier), row in sorted(tiers.items()):
        spec = by_source[source]
        tier_rows.append({"source": source, "tier": tier, **row, "epochs": tier_weight(config, spec, tier)})
    weighted = sum(r["tokens"] * r["epochs"] for r in tier_rows) or 1
    for r in tier_rows:
        r["mixture_share"] = r["tokens"] * r["epochs"] / weighted
    quality_reasons = counts.reasons["quality"]
    minhash = config.dedup.minhash
    bands, rows = minhash.banding
    return {"units": len(units), "token_unit": "tokens" if config.tokenizer else "words",
            "stages": stages, "dedup": dedup, "banding": banding_report(minhash),
            "lsh": {"bands": bands, "rows": rows, "threshold": minhash.threshold}, "tiers": tier_rows,
            "dropped_tiers": dict(quality_reasons),
            "output": {"docs": sum(r["docs"] for r in tier_rows), "tokens": sum(r["tokens"] for r in tier_rows),
                       "bytes": sum(r["bytes"] for r in tier_rows)}}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def format_report(report: dict[str, Any]) -> str:
    unit = report["token_unit"]
    lines = [f"| stage | docs in | docs out | removed | {unit} in | {unit} out | MB in | MB out | removed because |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in report["stages"]:
        reasons = ", ".join(f"{k} {v}" for k, v in list(s["removed_because"].items())[:6]) or "-"
        tokens = ("-", "-") if s["stage"] == "read" else (s["tokens_in"], s["tokens_out"])
        lines.append(f"| {s['stage']} | {s['docs_in']} | {s['docs_out']} | {s['docs_in'] - s['docs_out']} | "
                     f"{tokens[0]} | {tokens[1]} | {_mb(s['bytes_in'])} | {_mb(s['bytes_out'])} | {reasons} |")
    d = report["dedup"]
    lines += ["", f"Dedup: {d.get('exact_duplicates', 0)} exact and {d.get('near_duplicates', 0)} near duplicates "
              f"removed; {d.get('clusters', 0)} near-duplicate clusters holding {d.get('documents_in_clusters', 0)} "
              f"documents (largest: {d.get('largest_clusters', [])}); {d.get('lsh_edges', 0)} LSH edges.",
              report["banding"], "",
              f"| source | tier | docs | {unit} | MB | epochs | share of mixture |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["tiers"]:
        lines.append(f"| {r['source']} | {r['tier']} | {r['docs']} | {r['tokens']} | {_mb(r['bytes'])} | "
                     f"{r['epochs']:g} | {r['mixture_share']:.1%} |")
    o = report["output"]
    lines += ["", f"Output: {o['docs']} documents, {o['tokens']} {unit}, {_mb(o['bytes'])} MB."]
    return "\n".join(lines)


def plot_detection_curve(report: dict[str, Any], path: Path) -> None:
    """The LSH S-curve of the banding: P(a pair is a candidate) against its Jaccard similarity."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch under a notebook

    lsh = report["lsh"]
    s = np.linspace(0, 1, 201)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(s, detection_probability(s, lsh["bands"], lsh["rows"]), label=f"b={lsh['bands']} r={lsh['rows']}")
    ax.axvline(lsh["threshold"], color="gray", linestyle="--", label=f"threshold {lsh['threshold']}")
    ax.set(xlabel="Jaccard similarity of a pair", ylabel="P(pair shares a bucket)", title="MinHash-LSH detection")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text("# Curation report\n\n" + format_report(report) + "\n\n"
                                   "![LSH detection curve](lsh_detection_curve.png)\n", encoding="utf-8")
    plot_detection_curve(report, out / "lsh_detection_curve.png")
