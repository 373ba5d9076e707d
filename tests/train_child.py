"""A tiny pretraining run in its own process, for the tests and benchmarks that start, kill and compare runs.

    python tests/train_child.py SPEC.json

SPEC (JSON) says where the data is (`prepare_data` writes it: a small trained tokenizer and a JSONL manifest), the run
directory, steps, checkpoint/log intervals, the mesh, how many local CPU devices, and optionally the
`jax.distributed` coordinator, process count and id. The run is `internlm2_jax.train.loop.train` with the "tiny"
preset on the real data pipeline (`PretrainDataIterator`, each process reading its own records). The result (losses
by step, final step, whether it was interrupted) goes to SPEC["out"] as JSON.

`simulate_processes: n` (one process only) reads the data as n processes would and concatenates their batches in
process order: the global batch an n-process run sees, fed from one process (the multi-host reference).
`step_delay_s` sleeps before each batch, so that a watcher can kill the run at a chosen step. `compile_cache` names a
persistent JAX compilation cache directory, so that restarts of the same run skip XLA compilation.

The rest of the module is for the parent side (no JAX imported): start children with a spec, wait for them with a
hard timeout, read their metrics, and signal a run at a given step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEQ_LEN = 64  # the tiny preset's max_position_embeddings
VOCAB = 512  # the tiny preset's vocab_size


def prepare_data(directory: str | Path, *, max_bytes: int = 200_000) -> Path:
    """Trains a 512-piece tokenizer on some stdlib code and writes two JSONL shards and their manifest."""
    from internlm2_jax.data import stdlib_corpus, write_jsonl_shards, write_manifest
    from internlm2_jax.tokenizer import train_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    docs = stdlib_corpus(max_bytes=max_bytes)
    tokenizer = train_tokenizer([d.text for d in docs], VOCAB, output_path=directory / "tokenizer.model")
    shards = write_jsonl_shards(docs, directory, name="code", source="stdlib", num_shards=2, tokenizer=tokenizer)
    write_manifest(shards, directory)
    return directory


class Concatenated:
    """The batches of several per-process iterators side by side (rows of process 0 first), one resume state."""

    def __init__(self, parts):
        self.parts = parts

    def __next__(self):
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {"parts": [p.get_state() for p in self.parts]}

    def set_state(self, state):
        for p, s in zip(self.parts, state["parts"], strict=True):
            p.set_state(s)


class Delayed:
    """Sleeps before each batch: slows the run down enough for an outside watcher to act at a given step."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def __next__(self):
        time.sleep(self.delay_s)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def start_jax(spec: dict):
    """Configures JAX for a child run (CPU devices, compilation cache, `jax.distributed`) before anything touches a
    device; returns the module."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", int(spec.get("devices", 8)))
    if spec.get("compile_cache"):
        jax.config.update("jax_compilation_cache_dir", spec["compile_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if int(spec.get("num_processes", 1)) > 1:
        jax.distributed.initialize(coordinator_address=spec["coordinator"], num_processes=int(spec["num_processes"]),
                                   process_id=int(spec["process_id"]), initialization_timeout=60)
    return jax


def run_child(main) -> None:
    """`main(sys.argv[1])`, exiting at once on an error: the interpreter's normal exit would wait for the other
    processes at jax.distributed's shutdown barrier, and they may be waiting for this one."""
    try:
        main(sys.argv[1])
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    jax = start_jax(spec)
    num_processes = int(spec.get("num_processes", 1))

    from internlm2_jax.config import preset
    from internlm2_jax.data import PretrainDataIterator, load_manifest
    from internlm2_jax.parallel import MeshConfig
    from internlm2_jax.tokenizer import Tokenizer
    from internlm2_jax.train import OptimizerConfig, StepConfig
    from internlm2_jax.train.loop import TrainConfig, train

    data_dir = Path(spec["data_dir"])
    tokenizer = Tokenizer.from_file(data_dir / "tokenizer.model")
    manifest = load_manifest(data_dir / "manifest.json")
    batch_size = int(spec.get("batch_size", 8))
    readers = int(spec.get("simulate_processes", 1)) if num_processes == 1 else num_processes
    indices = range(readers) if num_processes == 1 else [jax.process_index()]
    parts = [PretrainDataIterator(manifest, tokenizer, SEQ_LEN, batch_size // readers, seed=0, process_index=i,
                                  process_count=readers) for i in indices]
    data = parts[0] if len(parts) == 1 else Concatenated(parts)
    if spec.get("step_delay_s"):
        data = Delayed(data, float(spec["step_delay_s"]))

    steps = int(spec["steps"])
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=SEQ_LEN, seed=0,
                      log_every=int(spec.get("log_every", 1)), checkpoint_every=int(spec.get("checkpoint_every", 1000)),
                      keep_checkpoints=3, run_dir=spec["run_dir"])
    optimizer = OptimizerConfig(peak_lr=1e-2, warmup_steps=2, total_steps=100)
    mesh = MeshConfig(*spec.get("mesh", [2, 4, 1, 1]))
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
          f"{jax.device_count()} devices; training to step {steps}", flush=True)
    result = train(preset("tiny"), optimizer, StepConfig(), mesh, cfg, data,
                   metadata={"tokenizer_sha256": tokenizer.sha256, "manifest_hash": manifest.hash}, progress=False)
    out = {"process_index": jax.process_index(), "final_step": result.final_step, "interrupted": result.interrupted,
           "losses": {str(k): v for k, v in sorted(result.losses.items())}}
    Path(spec["out"]).write_text(json.dumps(out))
    print(f"process {jax.process_index()}: done at step {result.final_step} (interrupted={result.interrupted})",
          flush=True)
    if num_processes > 1:
        jax.distributed.shutdown()


# ---- the parent side ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(spec: dict, workdir: str | Path, name: str, script: str | Path = __file__) -> subprocess.Popen:
    """Starts `python SCRIPT SPEC.json` (this file by default; `rl_child.py` too) on `spec` (written to
    WORKDIR/NAME.json); its output goes to WORKDIR/NAME.log."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the child sets its own device count
    log = open(workdir / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=workdir, env=env, start_new_session=True)
    proc.log_path = workdir / f"{name}.log"  # type: ignore[attr-defined]
    log.close()
    return proc


def log_tail(proc: subprocess.Popen, chars: int = 3000) -> str:
    return f"--- {proc.log_path} ---\n" + proc.log_path.read_text(errors="replace")[-chars:]  # type: ignore[attr-defined]


def kill_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_all(procs, timeout_s: float) -> list[int]:
    """Waits for every process. If one fails, the others are killed (a peer of a dead process would wait for it in
    a collective); past `timeout_s` (from now) all are killed and TimeoutError shows their logs."""
    deadline = time.monotonic() + timeout_s
    while None in (codes := [p.poll() for p in procs]):
        if any(codes):
            kill_all(procs)
            break
        if time.monotonic() > deadline:
            kill_all(procs)
            raise TimeoutError(f"a child run took longer than {timeout_s:.0f} s and was killed\n"
                               + "\n".join(log_tail(p) for p in procs))
        time.sleep(0.05)
    return [p.returncode for p in procs]


def read_metrics(run_dir: str | Path, offset: int = 0, key: str = "loss") -> list[dict]:
    """The metrics.jsonl rows that hold `key`, from byte `offset` on (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    rows = []
    for line in data.split(b"\n"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if key in r]


def metrics_size(run_dir: str | Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return path.stat().st_size if path.exists() else 0


def last_losses(run_dir: str | Path) -> dict[int, float]:
    """Each step's last logged loss: a resumed run logs again the steps after its checkpoint."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def complete_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps with a finished checkpoint (orbax writes into a temporary folder and renames it when complete)."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def run_and_signal(spec: dict, workdir: str | Path, name: str, *, at_step: int, sig: int, jitter_s: float = 0.0,
                   need_checkpoint: bool = True, timeout_s: float = 120.0, script: str | Path = __file__,
                   key: str = "loss") -> dict:
    """Runs `spec` (with `script`) and sends `sig` once it has logged `at_step` (and, with `need_checkpoint`, finished
    a checkpoint), after `jitter_s` more seconds. Returns the exit code, the steps this attempt logged (their metric
    `key`) and when it was signalled."""
    run_dir = spec["run_dir"]
    offset = metrics_size(run_dir)
    proc = start(spec, workdir, name, script)
    deadline = time.monotonic() + timeout_s
    signalled_after = None
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not reach step {at_step} within {timeout_s:.0f} s\n" + log_tail(proc))
            steps = [r["step"] for r in read_metrics(run_dir, offset, key)]
            if steps and steps[-1] >= at_step and (not need_checkpoint or complete_checkpoints(run_dir)):
                time.sleep(jitter_s)
                signalled_after = [r["step"] for r in read_metrics(run_dir, offset, key)][-1]
                proc.send_signal(sig)
                break
            time.sleep(0.005)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (subprocess.TimeoutExpired, TimeoutError):
        kill_all([proc])
        raise
    rows = read_metrics(run_dir, offset, key)
    return {"returncode": proc.returncode, "signalled_after": signalled_after,
            "first_step": rows[0]["step"] if rows else None, "last_step": rows[-1]["step"] if rows else None,
            "losses": {r["step"]: r[key] for r in rows}, "proc": proc}


if __name__ == "__main__":
    run_child(main)
