"""The training loop: restore or initialise, step, log, evaluate, checkpoint, stop cleanly on SIGTERM.

It composes the pure pieces (state, jitted step, checkpointer, data iterator) and owns only what a run needs on
top: the progress bar, the metrics log (JSONL and tensorboard), the interrupt handling and the loss-curve PNG. The
run directory is an `etils.epath` path: local, or a bucket URL (`gs://...`) that everything is written to in place.

A stop asked for by SIGTERM is agreed by all processes at the same step (jax's preemption sync point on several
hosts, whose notifier owns SIGTERM there), so every host saves the same step and none waits in a collective alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from internlm2_jax.config import ModelConfig
from internlm2_jax.parallel import MeshConfig, batch_shardings, make_mesh
from internlm2_jax.parallel.sequence_layout import CONTIGUOUS, SequenceLayout, sequence_layout
from internlm2_jax.parallel.topology import memory_report, print_memory_report
from internlm2_jax.artifacts import provenance
from internlm2_jax.paths import is_url, open_append
from internlm2_jax.train.checkpoint import Checkpointer
from internlm2_jax.train.init_weights import initial_params
from internlm2_jax.train.layout_checks import check_layout
from internlm2_jax.train.metrics import PEAK_FLOPS, mfu, peak_flops_key
from internlm2_jax.train.objectives import LM, Objective
from internlm2_jax.train.optim import OptimizerConfig, lr_schedules, make_optimizer
from internlm2_jax.train.state import (abstract_train_state, init_train_state, model_graphdef, split_trainable,
                                       train_state_shardings)
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
    eval_every: int = 0  # held-out evaluation every this many steps (0: only at the end)
    compile_cache: str | None = None  # a persistent XLA compilation cache directory: restarts skip compiling
    # Fraction of the parameters a multi-device mesh may leave fully replicated on every chip before the run is
    # refused (a missing rule or a dimension that does not divide costs memory on every chip, silently).
    max_replicated_fraction: float = 0.05

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if not 0.0 <= self.max_replicated_fraction <= 1.0:
            raise ValueError(f"train.max_replicated_fraction must be in [0, 1], got {self.max_replicated_fraction}")
        if self.peak_flops != "auto" and self.peak_flops not in PEAK_FLOPS:
            raise ValueError(f"train.peak_flops must be 'auto' or one of {sorted(PEAK_FLOPS)}")


class DataIterator(Protocol):
    """What the loop needs from data: process-local numpy batches and an exact, JSON-able resume state."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


def peak_flops(name: str, model: ModelConfig) -> float | None:
    """The per-chip peak MFU is measured against: named, or from the device kind (None: unknown accelerator)."""
    if name != "auto":
        return PEAK_FLOPS[name]
    device = jax.devices()[0]
    key = peak_flops_key(device.platform, device.device_kind, model.dtype)
    return None if key is None else PEAK_FLOPS[key]


class _EventFilesThroughEpath:
    """tensorboardX's writer of event files at a URL: through epath, like every other file of the run (its own
    gs:// writer needs google-cloud-storage and goes around epath)."""

    def open(self, path: str):
        return open_append(path)

    def directory_check(self, path: str) -> None:
        pass  # buckets have no directories


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and tensorboard event files, in the run directory (in a
    bucket each flush rewrites the object: `paths.open_append`).

    Only process 0 writes; the others keep the values in memory so every process returns the same losses.
    """

    def __init__(self, run_dir: epath.Path):
        self.path = run_dir / "metrics.jsonl"
        self._writing = jax.process_index() == 0
        if self._writing:
            from tensorboardX import SummaryWriter
            from tensorboardX.record_writer import register_writer_factory

            if is_url(run_dir):
                register_writer_factory(str(run_dir).split("://")[0], _EventFilesThroughEpath())
            self._file = open_append(self.path)
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self._writing:
            return
        self._file.write((json.dumps({"step": step, **values}) + "\n").encode())
        self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writing:
            self._file.close()
            self._tb.close()


def plot_loss_curve(metrics_path: epath.Path, out_path: epath.Path) -> epath.Path | None:
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
    with out_path.open("wb") as f:  # through epath: the run directory may be a bucket
        fig.savefig(f, format="png", dpi=120)
    return out_path


def window_summary(window: list[dict], count_name: str = "tokens") -> dict[str, float]:
    """One log line for the steps since the last: the loss and the objective's metrics weighted by what they
    average over (tokens or pairs), mean grad norm, last lr, skipped count, real tokens.

    Skipped (non-finite) steps are counted but left out of the averages: one bad batch must not turn the whole
    window's loss into NaN. A window of only skipped steps reports NaN, which is what happened."""
    kept = [m for m in window if not bool(m["skipped"])]
    counts = [float(m[count_name]) for m in kept]
    total = max(sum(counts), 1.0)
    rates = [k for k in window[-1] if k == "lr" or k.startswith("lr/")]
    weighted = [k for k in window[-1] if k not in ("grad_norm", "skipped", "real_tokens", count_name, *rates)]
    out = {k: (sum(float(m[k]) * c for m, c in zip(kept, counts, strict=True)) / total if kept else math.nan)
           for k in weighted}
    grad_norms = [float(m["grad_norm"]) for m in kept]
    return {**out, "grad_norm": sum(grad_norms) / len(grad_norms) if kept else math.nan,
            **{k: float(window[-1][k]) for k in rates}, count_name: sum(counts),
            "skipped": float(len(window) - len(kept)), "real_tokens": float(sum(m["real_tokens"] for m in window))}


class StopRequest:
    """SIGTERM asks the run to stop after the step in progress; `stop_at(step)` is the agreed answer.

    On one process a Python handler records the signal. On several, jax's preemption sync manager owns SIGTERM
    (a Python handler would replace its notifier): when any host is signalled, all of them reach the same sync
    step, so they save the same checkpoint and leave together.
    """

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.requested = False
        if not self.multi:
            self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

    def stop_at(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if not self.multi:
            signal.signal(signal.SIGTERM, self.previous)


@dataclasses.dataclass
class RunResult:
    state: Any
    final_step: int
    losses: dict[int, float]
    interrupted: bool
    run_dir: epath.Path
    eval: dict[str, float] | None = None


def to_global_batch(batch: dict[str, np.ndarray | jax.Array], mesh,
                    layout: SequenceLayout = CONTIGUOUS) -> dict[str, jax.Array]:
    """Process-local rows -> one global array per field on `mesh` (each process contributes its own slice), their
    tokens in `layout` over mesh.sequence; arrays that are already global (made on the mesh, e.g. rollouts) are only
    laid out and placed on the batch shardings."""
    batch = layout.apply(batch)
    shardings = batch_shardings(mesh, batch)
    return {k: jax.device_put(v, shardings[k]) if isinstance(v, jax.Array)
            else jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def data_state_of(data: DataIterator | None) -> dict:
    return {} if data is None else data.get_state()


def evaluate(eval_step, state, batches: Iterator[dict[str, np.ndarray]], mesh,
             count_name: str = "tokens", layout: SequenceLayout = CONTIGUOUS) -> dict[str, float]:
    """Held-out loss (and perplexity, or the objective's metrics) over all `batches`, weighted by their count."""
    sums: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(eval_step(state, to_global_batch(batch, mesh, layout)))
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


@dataclasses.dataclass
class TrainProgram:
    """What a run's step is built from, made once: the launcher's `--compile-only` and the loop share it."""

    mesh: Any
    tx: Any
    graphdef: Any
    shardings: Any
    abstract_state: Any
    step: Callable  # batch fields -> jax.jit of the pure train step (state donated)

    def compile(self, batch):
        """The step compiled for `batch` (arrays or ShapeDtypeStructs with the batch shardings)."""
        with jax.set_mesh(self.mesh):
            return self.step(tuple(sorted(batch))).lower(self.abstract_state, batch).compile()


def state_classes(optimizer: OptimizerConfig, objective: Objective) -> dict[str, Any]:
    """What decides the state's tree beyond the model config: the model class, the trained set, the extra state."""
    extra = objective.init_extra() if objective.init_extra is not None else {}
    return dict(model_class=objective.model_class, trainable=optimizer.trained, extra=extra)


def build_program(model: ModelConfig, optimizer: OptimizerConfig, step_cfg: StepConfig, mesh,
                  objective: Objective = LM) -> TrainProgram:
    tx = make_optimizer(optimizer)
    classes = state_classes(optimizer, objective)
    graphdef, _ = model_graphdef(model, objective.model_class)
    shardings = train_state_shardings(model, tx, mesh, **classes)
    step = make_train_step(graphdef, tx, lr_schedules(optimizer), step_cfg, objective=objective,
                           trainable=optimizer.trained)
    return TrainProgram(mesh, tx, graphdef, shardings, abstract_train_state(model, tx, mesh, **classes),
                        jit_train_step(step, shardings, mesh).jitted)


def step_flops_per_token(model: ModelConfig, optimizer: OptimizerConfig, objective: Objective, abstract_params,
                         seq_len: int) -> float:
    """The FLOPs per real token of the step as it runs: frozen weights get no weight gradients."""
    trainable = None
    if optimizer.trained:
        trainable = sum(math.prod(v.shape) for v in jax.tree.leaves(split_trainable(abstract_params,
                                                                                     optimizer.trained)[0]))
    return objective.flops_per_token(model, seq_len, trainable_params=trainable)


def train(model: ModelConfig, optimizer: OptimizerConfig, step_cfg: StepConfig, mesh_cfg: MeshConfig,
          cfg: TrainConfig, data: DataIterator | None, *, metadata: dict[str, Any],
          eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None,
          progress: bool = True, objective: Objective = LM,
          batch_source: Callable[[Any, int], dict] | None = None) -> RunResult:
    """Runs (or resumes) training of `objective` (pretraining, SFT, reward model, DPO) to `cfg.steps`; returns the
    final state and the logged losses.

    Batches come from `data` (an iterator whose state is checkpointed), or from `batch_source(state, step)` for
    on-policy data made from the current state (rollouts): it must depend only on the state and the step, which
    the checkpoint restores, so a resumed run sees the same batches.

    `metadata` is what the checkpoints should record beyond the provenance added here (schema, git commit,
    package versions, model config, seed): the resolved experiment config, tokenizer and data-manifest hashes.
    The step is compiled once, on the first batch (its per-device memory is printed before step 0).
    """
    if (data is None) == (batch_source is None):
        raise ValueError("train() takes batches from exactly one of `data` and `batch_source`")
    run_dir = epath.Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metadata = provenance(model=dataclasses.asdict(model), optimizer=dataclasses.asdict(optimizer), seed=cfg.seed,
                          objective=objective.name, model_class=objective.model_class.__name__, **metadata)
    if cfg.compile_cache:
        jax.config.update("jax_compilation_cache_dir", cfg.compile_cache)
    mesh = make_mesh(mesh_cfg)
    program = build_program(model, optimizer, step_cfg, mesh, objective)
    check_layout(model, cfg, step_cfg, mesh, program.abstract_state.params, program.shardings.params)
    classes = state_classes(optimizer, objective)
    checkpointer = Checkpointer(run_dir / "checkpoints", save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)

    restored = checkpointer.restore_latest(program.abstract_state, metadata)
    if restored is not None:
        start, state, data_state, _ = restored
        if data is not None:
            data.set_state(data_state)
    elif cfg.init_from:
        # A new phase: weights, optimizer moments and step count carry over; the data (a new mixture) starts fresh.
        source = Checkpointer(epath.Path(cfg.init_from) / "checkpoints")
        found = source.restore_latest(program.abstract_state, metadata)
        source.close()
        if found is None:
            raise FileNotFoundError(f"train.init_from={cfg.init_from}: no checkpoint found there")
        start, state = found[0], found[1]
    else:
        params = None
        if cfg.init_weights:
            params = initial_params(cfg.init_weights, model, objective.model_class, mesh, seed=cfg.seed)
        start, state = 0, init_train_state(model, program.tx, mesh, seed=cfg.seed, params=params, **classes)

    layout = sequence_layout(model.context_parallel, mesh)
    log = MetricsLog(run_dir)
    stop = StopRequest()
    peak = peak_flops(cfg.peak_flops, model)
    flops_per_token = step_flops_per_token(model, optimizer, objective, program.abstract_state.params, cfg.seq_len)
    eval_fn = None
    if eval_batches is not None:
        eval_fn = jit_eval_step(make_eval_step(program.graphdef, step_cfg, objective=objective), program.shardings,
                                mesh)
    losses: dict[int, float] = {}
    step, step_fn, result = start, None, None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=not progress or jax.process_index() != 0)
    try:
        window_start, window = time.perf_counter(), []
        while step < cfg.steps and not stop.stop_at(step):
            batch = to_global_batch(next(data) if batch_source is None else batch_source(state, step), mesh, layout)
            if step_fn is None:
                step_fn = program.compile(batch)
                if jax.process_index() == 0:
                    print_memory_report(memory_report(step_fn), f"compiled train step for {jax.device_count()} "
                                        f"{jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}")
                window_start = time.perf_counter()
            state, metrics = step_fn(state, batch)
            window.append(metrics)  # device arrays: reading them now would stall the asynchronous dispatch
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                values = window_summary(jax.device_get(window), objective.count_name)
                elapsed = time.perf_counter() - window_start
                values["tokens_per_s"] = values.pop("real_tokens") / elapsed
                values["step_time_s"] = elapsed / len(window)
                utilisation = mfu(flops_per_token, values["tokens_per_s"], peak, jax.device_count())
                if utilisation is not None:
                    values["mfu"] = utilisation
                losses[step] = values["loss"]
                log.write(step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}",
                                **({"acc": f"{values['accuracy']:.2f}"} if "accuracy" in values else {}))
                window_start, window = time.perf_counter(), []
            bar.update(1)
            if checkpointer.manager.should_save(step):
                checkpointer.save(step, state, data_state=data_state_of(data), metadata=metadata)
            if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluated_at = time.perf_counter()
                log.write(step, evaluate(eval_fn, state, eval_batches(), mesh, objective.count_name, layout))
                window_start += time.perf_counter() - evaluated_at  # evaluation time is not training throughput
        # At the end, or on SIGTERM: always leave a checkpoint of the last step.
        if step not in checkpointer.steps():
            checkpointer.save(step, state, data_state=data_state_of(data), metadata=metadata, force=True)
        result = RunResult(state=state, final_step=step, losses=losses, interrupted=stop.requested,
                           run_dir=run_dir)
        if eval_fn is not None and not stop.requested:
            result.eval = evaluate(eval_fn, state, eval_batches(), mesh, objective.count_name, layout)
            log.write(step, result.eval)
    finally:
        bar.close()
        stop.close()
        checkpointer.close()
        log.close()
    if jax.process_index() == 0:
        plot_loss_curve(log.path, run_dir / "loss_curve.png")
    return result
