"""Every phase of a 7B PPO and GRPO iteration compiled ahead of time by the TPU compiler (libtpu, abstract chips, no
TPU): per-chip memory of the rollout, the experience pass, the critic step and the actor step, and whether each fits
the chip's HBM (docs/rlhf.md §2.8, §3.10).

The phases are the loop's own programs compiled from shapes (`internlm2_jax.train.rl.aot`). The settings are the
InternLM2 recipe's (rlhf.md §1.12): actor, critic, reference and reward model all InternLM2-7B (bf16 compute, fp32
master weights and Adam moments for the two trained ones, the reference a bf16 copy), 512 samples per iteration of
prompts up to 1536 tokens + 512 new tokens, log-prob chunks of 256 positions, remat "full", scanned layers, the
platform's flash attention ("auto": Mosaic on TPU), one fsdp axis over the 8 chips of v5p:2x2x2. PPO: 512 prompts
x 1 sample; GRPO: 64 prompts x 8 samples (TRL's num_generations), k3 KL in the loss, no critic. The reward model's
own forward (`train/rl/rewards.py`: `decode.reward.score_rows` over row batches, between the rollout and the
experience pass) is not among these programs; its bf16 parameters are counted as resident beside every phase. The
update takes `--minibatches` optimizer steps per epoch (default 4: mini-batches of 128 rows, 16 per chip). By default
(the loop's `rl.rollout_weights="gathered"`) a "weight_sync" phase (the reshard to the bf16 decoding copy, whole on
every chip of an fsdp-only mesh) comes first and the rollout decodes from that copy; `--rollout-weights as_trained`
decodes with the training layout.

Columns, per chip: the compiled program's arguments, temporaries and total (`memory_report`); "+ resident": what
stays on the chips beside the phase without being one of its arguments (the rest of the RL state, optimizer moments
included, the frozen reference, and a bf16 7B reward model unless `--no-reward-model`); "peak" = total + resident;
"fits": peak under the chip's HBM.

Each variant compiles in its own subprocess (a 7B compile takes minutes and a few GiB of host memory); every phase
prints a `ROW {json}` line as it finishes, and a markdown table is printed at the end, errors beside their phase.

Usage: python benchmarks/rl_aot.py [--variant ppo|grpo|ppo-lora ...] [--topology v5p:2x2x2] [--prompts N]
           [--minibatches N] [--micro-batches N] [--rollout-weights gathered|as_trained] [--layers N]
           [--phase NAME ...] [--no-reward-model] [--json rows.jsonl] [--table rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ppo", "grpo", "ppo-lora")
PROMPT_WIDTH, NEW_TOKENS, CHUNK, GRPO_GROUP = 1536, 512, 256, 8


def setups(variant: str, *, rows: int = 512, minibatches: int = 4, micro_batches: int = 1, layers: int | None = None,
           prompt_width: int = PROMPT_WIDTH, new_tokens: int = NEW_TOKENS, narrow: dict | None = None,
           rollout_weights: str = "gathered"):
    """(RLConfig, actor ModelSetup, critic ModelSetup | None, StepConfig) of a variant: `rows` samples per iteration,
    the 7B model (or `layers` of it; `narrow` overrides more model fields, for tests)."""
    from internlm2_jax.config import LoraConfig, preset
    from internlm2_jax.decode.rollout import RolloutConfig
    from internlm2_jax.train import OptimizerConfig, StepConfig
    from internlm2_jax.train.rl.config import RLConfig
    from internlm2_jax.train.rl.core import RLLossConfig
    from internlm2_jax.train.rl.state import ModelSetup

    fields = dict(dtype="bfloat16", scan_layers=True, remat="full", **(narrow or {}))
    if layers is not None:
        fields["num_hidden_layers"] = layers
    lora = variant.endswith("-lora")
    if lora:
        fields["lora"] = LoraConfig(rank=64, alpha=128.0)
    model = preset("internlm2_7b", **fields)

    def optimizer(lr: float, trainable: tuple[str, ...]) -> OptimizerConfig:  # the report's: constant lr, clip 1
        return OptimizerConfig(peak_lr=lr, warmup_steps=0, total_steps=10**6, min_lr_ratio=1.0, weight_decay=0.0,
                               clip_norm=1.0, trainable=trainable)

    actor = ModelSetup(model, optimizer(1e-6, ("lora_",) if lora else ()))
    if variant.startswith("grpo"):
        cfg = RLConfig(algorithm="grpo", prompts_per_iteration=rows // GRPO_GROUP, loss=RLLossConfig.grpo(),
                       rollout=RolloutConfig(max_new_tokens=new_tokens, samples_per_prompt=GRPO_GROUP),
                       minibatches=minibatches, chunk_size=CHUNK, rollout_weights=rollout_weights)
        critic = None
    else:
        cfg = RLConfig(algorithm="ppo", prompts_per_iteration=rows, rollout=RolloutConfig(max_new_tokens=new_tokens),
                       minibatches=minibatches, chunk_size=CHUNK, rollout_weights=rollout_weights)
        critic = ModelSetup(model, optimizer(5e-6, ("lora_", "v_head") if lora else ()))
    return cfg, actor, critic, StepConfig(micro_batches=micro_batches, loss_chunk_size=CHUNK)


def reward_model_bytes(model, mesh) -> int:
    """Per-chip bytes of a reward model of `model`'s shape kept on the chips in its compute dtype (the conditional
    RM of `train/rl/rewards.py` scores between the rollout and the experience pass and stays resident)."""
    import jax
    import jax.numpy as jnp

    from internlm2_jax.model import InternLM2ForRewardModel, model_graphdef
    from internlm2_jax.parallel import state_shardings
    from internlm2_jax.train.rl.aot import per_chip_bytes

    _, abstract = model_graphdef(model.replace(lora=None), InternLM2ForRewardModel)
    shardings = state_shardings(abstract, mesh)
    dtype = jnp.dtype(model.dtype)
    return per_chip_bytes(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), abstract,
                                       shardings))


def run_variant(variant: str, topology: str = "v5p:2x2x2", *, phases=None, prompt_width: int = PROMPT_WIDTH,
                emit=None, reward_model: bool = True, **kw) -> list[dict]:
    """The variant's phases compiled in this process, one row each (also passed to `emit` as it finishes); with
    `reward_model`, a bf16 7B RM is counted as resident beside every phase."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles may hold libtpu's lock
    from internlm2_jax.parallel import MeshConfig, make_mesh
    from internlm2_jax.parallel.topology import topology_hbm, tpu_devices
    from internlm2_jax.train.rl.aot import phase_memory_table

    cfg, actor, critic, step_cfg = setups(variant, prompt_width=prompt_width, **kw)
    devices = tpu_devices(topology)
    mesh = make_mesh(MeshConfig(fsdp=-1), devices)
    head = {"variant": variant, "rollout_weights": cfg.rollout_weights, "topology": topology, "chips": len(devices),
            "rows": cfg.rows, "micro_batches": step_cfg.micro_batches,
            "length": prompt_width + cfg.rollout.max_new_tokens, "layers": actor.model.num_hidden_layers}
    rows = []

    def on_row(row: dict) -> None:
        rows.append(head | row)
        if emit:
            emit(rows[-1])

    extra = reward_model_bytes(actor.model, mesh) if reward_model else 0
    head["reward_model_gib"] = extra / 2**30
    phase_memory_table(cfg, actor, critic, mesh, prompt_width, topology_hbm(topology), step_cfg,
                       phases=tuple(phases) if phases else None, on_row=on_row, resident_extra_bytes=extra)
    return rows


def _subprocess(args: list[str], timeout: float) -> list[dict]:
    command = [sys.executable, __file__, *args, "--in-process"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        stdout, failure = done.stdout, None if done.returncode == 0 else done.stderr[-2000:]
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        failure = f"timed out after {timeout} s"
    rows = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]
    if failure and not rows:
        rows = [{"variant": args[args.index("--variant") + 1], "phase": "-", "status": "error", "message": failure}]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", choices=VARIANTS, help="default: ppo and grpo")
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--prompts", type=int, default=512, help="samples per iteration (GRPO: groups of 8)")
    parser.add_argument("--minibatches", type=int, default=4, help="optimizer steps per epoch")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation of each step")
    parser.add_argument("--rollout-weights", default="gathered", choices=("gathered", "as_trained"),
                        help="rl.rollout_weights: decode from a whole bf16 copy (default) or the fsdp shards")
    parser.add_argument("--layers", type=int, help="narrow the 7B to this many layers (a quick check)")
    parser.add_argument("--phase", action="append", help="only these phases")
    parser.add_argument("--no-reward-model", action="store_true",
                        help="no reward model resident on the chips (a rule reward)")
    parser.add_argument("--json", type=Path, help="append each row to this JSON-lines file")
    parser.add_argument("--table", type=Path, help="print the markdown table of a --json file's rows")
    parser.add_argument("--in-process", action="store_true", help="compile here, not in a subprocess per variant")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per variant in its subprocess")
    args = parser.parse_args(argv)
    from internlm2_jax.train.rl.aot import phase_table

    def record(row: dict) -> None:
        print("ROW " + json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if args.table:
        print(phase_table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return 0
    kw = dict(rows=args.prompts, minibatches=args.minibatches, micro_batches=args.micro_batches, layers=args.layers,
              rollout_weights=args.rollout_weights)
    flags = ["--no-reward-model"] if args.no_reward_model else []
    rows = []
    for variant in args.variant or ["ppo", "grpo"]:
        if args.in_process:
            rows += run_variant(variant, args.topology, phases=args.phase, emit=record,
                                reward_model=not args.no_reward_model, **kw)
        else:
            extra = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items() if v is not None and k != "rows"]
            found = _subprocess(["--variant", variant, "--topology", args.topology, f"--prompts={args.prompts}",
                                 *extra, *flags, *[f"--phase={p}" for p in args.phase or ()]], args.timeout)
            for row in found:
                record(row)
            rows += found
    print(phase_table(rows))
    for row in rows:
        if row["status"] == "error":
            print(f"{row['variant']} {row['phase']}: {row['message']}", file=sys.stderr)
    return 0 if all(r["status"] == "compiled" and r.get("peak_fits", r.get("fits")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
