"""`python -m internlm2_jax.launch experiments/<name>.py [--set a.b=v ...] [--compile-only [--topology v5p:4x4x4]]`.

An experiment file defines `config() -> Experiment` and, to run, `main(experiment)`. The launcher applies `--set`
overrides, prints the resolved config, the parameter count and the compiled per-device memory of the real sharded
train step, then runs `main`. With `--compile-only` it stops after compiling; with `--topology` it compiles for
abstract TPU devices (needs the `libtpu` package, no TPU) and says whether the step fits the chip's HBM.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from internlm2_jax.config import ModelConfig
from internlm2_jax.overrides import apply_overrides, to_dict
from internlm2_jax.parallel import MeshConfig, batch_sharding, make_mesh
from internlm2_jax.train.loop import RunResult, TrainConfig, train
from internlm2_jax.train.optim import OptimizerConfig, lr_schedule, make_optimizer
from internlm2_jax.train.state import abstract_train_state, model_graphdef, train_state_shardings
from internlm2_jax.train.step import StepConfig, make_train_step

# HBM per chip, bytes.
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5litepod": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    manifest: str = ""  # training data manifest (see internlm2_jax.data.manifest)
    heldout_manifest: str = ""  # optional: evaluated at the end of the run
    tokenizer: str = ""  # a SentencePiece .model file or a model directory
    strict: bool = False  # raise on the first bad record instead of counting and skipping it
    eval_batches: int = 16


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    model: ModelConfig
    train: TrainConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    step: StepConfig = StepConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()


def load_experiment(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise AttributeError(f"{path} must define config() -> Experiment")
    return module


def abstract_batch(exp: Experiment, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    shape, sharding = (exp.train.batch_size, exp.train.seq_len), batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
             for k in ("input_ids", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return batch


def compile_train_step(exp: Experiment, devices=None):
    """Lowers and compiles the real sharded train step for `devices` (abstract TPU devices work) from shapes."""
    mesh = make_mesh(exp.mesh, devices)
    tx = make_optimizer(exp.optimizer)
    graphdef, _ = model_graphdef(exp.model)
    shardings = train_state_shardings(exp.model, tx, mesh)
    step = make_train_step(graphdef, tx, lr_schedule(exp.optimizer), exp.step)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                     donate_argnums=(0,))
    args = abstract_train_state(exp.model, tx, mesh), abstract_batch(exp, mesh)
    with jax.set_mesh(mesh):
        return jitted.lower(*args).compile()


def memory_report(compiled, hbm_bytes: int | None = None) -> dict[str, float]:
    m = compiled.memory_analysis()
    report = {
        "arguments_gib": m.argument_size_in_bytes / 2**30,
        "outputs_gib": m.output_size_in_bytes / 2**30,
        "aliased_gib": m.alias_size_in_bytes / 2**30,
        "temporaries_gib": m.temp_size_in_bytes / 2**30,
        "code_gib": m.generated_code_size_in_bytes / 2**30,
    }
    # Donated state is aliased to the outputs: it is counted once.
    report["total_gib"] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                           + m.temp_size_in_bytes + m.generated_code_size_in_bytes) / 2**30
    if hbm_bytes:
        report["hbm_gib"] = hbm_bytes / 2**30
        report["fits"] = report["total_gib"] <= report["hbm_gib"]
    return report


def tpu_devices(topology: str):
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown topology: say which
        raise SystemExit(f"cannot build TPU topology {topology!r} ({type(e).__name__}: {e}); is `libtpu` installed "
                         "(requirements-test.txt) and the name like 'v5p:4x4x4' or 'v5e:16x16'?") from None


def print_report(exp: Experiment, report: dict, where: str) -> None:
    print(f"compiled train step for {where}: per-device memory")
    for key, value in report.items():
        print(f"  {key:<16} {value:.3f}" if isinstance(value, float) else f"  {key:<16} {value}")


def run_pretraining(exp: Experiment, *, progress: bool = True) -> RunResult:
    """The standard pretraining run of an experiment: its tokenizer, manifests and configs -> `train`."""
    from internlm2_jax.data import PretrainDataIterator, load_manifest
    from internlm2_jax.tokenizer import Tokenizer

    path = Path(exp.data.tokenizer)
    tokenizer = Tokenizer.from_pretrained(path) if path.is_dir() else Tokenizer.from_file(path)
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is "
                         f"{exp.model.vocab_size}")
    processes = jax.process_count()
    if exp.train.batch_size % processes:
        raise ValueError(f"train.batch_size={exp.train.batch_size} must divide over {processes} processes")
    manifest = load_manifest(exp.data.manifest)
    data = PretrainDataIterator(manifest, tokenizer, exp.train.seq_len, exp.train.batch_size // processes,
                                seed=exp.train.seed, process_index=jax.process_index(), process_count=processes,
                                strict=exp.data.strict)
    eval_batches = None
    if exp.data.heldout_manifest:
        heldout = load_manifest(exp.data.heldout_manifest)  # now: a bad path must not surface after training

        def eval_batches():
            it = PretrainDataIterator(heldout, tokenizer, exp.train.seq_len,
                                      exp.train.batch_size // processes, seed=0, process_index=jax.process_index(),
                                      process_count=processes, shuffle=False, repeat=False)
            for i, batch in enumerate(it):
                if i >= exp.data.eval_batches:
                    break
                yield batch

    metadata = {"experiment": to_dict(exp), "tokenizer_sha256": tokenizer.sha256, "manifest_hash": manifest.hash,
                "tokenizer_path": str(path.resolve())}
    result = train(exp.model, exp.optimizer, exp.step, exp.mesh, exp.train, data, metadata=metadata,
                   eval_batches=eval_batches, progress=progress)
    stats = data.log_stats()
    (Path(exp.train.run_dir) / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm2_jax.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="path to an experiment file (experiments/<name>.py)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a config field, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--compile-only", action="store_true", help="compile the train step, print memory, stop")
    parser.add_argument("--topology", help="with --compile-only: a TPU topology such as v5p:4x4x4 or v5e:16x16")
    args = parser.parse_args(argv)
    if args.topology and not args.compile_only:
        parser.error("--topology needs --compile-only (nothing can run on abstract devices)")

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # multi-host: one process per host, configured by environment
        jax.distributed.initialize()
    module = load_experiment(args.experiment)
    exp = apply_overrides(module.config(), args.set)
    print(json.dumps(to_dict(exp), indent=2, default=str))
    print(f"parameters: {exp.model.num_params():,}")

    if args.topology:
        devices = tpu_devices(args.topology)
        hbm = HBM_BYTES.get(args.topology.split(":")[0])
        where = f"TPU {args.topology} ({len(devices)} chips, mesh {make_mesh(exp.mesh, devices).shape})"
    else:
        devices, hbm, where = None, None, f"{jax.device_count()} local {jax.devices()[0].platform} devices"
    print_report(exp, memory_report(compile_train_step(exp, devices), hbm), where)
    if args.compile_only:
        return 0
    if not hasattr(module, "main"):
        print(f"{args.experiment} defines no main(experiment); nothing to run", file=sys.stderr)
        return 2
    module.main(exp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
