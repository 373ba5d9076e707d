"""Remote storage: a run whose run directory, data manifest, shards and tokenizer all live in a bucket trains, stops,
resumes from its checkpoint in the bucket, evaluates, and exports to a model directory in the bucket that loads back
and evaluates, with nothing landing on local disk under a `gs:` or bucket-named folder. The bucket is
`remote_testing.fake_gcs`: in memory, reached by epath through fsspec and by orbax's tensorstore through the GCS
JSON API, so the real clients of both run."""

import json

import jax
import numpy as np
import pytest
from etils import epath

from internlm2_jax.artifacts import load_run
from internlm2_jax.config import preset
from internlm2_jax.convert import load_pretrained
from internlm2_jax.convert.__main__ import main as convert_main
from internlm2_jax.data import SFTDataIterator, stdlib_corpus, write_jsonl_shards, write_manifest
from internlm2_jax.eval.__main__ import main as eval_main
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.tokenizer import Tokenizer
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig
from remote_testing import fake_gcs

BUCKET = "remote-test-bucket"
ROOT = f"gs://{BUCKET}"


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """The fake bucket, with the working directory in tmp_path: a URL folded into a local path would land there."""
    monkeypatch.chdir(tmp_path)
    with fake_gcs(monkeypatch) as store:
        yield store
        assert not store.unhandled  # every request tensorstore made is one the fake implements
    leaked = [str(p) for p in tmp_path.rglob("*") if p.name.startswith("gs:") or BUCKET in p.name]
    assert not leaked, f"local folders for the bucket: {leaked}"


def experiment(vocab_size: int, steps: int) -> Experiment:
    return Experiment(
        name="remote", model=preset("tiny", vocab_size=vocab_size),
        train=TrainConfig(steps=steps, batch_size=8, seq_len=32, log_every=2, checkpoint_every=2, keep_checkpoints=2,
                          run_dir=f"{ROOT}/run"),
        optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=1, total_steps=6),
        data=DataConfig(manifest=f"{ROOT}/data/train/manifest.json",
                        heldout_manifest=f"{ROOT}/data/heldout/manifest.json", tokenizer=f"{ROOT}/data/tokenizer.model",
                        eval_batches=2))


def test_a_run_in_a_bucket_trains_resumes_evaluates_and_exports(bucket, trained):
    for split, size in (("train", 40_000), ("heldout", 8_000)):
        shards = write_jsonl_shards(stdlib_corpus(split, max_bytes=size), f"{ROOT}/data/{split}", name=split,
                                    source="stdlib", num_shards=2)
        write_manifest(shards, f"{ROOT}/data/{split}")
    epath.Path(f"{ROOT}/data/tokenizer.model").write_bytes(trained.model_bytes)

    first = run_training(experiment(trained.vocab_size, steps=4), progress=False)
    assert (first.final_step, str(first.run_dir)) == (4, f"{ROOT}/run")
    second = run_training(experiment(trained.vocab_size, steps=6), progress=False)  # resumes at step 4
    assert second.final_step == 6 and list(second.losses) == [6] and np.isfinite(second.eval["eval_loss"])

    run = epath.Path(f"{ROOT}/run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]  # the second run appended to the first's log
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 6]
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]  # 2 deleted
    assert bucket.names(f"{BUCKET}/run/checkpoints/6/state/ocdbt.process_0/d/")  # arrays, written by tensorstore
    assert json.loads((run / "data_stats.json").read_text())["batches"] == 6  # the data state resumed too
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    _, model, meta = load_run(run)
    assert meta["tokenizer_path"] == f"{ROOT}/data/tokenizer.model"

    assert convert_main([f"{ROOT}/run", f"{ROOT}/export", "--layout", "llama"]) == 0
    _, exported = load_pretrained(f"{ROOT}/export")
    ids = np.arange(1, 17, dtype=np.int32)[None]
    forward = jax.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(forward(exported, ids)), np.asarray(forward(model, ids)))
    assert Tokenizer.from_pretrained(f"{ROOT}/export").sha256 == trained.sha256

    (epath.Path(f"{ROOT}/suite") / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": ["yes", "no"], "answer": i % 2}) + "\n"
        for i, q in enumerate(["is it red", "is it big"])))
    (epath.Path(f"{ROOT}/suite") / "suite.json").write_text(json.dumps({"tasks": [
        {"name": "mc", "reader": {"path": "mc.jsonl"}}]}))  # relative to the suite: in the bucket
    assert eval_main(["--checkpoint", f"{ROOT}/export", "--suite", f"{ROOT}/suite/suite.json", "--no-progress"]) == 0
    record = json.loads(epath.Path(f"{ROOT}/export/eval/results.json").read_text())
    assert record["checkpoint"] == f"{ROOT}/export" and [r["task"] for r in record["results"]] == ["mc"]


def test_a_host_reads_only_the_records_it_draws(bucket, trained):
    path = epath.Path(f"{ROOT}/sft.jsonl")
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                            for i in range(2000)))
    size = path.stat().length
    iterator = SFTDataIterator(path, trained, 64, 2, process_index=1, process_count=4)
    assert bucket.bytes_read == size  # the index: one streaming pass, nothing kept
    bucket.bytes_read = 0
    for _ in range(3):
        next(iterator)
    assert 0 < bucket.bytes_read < size / 50  # a few records of one process's quarter, one ranged read each
