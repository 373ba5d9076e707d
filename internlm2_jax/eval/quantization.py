"""Weight formats x KV-cache formats on one model: held-out perplexity through the decoding cache, and memory.

`weight_formats` makes the model's fp32 / int8 / int4 round-to-nearest / int4 AWQ / NF4 copies; `compare_formats`
scores each with each cache format (`KV_FORMATS`), teacher-forced through the static cache in chunks
(`decode.scoring.cached_logprobs`), so a quantized cache's error counts as decoding sees it.
benchmarks/quantization.py adds decode speed to these rows; notebooks/quantization.ipynb plots them.
"""

from __future__ import annotations

import math

import numpy as np

from internlm2_jax.decode.scoring import cached_logprobs
from internlm2_jax.model.awq import awq_calibrate
from internlm2_jax.model.kv_cache import bytes_per_token
from internlm2_jax.model.quantize import quantize_int4_model, quantize_int8, quantize_nf4_model, weight_bytes

KV_FORMATS = (None, "int8", "int4")  # None: the compute dtype


def weight_formats(model, calibration: list[np.ndarray], *, group: int = 128, progress: bool = False) -> dict:
    """{name: model} for the float model and its int8, int4 (round to nearest, and after AWQ calibrated on the
    `calibration` token batches) and NF4 (blocks of 64, double-quantized) copies; int4 in groups of `group`."""
    awq, _ = awq_calibrate(model, calibration, group=group, progress=progress)
    return {"float": model, "int8": quantize_int8(model), f"int4 RTN g{group}": quantize_int4_model(model, group),
            f"int4 AWQ g{group}": quantize_int4_model(awq, group), "NF4 b64": quantize_nf4_model(model)}


def cached_perplexity(model, ids: np.ndarray, mask: np.ndarray, kv_dtype: str | None, chunk: int = 16) -> float:
    """Perplexity of token rows `ids` [batch, T] over the next tokens `mask` [batch, T] marks (position t: token
    t + 1 is scored), through a `kv_dtype` cache."""
    weights = np.asarray(mask, np.float64)[:, :-1]
    if weights.sum() == 0:
        raise ValueError("cached_perplexity: the mask scores no token")
    logprobs = cached_logprobs(model, ids, kv_dtype=kv_dtype, chunk=chunk)
    return math.exp(-float((logprobs * weights).sum() / weights.sum()))


def compare_formats(formats: dict, ids: np.ndarray, mask: np.ndarray, kv_formats=KV_FORMATS) -> list[dict]:
    """One row per (weight format, KV format): held-out perplexity, its change against the first format's with the
    float cache, weight MiB and KV KiB per token (codes and scales)."""
    rows, baseline = [], None
    for name, model in formats.items():
        for kv in kv_formats:
            ppl = cached_perplexity(model, ids, mask, kv)
            baseline = baseline or ppl
            rows.append({"weights": name, "kv": kv or model.cfg.dtype, "kv_dtype": kv, "ppl": ppl,
                         "ppl_change": ppl / baseline - 1, "weights_mib": weight_bytes(model) / 2**20,
                         "kv_kib_per_token": bytes_per_token(model.cfg, None, kv) / 1024})
    return rows


def markdown_table(rows: list[dict], extra: tuple[str, ...] = ()) -> str:
    """`compare_formats`' rows as a Markdown table, with the `extra` columns each row holds as well."""
    header = ["weights", "KV", "held-out ppl", "vs float", "weights MiB", "KV KiB/token", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["weights"], r["kv"], f"{r['ppl']:.2f}", f"{r['ppl_change']:+.2%}", f"{r['weights_mib']:.1f}",
                 f"{r['kv_kib_per_token']:.1f}", *(f"{r[c]:.0f}" for c in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
