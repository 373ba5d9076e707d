"""`make demo` runs end to end: its command (`python -m internlm2_jax.launch experiments/tiny_chain.py`) in a subprocess
with a timeout, on the one CPU device a newcomer has, shortened with `--set` (fewer steps, a smaller model; the full
demo takes about 8 minutes). The evaluation suite at its end has no knobs and takes about half of this test."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORTER = {
    "train.steps": 120, "optimizer.total_steps": 120, "optimizer.warmup_steps": 10, "train.batch_size": 8,
    "data.eval_batches": 8, "model.num_hidden_layers": 2, "model.hidden_size": 128, "model.intermediate_size": 384,
    "model.head_dim": 32,
}


def test_make_demo_runs_and_reports(tmp_path):
    assert "-m internlm2_jax.launch experiments/tiny_chain.py" in (ROOT / "Makefile").read_text()
    overrides = [arg for key, value in SHORTER.items() for arg in ("--set", f"{key}={value}")]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "internlm2_jax.launch", str(ROOT / "experiments" / "tiny_chain.py"),
                           *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    # The run exits non-zero when the held-out loss does not beat the unigram baseline: it must beat it even short.
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_chain"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == SHORTER["train.steps"]
    assert math.isfinite(rows[-1]["eval_perplexity"]) and rows[-1]["eval_tokens"] > 0
    assert (run / "loss_curve.png").stat().st_size > 1000 and (run / "needle.png").exists()
    report = (run / "report.md").read_text()
    assert report.strip() in done.stdout  # printed as well as written
    heldout, baseline = (float(re.search(rf"\| {name} loss / perplexity \| ([\d.]+) / ", report)[1])
                         for name in ("held-out", "unigram baseline"))
    assert math.isfinite(heldout) and heldout < baseline
    for section in ("Greedy completions:", "| humaneval[:20] |", "| needle |", "| fuzzy_dedup |", "| quality |"):
        assert section in report, section
