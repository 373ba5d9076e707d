"""The train benchmark scripts stay runnable: the CPU throughput table (slow) and the GPU script's CPU dry run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.mark.slow
def test_train_throughput_quick_run_prints_its_table():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--quick"],
                          capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("torch Llama fp32 (baseline)", "torch Llama bf16 autocast", "ours fp32", "ours bf16"):
        assert row in done.stdout
    assert "MFU" in done.stdout


def test_train_gpu_dry_run_steps_a_tiny_scanned_model_on_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_gpu.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s" in done.stdout and "MFU" in done.stdout and "dry run" in done.stdout
