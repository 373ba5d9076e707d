"""`python -m internlm2_jax.launch experiments/<name>.py [--set a.b=v ...] [--compile-only [--topology v5p:4x4x4]]`.

An experiment file defines `config() -> Experiment` and, to run, `main(experiment)`. The launcher applies `--set`
overrides, prints the resolved config and the parameter count, then runs `main`; the training loop compiles the real
sharded step once, on its first batch, and prints its per-device memory before step 0. With `--compile-only` the same
step is compiled from shapes and the launcher stops; with `--topology` it compiles for abstract TPU devices (needs
the `libtpu` package, no TPU) and says whether the step fits the chip's HBM. On a multi-host job (a TPU pod slice,
SLURM, or JAX_COORDINATOR_ADDRESS set) `jax.distributed` starts first.

The experiment schema is `internlm2_jax.experiment`, the standard run an experiment's `main` calls is
`internlm2_jax.run.run_training`; this module is the command line only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.artifacts import CheckpointMismatch, CheckpointRestoreError
from internlm2_jax.experiment import Experiment, load_experiment
from internlm2_jax.model import InternLM2ForRewardModel
from internlm2_jax.overrides import apply_overrides, to_dict
from internlm2_jax.parallel import AXES, batch_shardings, make_mesh
from internlm2_jax.parallel.mesh import split_cpu
from internlm2_jax.parallel.topology import memory_report, print_memory_report, topology_hbm, tpu_devices
from internlm2_jax.run import needs_reference_logprobs
from internlm2_jax.train.layout_checks import LayoutError, check_layout
from internlm2_jax.train.loop import build_program
from internlm2_jax.train.objectives import PAIR_ROWS, Objective


def abstract_batch(exp: Experiment, mesh, objective: Objective) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one global batch of the experiment's rows, as `run_training` feeds them."""
    rows, pairs = exp.train.batch_size, exp.data.max_pairs
    shapes = {k: ((rows, exp.train.seq_len), jnp.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    shapes["loss_mask"] = ((rows, exp.train.seq_len), jnp.float32)
    if objective.rows in PAIR_ROWS:
        shapes["pair_mask"] = ((rows, pairs), jnp.float32)
    if needs_reference_logprobs(exp, objective):
        shapes["reference_logps"] = ((rows, 2 * pairs), jnp.float32)
    shardings = batch_shardings(mesh, shapes)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k]) for k, (shape, dtype) in shapes.items()}


def compile_train_step(exp: Experiment, devices=None):
    """The run's step, built as `train` builds it, compiled from shapes for `devices` (abstract TPU devices work):
    what `--compile-only` reports. A real run compiles it once, on its first batch."""
    mesh = make_mesh(exp.mesh, devices)
    objective = exp.objective.build()
    program = build_program(exp.model, exp.optimizer, exp.step, mesh, objective)
    check_layout(exp.model, exp.train, exp.step, mesh, program.abstract_state.params, program.shardings.params)
    return program.compile(abstract_batch(exp, mesh, objective))


def compile_rl_phases(exp: Experiment, devices, hbm: int | None, where: str) -> int:
    """`--compile-only` of an RL experiment: every phase of one iteration (weight sync, rollout, experience, critic
    and actor steps) compiled from shapes, a table of per-chip memory with what stays resident beside each phase, and
    exit status 1 when a phase fails to compile or its peak does not fit."""
    from internlm2_jax.experiment import rl_prompt_width
    from internlm2_jax.run import rl_setups
    from internlm2_jax.train.rl.aot import phase_memory_table, phase_table

    actor, critic = rl_setups(exp)
    rows = phase_memory_table(exp.rl, actor, critic, make_mesh(exp.mesh, devices), rl_prompt_width(exp), hbm,
                              exp.step, on_row=lambda row: print(f"compiled {row['phase']} ({row['seconds']:.0f} s)",
                                                                 flush=True))
    print(f"RL phases for {where} ({exp.rl.algorithm}, {exp.rl.rows} samples of {exp.train.seq_len} tokens):")
    print(phase_table(rows))
    failed = [r["phase"] for r in rows if r["status"] != "compiled" or not r.get("peak_fits", r.get("fits", True))]
    for row in rows:
        if row["status"] != "compiled":
            print(f"error: {row['phase']}: {row['message'].splitlines()[0]}", file=sys.stderr)
    if failed:
        print(f"error: {', '.join(failed)} do not fit {where}", file=sys.stderr)
        return 1
    return 0


def start_distributed() -> None:
    """jax.distributed on a multi-host job: configured by the environment (JAX_COORDINATOR_ADDRESS, ...) or one
    jax detects itself (a TPU pod slice, SLURM, Open MPI, Kubernetes), so a pod run needs no launcher flags."""
    from jax._src.clusters import ClusterEnv  # the detection jax.distributed.initialize() itself runs

    detected = any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or detected:
        jax.distributed.initialize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm2_jax.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="path to an experiment file (experiments/<name>.py)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a config field, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--compile-only", action="store_true", help="compile the train step, print memory, stop")
    parser.add_argument("--topology", help="with --compile-only: a TPU topology such as v5p:4x4x4 or v5e:16x16")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="split the CPU into N devices (for a mesh on a CPU machine, e.g. --cpu-devices 8)")
    args = parser.parse_args(argv)
    if args.topology and not args.compile_only:
        parser.error("--topology needs --compile-only (nothing can run on abstract devices)")
    if args.cpu_devices is not None:
        try:  # before anything touches a device: nothing the launcher imports does
            split_cpu(args.cpu_devices)
        except ValueError as e:
            parser.error(str(e))

    start_distributed()
    module = load_experiment(args.experiment)
    exp = apply_overrides(module.config(), args.set)
    print(json.dumps(to_dict(exp), indent=2, default=str))
    reward_head = exp.rl is None and exp.objective.build().model_class is InternLM2ForRewardModel
    print(f"parameters: {exp.model.num_params(reward_head=reward_head):,}")

    if args.topology:
        devices = tpu_devices(args.topology)
        hbm, platform, count = topology_hbm(args.topology), "tpu", len(devices)
    else:
        devices, hbm, platform, count = None, None, jax.devices()[0].platform, jax.device_count()
    try:
        mesh_shape = dict(zip(AXES, exp.mesh.shape(count), strict=True))
    except ValueError as e:  # one line naming the fields to change, not a traceback from deep inside the step
        sizes = dict(zip(AXES, (getattr(exp.mesh, a) for a in AXES), strict=True))
        change = ([a for a, n in sizes.items() if n == 0 or n < -1] or
                  ([a for a, n in sizes.items() if n == -1] if list(sizes.values()).count(-1) > 1 else []) or
                  [a for a, n in sizes.items() if n > 1] or ["fsdp"])
        fix = f"change {' / '.join(f'mesh.{a}' for a in change)} with --set (one axis may be -1: the rest)"
        if platform == "cpu":
            needed = max(1, int(np.prod([n for n in sizes.values() if n > 0])))
            fix += f", or split the CPU into {needed} devices with --cpu-devices {needed}"
        devices_here = f"TPU {args.topology}" if args.topology else f"the {count} {platform} device(s) here"
        print(f"error: the experiment's mesh does not fit {devices_here}: {e}; {fix}", file=sys.stderr)
        return 2
    where = (f"TPU {args.topology} ({count} chips, mesh {mesh_shape})" if args.topology
             else f"{count} local {platform} devices")
    try:
        if args.compile_only and exp.rl is not None:
            return compile_rl_phases(exp, devices, hbm, where)
        if args.compile_only:
            try:
                compiled = compile_train_step(exp, devices)
            except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a step over HBM: say so, one line
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                print(f"error: the train step does not fit {where}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
                return 1
            print_memory_report(memory_report(compiled, hbm), f"compiled train step for {where}")
            return 0
        if not hasattr(module, "main"):
            print(f"{args.experiment} defines no main(experiment); nothing to run", file=sys.stderr)
            return 2
        module.main(exp)  # the loop compiles the step once and prints its memory before step 0
    except (LayoutError, CheckpointMismatch, CheckpointRestoreError) as e:  # the run's own config: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
