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
import numpy as np

from internlm2_jax.config import ModelConfig
from internlm2_jax.overrides import apply_overrides, to_dict
from internlm2_jax.parallel import MeshConfig, batch_sharding, make_mesh
from internlm2_jax.train.loop import RunResult, TrainConfig, train
from internlm2_jax.train.optim import OptimizerConfig, lr_schedule, make_optimizer
from internlm2_jax.train.state import abstract_train_state, model_graphdef, train_state_shardings
from internlm2_jax.train.objectives import LM, Objective, dpo_objective, reward_objective, sequence_logprobs
from internlm2_jax.train.preference_loss import DPOConfig, RewardLossConfig
from internlm2_jax.train.step import StepConfig, make_train_step

# HBM per chip, bytes.
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5litepod": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}


DATA_FORMATS = ("pretrain", "messages", "alpaca", "pairs")
OBJECTIVES = ("lm", "reward", "dpo")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    manifest: str = ""  # pretraining data manifest (see internlm2_jax.data.manifest)
    heldout_manifest: str = ""  # optional: evaluated at the end of the run
    tokenizer: str = ""  # a SentencePiece .model file or a model directory
    strict: bool = False  # raise on the first bad record instead of counting and skipping it
    eval_batches: int = 16
    # Fine-tuning data (data.conversations): "messages" / "alpaca" SFT JSONL, or "pairs" preference JSONL.
    format: str = "pretrain"
    train_files: tuple[str, ...] = ()
    heldout_files: tuple[str, ...] = ()
    max_pairs: int = 8  # preference pairs per row
    default_domain: str | None = None  # reward model: the domain of records that name none

    def __post_init__(self):
        if self.format not in DATA_FORMATS:
            raise ValueError(f"data.format must be one of {DATA_FORMATS}, got {self.format!r}")
        if self.format != "pretrain" and self.manifest:
            raise ValueError(f"data.format={self.format!r} reads data.train_files; data.manifest is for pretraining")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    model: ModelConfig
    train: TrainConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    step: StepConfig = StepConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    objective: str = "lm"  # "lm" (pretraining, SFT), "reward" (conditional reward model), "dpo"
    reward: RewardLossConfig = RewardLossConfig()
    dpo: DPOConfig = DPOConfig()

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        pairs = self.data.format == "pairs"
        if pairs != (self.objective != "lm"):
            raise ValueError(f"objective={self.objective!r} does not go with data.format={self.data.format!r}: "
                             "reward and dpo train on 'pairs', lm on 'pretrain', 'messages' or 'alpaca'")


def build_objective(exp: Experiment) -> Objective:
    return {"lm": LM, "reward": reward_objective(exp.reward), "dpo": dpo_objective(exp.dpo)}[exp.objective]


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
    if exp.data.format == "pairs":
        batch["pair_mask"] = jax.ShapeDtypeStruct((exp.train.batch_size, exp.data.max_pairs), jnp.float32,
                                                  sharding=sharding)
    return batch


def compile_train_step(exp: Experiment, devices=None):
    """Lowers and compiles the real sharded train step for `devices` (abstract TPU devices work) from shapes."""
    mesh = make_mesh(exp.mesh, devices)
    tx = make_optimizer(exp.optimizer)
    objective = build_objective(exp)
    classes = dict(model_class=objective.model_class, trainable=exp.optimizer.trainable)
    graphdef, _ = model_graphdef(exp.model, objective.model_class)
    shardings = train_state_shardings(exp.model, tx, mesh, **classes)
    step = make_train_step(graphdef, tx, lr_schedule(exp.optimizer), exp.step, objective=objective,
                           trainable=exp.optimizer.trainable)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                     donate_argnums=(0,))
    args = abstract_train_state(exp.model, tx, mesh, **classes), abstract_batch(exp, mesh)
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


def load_tokenizer(exp: Experiment):
    from internlm2_jax.tokenizer import Tokenizer

    path = Path(exp.data.tokenizer)
    tokenizer = Tokenizer.from_pretrained(path) if path.is_dir() else Tokenizer.from_file(path)
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is "
                         f"{exp.model.vocab_size}")
    return tokenizer


def data_iterators(exp: Experiment, tokenizer):
    """(training iterator, held-out batches factory or None, data hash) for the experiment's data format."""
    from internlm2_jax.data import PairDataIterator, PretrainDataIterator, SFTDataIterator, load_manifest

    processes = jax.process_count()
    if exp.train.batch_size % processes:
        raise ValueError(f"train.batch_size={exp.train.batch_size} must divide over {processes} processes")
    common = dict(process_index=jax.process_index(), process_count=processes)
    rows = exp.train.batch_size // processes
    if exp.data.format == "pretrain":
        manifest = load_manifest(exp.data.manifest)
        heldout = load_manifest(exp.data.heldout_manifest) if exp.data.heldout_manifest else None  # fail early

        def make(source, **options):
            return PretrainDataIterator(source, tokenizer, exp.train.seq_len, rows, **common, **options)

        train_data, data_hash = make(manifest, seed=exp.train.seed, strict=exp.data.strict), manifest.hash
    else:
        if not exp.data.train_files:
            raise ValueError(f"data.format={exp.data.format!r} needs data.train_files (JSONL paths)")
        heldout = exp.data.heldout_files or None
        if exp.data.format == "pairs":
            kind = exp.objective

            def make(source, **options):
                return PairDataIterator(source, tokenizer, exp.train.seq_len, rows, kind=kind,
                                        max_pairs=exp.data.max_pairs, default_domain=exp.data.default_domain,
                                        **common, **options)
        else:
            def make(source, **options):
                return SFTDataIterator(source, tokenizer, exp.train.seq_len, rows, format=exp.data.format,
                                       **common, **options)

        train_data = make(exp.data.train_files, seed=exp.train.seed, strict=exp.data.strict)
        data_hash = train_data.data_sha256
    eval_batches = None
    if heldout is not None:
        def eval_batches():
            for i, batch in enumerate(make(heldout, seed=0, shuffle=False, repeat=False)):
                if i >= exp.data.eval_batches:
                    break
                yield batch

    return train_data, eval_batches, data_hash


class ReferenceLogprobs:
    """Full-parameter DPO: adds `reference_logps` to every batch of `data`, computed on the mesh by `logprobs` from
    the frozen starting weights (`reference_model`). LoRA DPO needs none of this: its reference is the policy with
    the adapters off, inside the step."""

    def __init__(self, data, logprobs, mesh):
        self.data, self.logprobs, self.mesh = data, logprobs, mesh

    def __next__(self):
        from jax.experimental import multihost_utils

        from internlm2_jax.train.loop import to_global_batch

        batch = next(self.data)
        sharding = batch_sharding(self.mesh)
        with jax.set_mesh(self.mesh):
            out = self.logprobs(to_global_batch(batch, sharding))
        batch["reference_logps"] = np.asarray(multihost_utils.global_array_to_host_local_array(
            out, self.mesh, sharding.spec))
        return batch

    def __iter__(self):
        return self

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        self.data.set_state(state)

    @property
    def stats(self):
        return self.data.stats


def reference_model(exp: Experiment):
    """(jitted batch -> per-segment reference log-probs, mesh): the run's `init_weights`, else its seed's init."""
    from flax import nnx

    from internlm2_jax.model import InternLM2ForCausalLM
    from internlm2_jax.parallel import state_shardings
    from internlm2_jax.train.init_weights import initial_params

    mesh = make_mesh(exp.mesh)
    graphdef, abstract = model_graphdef(exp.model)
    if exp.train.init_weights:
        params = initial_params(exp.train.init_weights, exp.model, InternLM2ForCausalLM, mesh, seed=exp.train.seed)
    else:
        with jax.set_mesh(mesh):
            params = jax.jit(lambda: nnx.state(InternLM2ForCausalLM(exp.model, rngs=nnx.Rngs(exp.train.seed))),
                             out_shardings=state_shardings(abstract, mesh))()
    chunk = exp.step.loss_chunk_size
    jitted = jax.jit(lambda p, b: sequence_logprobs(nnx.merge(graphdef, p), b, chunk_size=chunk)[0])
    return (lambda batch: jitted(params, batch)), mesh


def run_training(exp: Experiment, *, progress: bool = True) -> RunResult:
    """The standard run of an experiment: tokenizer, data of its format, objective, configs -> `train`."""
    tokenizer = load_tokenizer(exp)
    data, eval_batches, data_hash = data_iterators(exp, tokenizer)
    if exp.objective == "dpo" and exp.model.lora is None:
        logprobs, mesh = reference_model(exp)
        data = ReferenceLogprobs(data, logprobs, mesh)
        if eval_batches is not None:
            plain_eval = eval_batches
            eval_batches = lambda: ReferenceLogprobs(iter(plain_eval()), logprobs, mesh)  # noqa: E731
    metadata = {"experiment": to_dict(exp), "tokenizer_sha256": tokenizer.sha256, "manifest_hash": data_hash,
                "tokenizer_path": str(Path(exp.data.tokenizer).resolve())}
    result = train(exp.model, exp.optimizer, exp.step, exp.mesh, exp.train, data, metadata=metadata,
                   eval_batches=eval_batches, progress=progress, objective=build_objective(exp))
    stats = data.log_stats() if hasattr(data, "log_stats") else data.stats
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
    print(f"parameters: {exp.model.num_params(reward_head=exp.objective == 'reward'):,}")

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
