"""The launcher end to end: resolved config and memory before step 0, a real run of an experiment file, export of
its checkpoint to a model directory, the long-context continuation, and TPU compilation without a TPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from internlm2_jax.config import preset
from internlm2_jax.convert import load_pretrained
from internlm2_jax.artifacts import SCHEMA_VERSION, load_run

ROOT = Path(__file__).resolve().parents[1]


def launch(*args, cwd, timeout=600, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               **(env_extra or {}))
    done = subprocess.run([sys.executable, "-m", "internlm2_jax.launch", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    return done


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """experiments/pretrain_tiny.py for 12 steps through the launcher, with its own data preparation."""
    work = tmp_path_factory.mktemp("launch")
    done = launch(ROOT / "experiments" / "pretrain_tiny.py", "--set", "train.steps=12", "--set", "mesh.data=2",
                  "--set", "optimizer.total_steps=12", "--set", "train.checkpoint_every=5", cwd=work)
    assert done.returncode == 0, done.stderr[-4000:]
    return work / "runs" / "pretrain_tiny", done.stdout


def test_launcher_prints_config_params_and_memory_then_trains(tiny_run):
    run_dir, stdout = tiny_run
    config = json.loads(stdout[: stdout.index("\nparameters:")])
    assert config["train"]["steps"] == 12 and config["mesh"]["fsdp"] == -1  # all 8 devices
    params = preset("tiny", vocab_size=1024).num_params()
    assert f"parameters: {params:,}" in stdout and "temporaries_gib" in stdout and "held-out loss" in stdout
    assert stdout.count("compiled train step for 8 cpu devices") == 1  # once, by the loop, before step 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 12]
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert rows[-1]["eval_tokens"] > 0 and np.isfinite(rows[-1]["eval_perplexity"])
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").iterdir())
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["documents"] > 0


def test_checkpoint_records_provenance_and_exports_to_a_model_directory(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    cfg, model, meta = load_run(run_dir)
    assert meta["schema_version"] == SCHEMA_VERSION and len(meta["tokenizer_sha256"]) == 64 and meta["manifest_hash"]
    assert meta["packages"]["jax"] == jax.__version__ and meta["experiment"]["name"] == "pretrain_tiny"
    assert meta["seed"] == 0 and "git_commit" in meta
    done = subprocess.run([sys.executable, "-m", "internlm2_jax.convert", str(run_dir), str(tmp_path / "hf"),
                           "--layout", "llama"], capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    exported_cfg, exported = load_pretrained(tmp_path / "hf")
    ids = np.arange(1, 17, dtype=np.int32)[None]
    forward = jax.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(forward(exported, ids)), np.asarray(forward(model, ids)))
    generated = subprocess.run([sys.executable, "-m", "internlm2_jax.generate", str(run_dir), "--prompt", "def",
                                "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300, check=False,
                               env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert generated.returncode == 0 and "### 'def' (" in generated.stdout, generated.stderr[-3000:]


def test_long_context_continuation_carries_weights_and_optimizer_state(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    done = launch(ROOT / "experiments" / "pretrain_tiny.py", "--set", f"train.init_from={run_dir}",
                  "--set", f"train.run_dir={tmp_path / 'phase2'}", "--set", "train.steps=14",
                  "--set", "optimizer.total_steps=14", "--set", "train.seq_len=128",
                  "--set", "model.rope_theta=1000000", "--set", "train.log_every=1",
                  "--set", f"data.tokenizer={run_dir / 'data' / 'tokenizer.model'}",
                  "--set", f"data.manifest={run_dir / 'data' / 'heldout' / 'manifest.json'}",
                  "--set", "data.heldout_manifest=", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "phase2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [13, 14]  # continued from step 12, not from 0
    _, _, meta = load_run(tmp_path / "phase2")
    assert meta["model"]["rope_theta"] == 1e6 and meta["experiment"]["train"]["seq_len"] == 128


def test_a_checkpoint_of_another_model_shape_is_refused(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    done = launch(ROOT / "experiments" / "pretrain_tiny.py", "--set", f"train.init_from={run_dir}",
                  "--set", f"train.run_dir={tmp_path / 'other'}", "--set", "model.hidden_size=96",
                  "--set", f"data.tokenizer={run_dir / 'data' / 'tokenizer.model'}",
                  "--set", f"data.manifest={run_dir / 'data' / 'train' / 'manifest.json'}",
                  "--set", "data.heldout_manifest=", cwd=tmp_path)
    assert done.returncode != 0
    assert "hidden_size: checkpoint 64 vs run 96" in done.stderr


def test_bad_override_is_a_clear_error(tmp_path):
    done = launch(ROOT / "experiments" / "pretrain_tiny.py", "--set", "train.steps=ten", "--compile-only",
                  cwd=tmp_path, timeout=120)
    assert done.returncode != 0 and "train.steps: expected an integer, got 'ten'" in done.stderr


def test_compile_only_for_a_tpu_topology_reports_per_device_memory(tmp_path):
    """The real 1.8B train step (scanned layers, 4K context) compiled by the TPU compiler for 4 v5e chips."""
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) provides the TPU compiler")
    done = launch(ROOT / "experiments" / "internlm2_1_8b_pretrain.py", "--compile-only", "--topology", "v5e:2x2",
                  "--set", "train.batch_size=8", cwd=tmp_path, timeout=900,
                  env_extra={"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "TPU v5e:2x2 (4 chips" in done.stdout and "parameters: 1,889,110,016" in done.stdout
    total = float(done.stdout.split("total_gib")[1].split()[0])
    assert 5 < total < 16 and "fits             True" in done.stdout


def test_full_parameter_dpo_compiles_and_trains_through_the_launcher(tmp_path):
    """Full fine-tuning DPO brings its reference log-probs with every batch: the `--compile-only` shapes and the
    run's own compilation (once, on the first batch) both see them."""
    experiment = ROOT / "tests" / "experiments_testing" / "simpo_experiment.py"
    common = ("--set", "objective=dpo", "--set", f"train.run_dir={tmp_path / 'run'}",
              "--set", f"data.tokenizer={tmp_path / 'tokenizer.model'}")
    compiled = launch(experiment, *common, "--compile-only", cwd=tmp_path, timeout=300)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert compiled.stdout.count("compiled train step for") == 1 and "temporaries_gib" in compiled.stdout
    done = launch(experiment, *common, "--set", "train.steps=2", "--set", "optimizer.total_steps=2",
                  "--set", f"train.compile_cache={tmp_path / 'jax_cache'}", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled train step for") == 1  # compiled once, by the loop
    assert any((tmp_path / "jax_cache").iterdir())  # kept for a restart
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])
    assert load_run(tmp_path / "run")[2]["objective"] == "dpo"
