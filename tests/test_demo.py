"""`make demo`'s script runs end to end (in a subprocess with a timeout, as a user would run it)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_foundation_demo_runs_and_reports(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "foundation_demo.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("reloaded logits bit-exact: True") == 2
    assert "trained on (assistant turns)" in done.stdout
    assert (tmp_path / "llama" / "tokenizer.json").exists()
