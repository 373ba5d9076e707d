"""The benchmark scripts stay runnable (a quick shape; no assertion on timing)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_forward_throughput_quick_run_prints_its_table():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "forward_throughput.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch Llama fp32 (baseline)" in done.stdout and "ours bf16, hidden states" in done.stdout


def test_decode_benchmark_quick_run_prints_its_table_and_matches_transformers():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| transformers generate fp32 (baseline) |" in done.stdout and "| 2/2 rows |" in done.stdout
    assert "bf16 weights" in done.stdout
    gpu_form = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick", "--no-torch",
                               "--dtype", "bfloat16"], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert gpu_form.returncode == 0, gpu_form.stderr[-3000:]
    assert "ours (jax, static KV cache, bfloat16)" in gpu_form.stdout


@pytest.mark.slow
def test_serving_benchmark_quick_run_prints_its_table_and_checks_every_request():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| static batching (baseline) |" in done.stdout and "| continuous batching (ours) |" in done.stdout
    assert "equal to the same request run alone: 24/24 requests" in done.stdout


@pytest.mark.slow
def test_eval_throughput_quick_run_agrees_with_lm_eval():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_throughput.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| lm-eval 0.4 HF backend, batch 16 (baseline) |" in done.stdout and "same predictions: 8/8" in done.stdout
