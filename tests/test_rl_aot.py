"""Every phase of an RL iteration (rollout, experience, critic step, actor step) compiled ahead of time by the TPU
compiler for abstract v5p chips (libtpu, no TPU), from shapes only (`internlm2_jax.train.rl.aot`, through
`benchmarks/rl_aot.py`): what a researcher checks before renting the pod (docs/rlhf.md §2.8, §3.10). By default a
narrowed PPO and GRPO (two 256-wide layers, a few rows) compile in seconds; the 7B tables take minutes per phase and
run with `-m slow`."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aot_testing import load_aot_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "rl_aot.py"
GIB = 2**30


@pytest.fixture(scope="module")
def bench():
    return load_aot_script(SCRIPT, "rl_aot")


NARROW = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=2, vocab_size=1024)
WIDTH, NEW = 48, 16


def narrowed(bench, variant):
    """The variant's setups narrowed to two 256-wide layers, 16 rows of 48 + 16 tokens, mini-batches of 8, decoding
    from the weight sync's copy (so that phase is compiled too)."""
    return bench.setups(variant, rows=16, minibatches=2, layers=2, prompt_width=WIDTH, new_tokens=NEW, narrow=NARROW,
                        rollout_weights="gathered")


def test_every_phase_of_a_narrowed_ppo_and_grpo_iteration_compiles_for_v5p_within_hbm(bench):
    """Five phases for PPO, four for GRPO (no critic), each compiled for the 8 chips of v5p:2x2x2 on one fsdp axis.
    The per-chip figures are checked against what each program must hold: the weight sync turns the fp32 shards of
    the actor into a whole bf16 copy on every chip, which the rollout takes; the rollout's KV cache is born inside
    the program, so its temporaries hold at least the cache's shard; the experience pass takes the actor's fp32
    parameters, the bf16 reference and the critic's fp32 parameters; a train step takes its model's state
    (parameters and two Adam moments) and donates it (aliased to the output)."""
    import jax

    from internlm2_jax.model.kv_cache import cache_bytes
    from internlm2_jax.parallel import MeshConfig, make_mesh
    from internlm2_jax.parallel.topology import topology_hbm, tpu_devices
    from internlm2_jax.train.rl.aot import (abstract_reference, decode_params, per_chip_bytes, phase_memory_table,
                                            phase_residents, phase_table)
    from internlm2_jax.train.rl.state import build_rl_program

    mesh = make_mesh(MeshConfig(fsdp=-1), tpu_devices("v5p:2x2x2"))
    for variant, phases in (("ppo", ("weight_sync", "rollout", "experience", "critic_step", "actor_step")),
                            ("grpo", ("weight_sync", "rollout", "experience", "actor_step"))):
        cfg, actor, critic, step_cfg = narrowed(bench, variant)
        assert cfg.rows == 16 and (critic is None) == (variant == "grpo")
        rows = {r["phase"]: r for r in phase_memory_table(cfg, actor, critic, mesh, WIDTH, topology_hbm("v5p:2x2x2"),
                                                          step_cfg)}
        assert tuple(rows) == phases
        for name, row in rows.items():
            assert row["status"] == "compiled", (variant, name, row.get("message"))
            assert row["fits"] and 0 < row["total_gib"] < row["hbm_gib"] == 95, (variant, row)
            assert row["peak_fits"] and row["peak_gib"] == row["total_gib"] + row["resident_gib"]
        program = build_rl_program(cfg, actor, critic, mesh, step_cfg)
        state = program.abstract_state()
        # Beside each phase the rest of the RL state stays: the phase's arguments + resident = the whole state.
        whole = per_chip_bytes(state) + per_chip_bytes(abstract_reference(actor, state.actor.params))
        residents = phase_residents(cfg, actor, program)
        assert set(residents) == set(phases) and all(0 < r <= whole for r in residents.values())
        assert residents["actor_step"] == whole - per_chip_bytes(state.actor)
        assert residents["rollout"] == whole  # it decodes from the weight sync's copy, not from the state
        kv_shard = cache_bytes(actor.model, cfg.rows, WIDTH + NEW) / 8  # rows over the 8 fsdp shards
        assert rows["rollout"]["temporaries_gib"] * GIB >= kv_shard > 0
        actor_params = per_chip_bytes(state.actor.params)
        decoding = per_chip_bytes(decode_params(program))  # the weight sync's bf16 copy, whole on every chip
        assert decoding == 2 * sum(math.prod(x.shape) for x in jax.tree.leaves(state.actor.params))  # whole, bf16
        assert rows["rollout"]["arguments_gib"] * GIB >= decoding
        assert rows["weight_sync"]["arguments_gib"] * GIB >= actor_params
        assert rows["weight_sync"]["outputs_gib"] * GIB >= decoding
        frozen = actor_params + per_chip_bytes(abstract_reference(actor, state.actor.params))
        if critic is not None:
            frozen += per_chip_bytes(state.critic.params)
        assert frozen <= rows["experience"]["arguments_gib"] * GIB < 1.5 * frozen
        trained = {"actor_step": state.actor, "critic_step": state.critic}
        for name in phases[3:]:
            held = per_chip_bytes(trained[name])
            assert held >= 3 * per_chip_bytes(trained[name].params) * 0.99  # params + Adam m, v
            assert held <= rows[name]["arguments_gib"] * GIB < 1.5 * held
            assert rows[name]["aliased_gib"] * GIB >= 0.99 * held  # the state is donated
            assert rows[name]["temporaries_gib"] > 0
        assert f"| {variant} | actor_step | 8 |" in phase_table([{"variant": variant, **r} for r in rows.values()])


# The 7B tables (v5p:2x2x2, 512 samples of 1536 + 512 tokens): one subprocess per variant, once per test session.
_ROWS: dict[tuple[str, str], dict[str, dict]] = {}


def seven_b(variant: str, rollout_weights: str = "gathered", *, fit: bool = True) -> dict[str, dict]:
    """The variant's rows by phase; each compiled, within HBM alone, and (`fit`) with what is resident beside it."""
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) provides the TPU compiler")
    key = (variant, rollout_weights)
    if key not in _ROWS:
        done = subprocess.run([sys.executable, str(SCRIPT), "--variant", variant, "--rollout-weights", rollout_weights,
                               "--in-process"], capture_output=True, text=True, timeout=7200, cwd=ROOT,
                              env=dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
        found = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        assert found, done.stderr[-4000:]
        _ROWS[key] = {row["phase"]: row for row in found}
    rows = _ROWS[key]
    for name, row in rows.items():
        assert row["status"] == "compiled", (name, row.get("message"))
        assert row["fits"] and row["total_gib"] < 95, row
        if fit:
            assert row["peak_fits"] and row["peak_gib"] < 95, row  # with the state and the RM held beside it
    return rows


@pytest.mark.slow
def test_7b_ppo_iteration_decoding_from_the_fsdp_shards_fits_v5p_2x2x2():
    """Four 7B models on 8 chips (rlhf.md §2.8), rl.rollout_weights="as_trained": the rollout holds the 16 GiB/chip
    KV cache of 512 x 2048 tokens in its temporaries; the actor step holds the actor's fp32 parameters and Adam
    moments (10.8 GiB/chip). Measured 2026-12-06 (libtpu 0.0.48, flash prefill): rollout 58.3 GiB compiled + 21.0
    GiB resident (the rest of the RL state, the reference, the RM) = 79.3 GiB, the tightest phase (90.4 GiB when
    the prefill attended over the cache with the XLA reference)."""
    rows = seven_b("ppo", "as_trained")
    assert set(rows) == {"rollout", "experience", "critic_step", "actor_step"}
    assert rows["rollout"]["temporaries_gib"] >= 16.0
    assert 10.8 <= rows["actor_step"]["arguments_gib"] < 12.5
    assert 10.2 <= rows["critic_step"]["arguments_gib"] < 12.0  # 10.28 measured (RESULTS.md)
    assert 3.6 + 1.8 + 3.4 <= rows["experience"]["arguments_gib"] < 10.5  # actor fp32, reference bf16, critic fp32
    assert max(rows, key=lambda name: rows[name]["peak_gib"]) == "rollout"


@pytest.mark.slow
def test_7b_ppo_iteration_with_gathered_rollout_weights_fits_v5p_2x2x2():
    """The loop's default: the bf16 decoding copy, whole on every chip (14.4 GiB/chip on fsdp 8). Measured 2026-12-06:
    rollout 44.1 GiB compiled + 24.6 resident = 68.7 GiB (106 GiB before the prefill ran the flash kernel on the
    prompts alone: the XLA reference's fp32 scores over every cache slot were ~37 GiB of temporaries)."""
    rows = seven_b("ppo")
    assert set(rows) == {"weight_sync", "rollout", "experience", "critic_step", "actor_step"}
    assert rows["rollout"]["arguments_gib"] >= 14.4  # the decoding copy, whole on every chip
    assert rows["rollout"]["temporaries_gib"] < 40  # the 16 GiB cache and decoding, no prompt x cache fp32 scores


@pytest.mark.slow
def test_7b_grpo_iteration_fits_v5p_2x2x2():
    """64 prompts x 8 samples decoding from the fsdp shards: no critic step; the actor step also gets the reference
    log-probs (k3 in the loss). Measured 2026-12-06: rollout 58.3 + 10.7 resident = 69.0 GiB (with the gathered
    bf16 decoding copy, the default: 44.1 + 14.3 = 58.5 GiB)."""
    rows = seven_b("grpo", "as_trained")
    assert set(rows) == {"rollout", "experience", "actor_step"}
    assert rows["rollout"]["temporaries_gib"] >= 16.0
    assert 10.8 <= rows["actor_step"]["arguments_gib"] < 12.5


NARROW_SETS = ["model.hidden_size=256", "model.intermediate_size=512", "model.num_key_value_heads=2",
               "model.num_attention_heads=2", "model.vocab_size=1024", "model.num_hidden_layers=2",
               "rl.rollout.max_new_tokens=16", "train.seq_len=64", "rl.minibatches=1"]


@pytest.mark.parametrize("name, prompts, phases", [
    ("internlm2_7b_ppo", 16, ("rollout", "experience", "critic_step", "actor_step")),
    ("internlm2_7b_grpo", 2, ("rollout", "experience", "actor_step"))])
def test_the_launcher_compiles_every_phase_of_the_7b_rl_experiments(tmp_path, name, prompts, phases):
    """`launch experiments/internlm2_7b_{ppo,grpo}.py --compile-only --topology v5p:2x2x2`, narrowed by --set to
    two 256-wide layers and 16 rows: the experiment files, the launcher's RL branch and its table."""
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) provides the TPU compiler")
    from test_launch import launch

    sets = [x for s in [*NARROW_SETS, f"rl.prompts_per_iteration={prompts}"] for x in ("--set", s)]
    done = launch(ROOT / "experiments" / f"{name}.py", "--compile-only", "--topology", "v5p:2x2x2", *sets, cwd=tmp_path,
                  env_extra={"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("RL phases for TPU v5p:2x2x2"):]
    for phase in phases:
        assert re.search(rf"\| {phase} \| 16 \| .* \| 95 GiB \| yes \|", table), table
    assert re.search(r"\| weight_sync \| - \| .* \| 95 GiB \| yes \|", table), table  # the default: a decoding copy
