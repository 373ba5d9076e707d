"""Every phase of one RL iteration compiled from shapes alone (docs/rlhf.md §2.8, §3.10): does the run fit before
anything is rented or loaded?

`compile_rl_phases(cfg, actor, critic, mesh, prompt_width)` compiles the programs `rl_iteration` runs (four; five
with the weight sync), with the arguments it gives them, as ShapeDtypeStructs carrying the shardings the loop's
arrays have (no weight is materialised; the mesh may be made of abstract TPU devices, `parallel.topology.tpu_devices`):

- "weight_sync" (`rl.rollout_weights="gathered"`): `RLProgram.rollout_params`, the jitted reshard of the actor's
  training parameters to the decoding copy (compute dtype, `ROLLOUT_RULES`: whole over the data axes).
- "rollout": `decode.rollout.rollout_program`, the jitted body of `rollout()` (prefill + one decode while-loop of
  `max_new_tokens`; the KV cache is born inside, so it is in the temporaries), on the parameters the loop decodes
  with: that copy, or the training parameters themselves (`rollout_weights="as_trained"`).
- "experience": `train.rl.experience.experience_program`, the jitted body of `make_experience` (old and reference
  log-probs, the critic's values, GAE or group advantages) over all `cfg.rows` rows of `build_rows`.
- "critic_step" (PPO only) and "actor_step": the `make_train_step` programs of `build_rl_program`, on one mini-batch
  (`cfg.rows // cfg.minibatches` rows) of the fields the loop passes (`CRITIC_FIELDS`; `ACTOR_FIELDS`, plus
  `ref_logp` when the KL is in the loss).

`phase_memory_table(...)` compiles them one at a time and gives one row per phase: `memory_report` of the compiled
program (per-chip arguments, temporaries, total, whether it fits the HBM), compile seconds, or the error beside the
phase's name. The phases run one after another; between them only the RL state (and the frozen reference) stays on
the chips, so each row also gives what of it is held beside the phase without being one of its arguments
("resident_gib", `phase_residents`), and the run fits when every phase's compiled total plus that fits ("peak_gib").

Array placement mirrors the loop: the state's parameters on `RLProgram.abstract_state()`'s shardings; the frozen
reference (full fine-tuning) as `state.reference_params` makes it, the actor's parameters cast to the compute dtype on
the same shardings; rows and mini-batch fields on `parallel.batch_shardings`; host arrays the loop hands over as
numpy (prompts, rollout keys, scores, stop flags) replicated; the reward moments and KL coefficient replicated.
Not compiled here: the reward model's forward (a reward source's own program; give its resident parameters as
`resident_extra_bytes`) and the small mini-batch gather (`loop._select`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from internlm2_jax.decode.rollout import rollout_program
from internlm2_jax.parallel import batch_shardings
from internlm2_jax.parallel.topology import memory_report
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.rl.experience import ROW_FIELDS, experience_program
from internlm2_jax.train.rl.objectives import CRITIC_FIELDS
from internlm2_jax.train.rl.state import ModelSetup, RLProgram, build_rl_program, to_compute_dtype
from internlm2_jax.train.step import StepConfig

PHASES = ("weight_sync", "rollout", "experience", "critic_step", "actor_step")
FLOAT_FIELDS = ("response_mask", "rollout_logp", "old_logp", "ref_logp", "values", "returns", "advantages", "pg_w")


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs (or arrays) with shardings: the sum of its shards, the
    replicated leaves whole (the unpadded size; the compiler's layouts may pad small dimensions)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _replicated(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def abstract_rows(mesh, fields, rows: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """[rows, length] fields as `to_global_batch` places them (`batch_shardings`): fp32 masks, log-probs, values
    and weights, int32 ids and positions."""
    shardings = batch_shardings(mesh, fields)
    return {name: jax.ShapeDtypeStruct((rows, length), jnp.float32 if name in FLOAT_FIELDS else jnp.int32,
                                       sharding=shardings[name]) for name in fields}


def abstract_reference(actor: ModelSetup, actor_params):
    """What `state.reference_params` returns, as shapes: None under LoRA; otherwise the actor's parameters in the
    compute dtype (`state.to_compute_dtype`) on the same shardings."""
    if actor.model.lora is not None:
        return None
    shapes = jax.eval_shape(to_compute_dtype(actor.model), actor_params)
    return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), shapes,
                        actor_params)


def decode_params(program: RLProgram):
    """The parameters `rl_iteration` decodes with, as shapes: the `rollout_params` copy, or the training ones."""
    params = program.abstract_state().actor.params
    if program.rollout_params is None:
        return params
    with jax.set_mesh(program.mesh):
        return jax.eval_shape(program.rollout_params, params)  # keeps the reshard's out_shardings


def rl_phase_lowerings(cfg: RLConfig, actor: ModelSetup, critic: ModelSetup | None, mesh, prompt_width: int,
                       step_cfg: StepConfig = StepConfig(), program: RLProgram | None = None
                       ) -> dict[str, Callable[[], object]]:
    """{phase: a function that lowers it} (nothing traced until called), in `PHASES` order; GRPO has no
    critic step."""
    program = program or build_rl_program(cfg, actor, critic, mesh, step_cfg)
    state = program.abstract_state()
    rows = cfg.rows
    length = prompt_width + cfg.rollout.max_new_tokens  # build_rows' default width
    actor_graphdef = program.actor.graphdef

    def weight_sync():
        with jax.set_mesh(mesh):
            return program.rollout_params.lower(state.actor.params)

    def rollout():
        prompts = _replicated(mesh, (cfg.prompts_per_iteration, prompt_width), jnp.int32)
        prompt_lengths = _replicated(mesh, (cfg.prompts_per_iteration,), jnp.int32)
        keys = _replicated(mesh, (rows, 2), jnp.uint32)
        with jax.set_mesh(mesh):
            return rollout_program.lower(actor_graphdef, decode_params(program), prompts, prompt_lengths, keys,
                                  cfg=cfg.rollout)

    def experience():
        critic_graphdef = None if program.critic is None else program.critic.graphdef
        critic_params = None if state.critic is None else state.critic.params
        batch = abstract_rows(mesh, ROW_FIELDS, rows, length)
        with jax.set_mesh(mesh):
            return experience_program.lower(actor_graphdef, critic_graphdef, state.actor.params,
                                     abstract_reference(actor, state.actor.params), critic_params, batch,
                                     _replicated(mesh, (rows,), jnp.float32), _replicated(mesh, (rows,), jnp.bool_),
                                     state.reward_moments, state.kl_coef, loss_cfg=cfg.loss,
                                     cfg=cfg.experience)

    def step(train_program, fields):
        batch = abstract_rows(mesh, fields, rows // cfg.minibatches, length)

        def lower():
            with jax.set_mesh(mesh):
                return train_program.step(tuple(sorted(batch))).lower(train_program.abstract_state, batch)

        return lower

    phases = {} if program.rollout_params is None else {"weight_sync": weight_sync}
    phases |= {"rollout": rollout, "experience": experience}
    if program.critic is not None:
        phases["critic_step"] = step(program.critic, CRITIC_FIELDS)
    phases["actor_step"] = step(program.actor, cfg.actor_fields)
    return phases


def compile_rl_phases(cfg: RLConfig, actor: ModelSetup, critic: ModelSetup | None, mesh, prompt_width: int,
                      step_cfg: StepConfig = StepConfig()) -> dict[str, jax.stages.Compiled]:
    """{phase: compiled program} for every phase of one iteration (module docstring), built from shapes only."""
    return {name: lower().compile()
            for name, lower in rl_phase_lowerings(cfg, actor, critic, mesh, prompt_width, step_cfg).items()}


def phase_residents(cfg: RLConfig, actor: ModelSetup, program: RLProgram) -> dict[str, int]:
    """{phase: bytes per chip of what stays on the chips while it runs but is not among its arguments}: the RL
    state (both `TrainState`s, optimizer moments included) and the frozen reference live through the whole
    iteration, so a phase's peak is its compiled total plus these (the compiled program does not see them). The
    decoding copy of the weights lives from the weight sync to the end of the rollout only (the loop drops it), so
    it is one of the rollout's arguments and no phase's resident."""
    state = program.abstract_state()
    reference = per_chip_bytes(abstract_reference(actor, state.actor.params))
    held = per_chip_bytes(state) + reference
    passed = {"rollout": per_chip_bytes(state.actor.params) if program.rollout_params is None else 0,
              "experience": per_chip_bytes((state.actor.params, state.reward_moments, state.kl_coef)) + reference,
              "actor_step": per_chip_bytes(state.actor)}
    if program.rollout_params is not None:
        passed["weight_sync"] = per_chip_bytes(state.actor.params)
    if state.critic is not None:
        passed["experience"] += per_chip_bytes(state.critic.params)
        passed["critic_step"] = per_chip_bytes(state.critic)
    return {name: held - size for name, size in passed.items()}


def phase_memory_table(cfg: RLConfig, actor: ModelSetup, critic: ModelSetup | None, mesh, prompt_width: int,
                       hbm_bytes: int | None = None, step_cfg: StepConfig = StepConfig(),
                       phases: tuple[str, ...] | None = None, on_row: Callable[[dict], None] | None = None,
                       resident_extra_bytes: int = 0) -> list[dict]:
    """One row per phase (or per one of `phases`), compiled one at a time: {"phase", "status": "compiled" |
    "error", "seconds"} and `memory_report`'s per-chip figures when compiled ("fits": the program alone), "message"
    when not (an over-HBM compile says RESOURCE_EXHAUSTED). "resident_gib" is the RL state and reference held
    beside the phase (`phase_residents`) plus `resident_extra_bytes` per chip (e.g. a reward model kept on the
    chips), "peak_gib" = total + resident and "peak_fits" whether that fits `hbm_bytes`: the check that decides.
    `on_row` sees each row as soon as its phase is done. "batch_rows": the rows the phase runs on (a mini-batch for
    the steps)."""
    program = build_rl_program(cfg, actor, critic, mesh, step_cfg)
    residents = phase_residents(cfg, actor, program)
    table = []
    for name, lower in rl_phase_lowerings(cfg, actor, critic, mesh, prompt_width, step_cfg, program).items():
        if phases is not None and name not in phases:
            continue
        start = time.perf_counter()
        batch_rows = None if name == "weight_sync" else cfg.rows // cfg.minibatches if name.endswith("_step") \
            else cfg.rows
        try:
            compiled = lower().compile()
        except Exception as e:  # noqa: BLE001 - over HBM or a compiler error: the row says which
            row = {"phase": name, "status": "error", "message": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
        else:
            row = {"phase": name, "status": "compiled", **memory_report(compiled, hbm_bytes)}
            del compiled
            row["resident_gib"] = (residents[name] + resident_extra_bytes) / 2**30
            row["peak_gib"] = row["total_gib"] + row["resident_gib"]
            if hbm_bytes:
                row["peak_fits"] = row["peak_gib"] <= hbm_bytes / 2**30
        row["seconds"] = time.perf_counter() - start
        row["batch_rows"] = batch_rows
        table.append(row)
        if on_row is not None:
            on_row(row)
    return table


def phase_table(rows: list[dict]) -> str:
    """A markdown table of `phase_memory_table` rows (with a variant column when the rows name one)."""
    variant = "variant" in rows[0] if rows else False
    lines = [("| variant " if variant else "") + "| phase | rows | arguments | temporaries | total per chip | "
             "+ resident | peak | HBM | fits | compile s |", "|---" * (10 + variant) + "|"]
    for r in rows:
        n = "-" if r.get("batch_rows") is None else r["batch_rows"]
        head = (f"| {r['variant']} " if variant else "") + f"| {r['phase']} | {n} |"
        if r["status"] == "compiled":
            resident = r.get("resident_gib")
            tail = "- | - |" if resident is None else f"{resident:.2f} GiB | {r['peak_gib']:.2f} GiB |"
            fits = r.get("peak_fits", r.get("fits"))
            hbm = "-" if r.get("hbm_gib") is None else f"{r['hbm_gib']:.0f} GiB"
            lines.append(f"{head} {r['arguments_gib']:.2f} GiB | {r['temporaries_gib']:.2f} GiB | "
                         f"{r['total_gib']:.2f} GiB | {tail} {hbm} | {'-' if fits is None else 'yes' if fits else 'no'}"
                         f" | {r['seconds']:.0f} |")
        else:
            over = "RESOURCE_EXHAUSTED" in r.get("message", "")
            lines.append(f"{head} - | - | - | - | - | - | {'no (over HBM)' if over else 'compile error'} | "
                         f"{r.get('seconds', 0):.0f} |")
    return "\n".join(lines)
