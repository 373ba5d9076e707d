"""The benchmark scripts stay runnable (a quick shape; no assertion on timing)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> str:
    """The script's stdout after a successful run on CPU."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_forward_throughput_quick_run_prints_its_table():
    out = run_benchmark("forward_throughput.py", "--quick")
    assert "torch Llama fp32 (baseline)" in out and "ours bf16, hidden states" in out


def test_decode_benchmark_quick_run_prints_its_table_and_matches_transformers():
    out = run_benchmark("decode.py", "--quick")
    assert "| transformers generate fp32 (baseline) |" in out
    fp32_row = next(line for line in out.splitlines() if "| ours (jax, static KV cache, float32) |" in line)
    assert fp32_row.endswith("| 16/16 tokens before a difference |")  # 2 rows x 8 new tokens, all equal
    assert "bf16 weights" in out and "int8 weights" in out
    gpu_form = run_benchmark("decode.py", "--quick", "--no-torch", "--dtype", "bfloat16", "--mesh", "data=2,tensor=2")
    assert "ours (jax, static KV cache, bfloat16)" in gpu_form
    mesh_row = next(line for line in gpu_form.splitlines()
                    if "| ours on mesh data=2,tensor=2 (4 CPU devices) |" in line)
    assert mesh_row.endswith("| 16/16 tokens before a difference |")  # the same tokens as on one device


@pytest.mark.slow
def test_serving_benchmark_quick_run_prints_its_table_and_checks_every_request():
    out = run_benchmark("serving.py", "--quick")
    assert "| static batching (baseline) |" in out and "| continuous batching (ours) |" in out
    assert "equal to the same request run alone: 24/24 requests" in out


@pytest.mark.slow
def test_eval_throughput_quick_run_agrees_with_lm_eval():
    out = run_benchmark("eval_throughput.py", "--quick")
    assert "| lm-eval 0.4 HF backend, batch 16 (baseline) |" in out and "same predictions: 8/8" in out
