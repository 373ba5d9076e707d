"""The pretraining loop: restore or initialise, step, log, checkpoint, stop cleanly on SIGTERM.

It composes the pure pieces (state, jitted step, checkpointer, data iterator) and owns only what a run needs on
top: the progress bar, the metrics log (JSONL and tensorboard), the interrupt handling and the loss-curve PNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from tqdm import tqdm

from internlm2_jax.config import ModelConfig
from internlm2_jax.parallel import MeshConfig, batch_sharding, make_mesh
from internlm2_jax.train.checkpoint import Checkpointer, provenance
from internlm2_jax.train.init_weights import initial_params
from internlm2_jax.train.metrics import PEAK_FLOPS, mfu
from internlm2_jax.train.objectives import LM, Objective
from internlm2_jax.train.optim import OptimizerConfig, lr_schedule, make_optimizer
from internlm2_jax.train.state import abstract_train_state, init_train_state, model_graphdef, train_state_shardings
from internlm2_jax.train.step import StepConfig, jit_eval_step, jit_train_step, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # rows per step, over all processes
    seq_len: int = 512
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    run_dir: str = "runs/default"
    init_from: str | None = None  # another run's directory: start from its latest state (e.g. 4K -> 32K phase)
    # A model directory or run directory whose weights start this run (fine-tuning): fresh optimizer, step 0;
    # parameters it lacks (LoRA adapters, a new reward head) keep their fresh initialisation.
    init_weights: str | None = None
    peak_flops: str = "auto"  # a key of PEAK_FLOPS, or "auto" from the device kind and compute dtype

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.peak_flops != "auto" and self.peak_flops not in PEAK_FLOPS:
            raise ValueError(f"train.peak_flops must be 'auto' or one of {sorted(PEAK_FLOPS)}")


class DataIterator(Protocol):
    """What the loop needs from data: process-local numpy batches and an exact, JSON-able resume state."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


def peak_flops(name: str, model: ModelConfig) -> float:
    if name != "auto":
        return PEAK_FLOPS[name]
    kind = jax.devices()[0].device_kind.lower()
    for key, marker in (("tpu_v6e", "v6"), ("tpu_v5p", "v5p"), ("tpu_v5e", "v5 lite"), ("tpu_v5e", "v5e"),
                        ("tpu_v4", "v4"), ("h200", "h200"), ("h100", "h100")):
        if marker in kind:
            return PEAK_FLOPS[key]
    return PEAK_FLOPS["cpu_bf16" if model.dtype == "bfloat16" else "cpu_f32"]


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and tensorboard event files, in the run directory.

    Only process 0 writes; the others keep the values in memory so every process returns the same losses.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self._writing = jax.process_index() == 0
        if self._writing:
            from tensorboardX import SummaryWriter

            self._file = open(self.path, "a")
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self._writing:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writing:
            self._file.close()
            self._tb.close()


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Path | None:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    from matplotlib.figure import Figure  # not pyplot: no global backend switch under a notebook

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    return out_path


def window_summary(window: list[dict], count_name: str = "tokens") -> dict[str, float]:
    """One log line for the steps since the last: the loss and the objective's metrics weighted by what they
    average over (tokens or pairs), mean grad norm, last lr, skipped count."""
    counts = [float(m[count_name]) for m in window]
    total = max(sum(counts), 1.0)
    weighted = [k for k in window[-1] if k not in ("grad_norm", "lr", "skipped", count_name)]
    out = {k: sum(float(m[k]) * c for m, c in zip(window, counts, strict=True)) / total for k in weighted}
    return {**out, "grad_norm": sum(float(m["grad_norm"]) for m in window) / len(window),
            "lr": float(window[-1]["lr"]), count_name: sum(counts),
            "skipped": float(sum(bool(m["skipped"]) for m in window))}


@dataclasses.dataclass
class RunResult:
    state: Any
    final_step: int
    losses: dict[int, float]
    interrupted: bool
    run_dir: Path
    eval: dict[str, float] | None = None


def to_global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Process-local rows -> one global array per field (each process contributes its own slice)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def evaluate(eval_step, state, batches: Iterator[dict[str, np.ndarray]], sharding,
             count_name: str = "tokens") -> dict[str, float]:
    """Held-out loss (and perplexity, or the objective's metrics) over all `batches`, weighted by their count."""
    sums: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(eval_step(state, to_global_batch(batch, sharding)))
        for key, value in out.items():
            if key not in ("loss", "perplexity"):
                sums[key] = sums.get(key, 0.0) + float(value)
    count = sums.pop(count_name, 0.0)
    loss = sums.pop("loss_sum", 0.0) / max(count, 1.0)
    result = {"eval_loss": loss, f"eval_{count_name}": count}
    if count_name == "tokens":
        result["eval_perplexity"] = math.exp(min(loss, 700.0))
    result.update({f"eval_{key}": value / max(count, 1.0) for key, value in sums.items()})
    return result


def train(model: ModelConfig, optimizer: OptimizerConfig, step_cfg: StepConfig, mesh_cfg: MeshConfig,
          cfg: TrainConfig, data: DataIterator, *, metadata: dict[str, Any],
          eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None,
          progress: bool = True, objective: Objective = LM) -> RunResult:
    """Runs (or resumes) training of `objective` (pretraining, SFT, reward model, DPO) to `cfg.steps`; returns the
    final state and the logged losses.

    `metadata` is what the checkpoints should record beyond the provenance added here (schema, git commit,
    package versions, model config, seed): the resolved experiment config, tokenizer and data-manifest hashes.
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metadata = provenance(model=dataclasses.asdict(model), optimizer=dataclasses.asdict(optimizer), seed=cfg.seed,
                          objective=objective.name, model_class=objective.model_class.__name__, **metadata)
    mesh = make_mesh(mesh_cfg)
    tx = make_optimizer(optimizer)
    classes = dict(model_class=objective.model_class, trainable=optimizer.trainable)
    graphdef, _ = model_graphdef(model, objective.model_class)
    shardings = train_state_shardings(model, tx, mesh, **classes)
    checkpointer = Checkpointer(run_dir / "checkpoints", save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)

    abstract = abstract_train_state(model, tx, mesh, **classes)
    restored = checkpointer.restore_latest(abstract, model)
    if restored is not None:
        start, state, data_state, _ = restored
        data.set_state(data_state)
    elif cfg.init_from:
        # A new phase: weights, optimizer moments and step count carry over; the data (a new mixture) starts fresh.
        source = Checkpointer(Path(cfg.init_from) / "checkpoints")
        found = source.restore_latest(abstract, model)
        source.close()
        if found is None:
            raise FileNotFoundError(f"train.init_from={cfg.init_from}: no checkpoint found there")
        start, state = found[0], found[1]
    else:
        params = None
        if cfg.init_weights:
            params = initial_params(cfg.init_weights, model, objective.model_class, mesh, seed=cfg.seed)
        start, state = 0, init_train_state(model, tx, mesh, seed=cfg.seed, params=params, **classes)

    step_fn = jit_train_step(make_train_step(graphdef, tx, lr_schedule(optimizer), step_cfg, objective=objective,
                                             trainable=optimizer.trainable), shardings, mesh)
    sharding = batch_sharding(mesh)
    log = MetricsLog(run_dir)
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    peak = peak_flops(cfg.peak_flops, model)
    losses: dict[int, float] = {}
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=not progress or jax.process_index() != 0)
    window_start, window, step = time.perf_counter(), [], start
    try:
        while step < cfg.steps and not stop["requested"]:
            state, metrics = step_fn(state, to_global_batch(next(data), sharding))
            window.append(metrics)  # device arrays: reading them now would stall the asynchronous dispatch
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                values = window_summary(jax.device_get(window), objective.count_name)
                elapsed = time.perf_counter() - window_start
                values["tokens_per_s"] = len(window) * cfg.batch_size * cfg.seq_len / elapsed  # row slots
                values["step_time_s"] = elapsed / len(window)
                values["mfu"] = mfu(model, cfg.seq_len, values["tokens_per_s"], peak, jax.device_count())
                losses[step] = values["loss"]
                log.write(step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}",
                                **({"acc": f"{values['accuracy']:.2f}"} if "accuracy" in values else {}))
                window_start, window = time.perf_counter(), []
            bar.update(1)
            if checkpointer.manager.should_save(step):
                checkpointer.save(step, state, data_state=data.get_state(), metadata=metadata)
        # At the end, or on SIGTERM: always leave a checkpoint of the last step.
        if step not in checkpointer.steps():
            checkpointer.save(step, state, data_state=data.get_state(), metadata=metadata, force=True)
        result = RunResult(state=state, final_step=step, losses=losses, interrupted=stop["requested"],
                           run_dir=run_dir)
        if eval_batches is not None and not stop["requested"]:
            eval_fn = jit_eval_step(make_eval_step(graphdef, step_cfg, objective=objective), shardings, mesh)
            result.eval = evaluate(eval_fn, state, eval_batches(), sharding, objective.count_name)
            log.write(step, result.eval)
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
        checkpointer.close()
        log.close()
    if jax.process_index() == 0:
        plot_loss_curve(log.path, run_dir / "loss_curve.png")
    return result
