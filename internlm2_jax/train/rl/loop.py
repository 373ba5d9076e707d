"""The online RL loop (docs/rlhf.md §2.12): rollout, rewards, experience, PPO epochs of actor and critic steps.

`rl_iteration(program, state, prompts, reward, cfg)` is one iteration: the actor samples responses to a batch of
prompts (`decode.rollout`, with the parameters it trains: there is no second copy to keep in sync), a reward source
scores them on the host (`train/rl/rewards.py`: the conditional reward model on spliced ids, or a rule), one jitted
pass builds the experience (`train/rl/experience.py`), then `ppo_epochs` passes over shuffled mini-batches take a
critic step and, after the critic's warm-up, an actor step, both through `make_train_step`.

`train_rl` runs iterations to `cfg.iterations` and owns what a run needs around them, like `train.loop.train`: the
progress bar, per-iteration metrics (JSONL, tensorboard, a PNG of the curves), sample dumps, checkpoints of `RLState`
and the prompt iterator's state, resuming from the newest one, and stopping cleanly on SIGTERM. Everything random
derives from (seed, iteration[, epoch]), so a resumed run repeats a straight one's metrics bit for bit on CPU.

The COOL monitors (`hacking.check_hacking`) watch the per-iteration metrics, with an optional `gold` reward source
logged beside the optimised one; their alerts are logged and can end the round.

Several processes (`jax.distributed`): each reads its own prompts, scores its own samples on its host and dumps
them to its own file; experience, updates and metrics are global. Not yet (later slices): packed experience rows,
sequence parallelism (refused), a rollout mesh of its own shape.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from internlm2_jax.artifacts import provenance
from internlm2_jax.data.prompts import PromptBatch
from internlm2_jax.decode.rollout import Rollout, rollout, rollout_keys
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.parallel.mesh import BATCH_AXES, global_rows, local_rows, process_row_degree
from internlm2_jax.train.checkpoint import Checkpointer
from internlm2_jax.train.loop import MetricsLog, StopRequest, to_global_batch, window_summary
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.rl.core import aggregation_weights, kl_controller
from internlm2_jax.train.rl.hacking import Alert, check_hacking
from internlm2_jax.train.rl.experience import build_rows, make_experience, ptx_weights
from internlm2_jax.train.rl.objectives import CRITIC_FIELDS
from internlm2_jax.train.rl.state import (ModelSetup, RLProgram, RLState, build_rl_program, init_rl_state,
                                          reference_params, starting_params)
from internlm2_jax.train.step import StepConfig

RewardFn = Callable[[PromptBatch, Rollout], np.ndarray]


def minibatch_order(cfg: RLConfig, iteration: int, epoch: int) -> np.ndarray:
    """The rows of one epoch in shuffled order, from (seed, iteration, epoch) only; GRPO moves whole groups, so no
    group is split between mini-batches (its advantages were computed over all of it)."""
    group = cfg.group_size
    rng = np.random.default_rng([cfg.seed, iteration, epoch])
    groups = rng.permutation(cfg.rows // group)
    return (groups[:, None] * group + np.arange(group)[None, :]).reshape(-1)


@partial(jax.jit, static_argnames=("loss_agg", "max_len"))
def _select(experience: dict, rows: jax.Array, *, loss_agg: str, max_len: int | None) -> dict:
    """The mini-batch of `rows`, with its aggregation weights recomputed over exactly its rows (the weights are
    exact only over the rows they were computed on, `core.aggregation_weights`)."""
    batch = jax.tree.map(lambda x: x[rows], experience)
    batch["pg_w"] = aggregation_weights(batch["response_mask"], loss_agg, max_len)
    return batch


def _fields(batch: dict, names) -> dict:
    return {name: batch[name] for name in names}


PTX_FIELDS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")


def check_ptx(rows: dict, length: int, mesh) -> None:
    missing = [name for name in PTX_FIELDS if name not in rows]
    if missing:
        raise ValueError(f"the pre-training (PTX) batch lacks {missing}: it must be an LM batch (SFTDataIterator, "
                         "PretrainDataIterator)")
    if np.shape(rows["input_ids"])[1] != length:
        raise ValueError(f"the PTX rows are {np.shape(rows['input_ids'])[1]} tokens long but the experience rows are "
                         f"{length} (prompt width + rollout.max_new_tokens): give the PTX iterator that seq_len")
    if np.shape(rows["input_ids"])[0] % process_row_degree(mesh):
        raise ValueError(f"the PTX batch has {np.shape(rows['input_ids'])[0]} rows, which do not split over this "
                         f"process's {process_row_degree(mesh)} data-parallel shards")
    if not np.asarray(rows["loss_mask"]).any():
        raise ValueError("the PTX batch has no trained tokens (loss_mask is all 0)")


@partial(jax.jit, static_argnames="coef")
def _with_ptx(batch: dict, ptx: dict, *, coef: float) -> dict:
    """The actor mini-batch with the pre-training rows appended: their tokens train through `ptx_w` only (zero
    response mask, advantages and policy weights), weighted so the PTX term is `coef` x their token-mean NLL."""
    rows = ptx["input_ids"].shape[0]
    out = {name: jnp.concatenate([value, ptx[name].astype(value.dtype) if name in ptx else
                                  jnp.zeros((rows, *value.shape[1:]), value.dtype)])
           for name, value in batch.items()}
    out["ptx_w"] = jnp.concatenate([jnp.zeros_like(batch["response_mask"]),
                                    ptx_weights(ptx["loss_mask"], batch["response_mask"].sum(), coef)])
    return out


def rl_iteration(program: RLProgram, state: RLState, prompts: PromptBatch, reward: RewardFn, cfg: RLConfig, *,
                 ref_params=None, pad_id: int = 0, ptx=None,
                 gold: RewardFn | None = None) -> tuple[RLState, dict[str, float], dict]:
    """One iteration: (new state, metrics as floats, the host-side samples: rollout arrays and scores).

    With several processes each gives its own prompts (`cfg.prompts_per_iteration` / processes, the rows of its
    data-parallel shards), scores its own samples and gets them back as the host-side samples; the metrics are
    global.

    `ptx`: an LM data iterator whose next batch is appended to every actor mini-batch (PPO-ptx, §1.7: InternLM2
    mixes pre-training data of about half the PPO volume at coefficient `cfg.ptx_coef` = 0.5), or None. `gold`: a
    reward source that is logged ("gold", its mean) but never optimised: the check a hacked reward drifts from."""
    processes = jax.process_count()
    if prompts.size * processes != cfg.prompts_per_iteration:
        each = f" in each of {processes} processes" if processes > 1 else ""
        raise ValueError(f"the prompt source gave {prompts.size} prompts{each}; rl.prompts_per_iteration is "
                         f"{cfg.prompts_per_iteration} (give the source that batch size, split over the processes)")
    mesh, iteration = program.mesh, int(state.iteration)
    actor_graphdef = program.actor.graphdef
    local_count = cfg.rows // processes
    times = {}

    start = time.perf_counter()
    # Every process holds its own prompts; each global row keeps the key of its index, however many processes.
    all_keys = np.asarray(rollout_keys(cfg.seed, iteration, cfg.rows))
    keys = jax.make_array_from_callback(all_keys.shape, NamedSharding(mesh, PartitionSpec(BATCH_AXES)),
                                        lambda index: all_keys[index])
    params_version = int(state.actor.step)  # the actor steps taken: the weights this rollout samples from
    decode_params = state.actor.params if program.rollout_params is None else program.rollout_params(
        state.actor.params)
    if prompts.size % process_row_degree(mesh) == 0:
        prompt_ids, prompt_lengths = global_rows(mesh, prompts.prompt_ids), global_rows(mesh, prompts.prompt_lengths)
    else:  # fewer prompts than data shards (GRPO: few prompts, many samples): every process passes all of them,
        # replicated, and the rollout splits the rows it repeats them into
        prompt_ids, prompt_lengths = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                      for x in (prompts.prompt_ids, prompts.prompt_lengths))
    roll = rollout(actor_graphdef, decode_params, prompt_ids, prompt_lengths, keys, cfg=cfg.rollout)
    local = jax.tree.map(local_rows, roll)  # this process's samples, on the host
    del decode_params  # freed before the experience and the updates need the memory
    times["rollout"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = np.asarray(reward(prompts, local), np.float32)
    if scores.shape != (local_count,) or not np.isfinite(scores).all():
        raise ValueError(f"the reward source returned {scores.dtype}{list(scores.shape)} with "
                         f"{int((~np.isfinite(scores)).sum()) if scores.ndim else 0} non-finite values; expected "
                         f"[{local_count}] finite scores (one per sample of this process)")
    gold_scores = None if gold is None else np.asarray(gold(prompts, local), np.float32)
    times["reward"] = time.perf_counter() - start

    start = time.perf_counter()
    rows = to_global_batch(build_rows(prompts.prompt_ids, prompts.prompt_lengths, local, pad_id), mesh)
    critic_kw = {} if state.critic is None else dict(critic_graphdef=program.critic.graphdef,
                                                      critic_params=state.critic.params)
    with jax.set_mesh(mesh):
        experience, moments, exp_metrics = make_experience(
            actor_graphdef, state.actor.params, rows, global_rows(mesh, scores), roll.stopped, state.reward_moments,
            loss_cfg=cfg.loss, cfg=cfg.experience, ref_params=ref_params, kl_coef=state.kl_coef, **critic_kw)
    exp_metrics = jax.device_get(exp_metrics)
    times["experience"] = time.perf_counter() - start

    start = time.perf_counter()
    actor, critic = state.actor, state.critic
    train_actor = cfg.algorithm == "grpo" or iteration >= cfg.critic_warmup_iterations
    size = cfg.rows // cfg.minibatches
    actor_window, critic_window = [], []
    with jax.set_mesh(mesh):
        for epoch in range(cfg.ppo_epochs):
            order = minibatch_order(cfg, iteration, epoch)
            for k in range(cfg.minibatches):
                batch = _select(experience, jnp.asarray(order[k * size:(k + 1) * size]), loss_agg=cfg.loss.loss_agg,
                                max_len=cfg.rollout.max_new_tokens)
                if critic is not None:
                    critic_batch = to_global_batch(_fields(batch, CRITIC_FIELDS), mesh)
                    critic, metrics = program.critic.step(tuple(sorted(critic_batch)))(critic, critic_batch)
                    critic_window.append(metrics)
                if train_actor:
                    actor_batch = _fields(batch, cfg.actor_fields)
                    if ptx is not None:
                        ptx_rows = next(ptx)
                        check_ptx(ptx_rows, batch["input_ids"].shape[1], mesh)
                        actor_batch = _with_ptx(actor_batch, to_global_batch(_fields(ptx_rows, PTX_FIELDS), mesh),
                                                coef=cfg.ptx_coef)
                    actor_batch = to_global_batch(actor_batch, mesh)
                    actor, metrics = program.actor.step(tuple(sorted(actor_batch)))(actor, actor_batch)
                    actor_window.append(metrics)
    values = {}
    for prefix, window in (("actor", actor_window), ("critic", critic_window)):
        if window:
            summary = window_summary(jax.device_get(window))
            values.update({f"{prefix}/{name}": value for name, value in summary.items()
                           if name not in ("lr", "real_tokens")})
    times["update"] = time.perf_counter() - start

    kl_coef = state.kl_coef
    controller = kl_controller(cfg.loss)
    if controller is not None:
        kl_coef = controller.update(kl_coef, jnp.float32(exp_metrics["kl"]), cfg.rows)
    state = state.replace(actor=actor, critic=critic, reward_moments=moments, kl_coef=kl_coef,
                          iteration=state.iteration + 1)
    lengths, stopped = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        for x in (local.lengths, local.stopped))
    values.update({name: float(value) for name, value in exp_metrics.items()})
    if gold_scores is not None:
        values["gold"] = float(np.mean(multihost_utils.process_allgather(gold_scores, tiled=True)))
    values.update({"kl_coef": float(kl_coef), "stop_rate": float(np.mean(stopped)),
                   "params_version": float(params_version),
                   "response_length_p95": float(np.percentile(lengths, 95)), "actor_trained": float(train_actor),
                   "rollout_tokens_per_s": float(lengths.sum()) / max(times["rollout"], 1e-9),
                   **{f"time/{name}": value for name, value in times.items()}})
    return state, values, {"rollout": local, "scores": scores, "gold": gold_scores}


@dataclasses.dataclass
class RLResult:
    state: RLState
    iterations: int
    metrics: dict[int, dict[str, float]]  # this call's iterations (1-based: after that many), as logged
    interrupted: bool
    run_dir: epath.Path
    alerts: list[Alert] = dataclasses.field(default_factory=list)  # the hacking monitors' alerts of this call
    stopped_by: str | None = None  # the alert that ended the round (`monitor.stop_round_on`)


def dump_samples(path: epath.Path, prompts: PromptBatch, samples: dict, tokenizer, group: int,
                 reward: RewardFn | None = None) -> None:
    """One JSON line per sample: the prompt (ids and, with a tokenizer, text; its record as written when the source
    keeps records), the response, score, gold score, length and stop. With a conditional RM as the reward, also the
    row's score under every domain (COOL's cross-domain matrix: a response that games one domain's prompt shows up
    as scoring high under all of them)."""
    roll, lines = samples["rollout"], []
    by_domain = {}
    if reward is not None and hasattr(reward, "scores_under"):
        by_domain = {name: reward.scores_under(prompts, roll, name) for name in reward.domains}
    for row in range(len(samples["scores"])):
        b, n = row // group, int(roll.lengths[row])
        prompt = prompts.prompt_ids[b, :int(prompts.prompt_lengths[b])].tolist()
        response = np.asarray(roll.tokens[row, :n]).tolist()
        line = {"row": row, "domain_id": int(prompts.domain_ids[b]), "meta": prompts.metas[b],
                "record": None if prompts.records is None else prompts.records[b],
                "prompt_ids": prompt, "response_ids": response, "score": float(samples["scores"][row]),
                "length": n, "stopped": bool(roll.stopped[row])}
        if tokenizer is not None:
            stop = int(bool(roll.stopped[row]))
            line.update(prompt=tokenizer.decode(prompt), response=tokenizer.decode(response[:n - stop]))
        if samples.get("gold") is not None:
            line["gold"] = float(samples["gold"][row])
        if by_domain:
            line["score_by_domain"] = {name: float(scores[row]) for name, scores in by_domain.items()}
        lines.append(json.dumps(line, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def sample_file(iteration: int) -> str:
    """Each process dumps the samples it scored: iter_{k}.jsonl, or iter_{k}.process{p}.jsonl with several."""
    suffix = f".process{jax.process_index()}" if jax.process_count() > 1 else ""
    return f"iter_{iteration}{suffix}.jsonl"


# What a resumed run may change: how long it runs and what it writes down, not what it computes.
RESUMABLE_FIELDS = ("iterations", "log_every", "checkpoint_every", "keep_checkpoints", "dump_every", "monitor",
                    "run_dir")


def check_same_run(saved: dict | None, run: dict, run_dir) -> None:
    """Refuses to resume a checkpoint whose RL config differs from this run's beyond `RESUMABLE_FIELDS`: another
    batch size, rollout, loss or seed would silently splice two different runs into one curve."""
    if saved is None:
        return
    run = json.loads(json.dumps(run, default=str))  # as the checkpoint recorded it (tuples as lists)
    differ = [f"{k}: checkpoint {saved.get(k)!r} vs run {run.get(k)!r}" for k in sorted(set(saved) | set(run))
              if k not in RESUMABLE_FIELDS and saved.get(k) != run.get(k)]
    if differ:
        raise ValueError(f"{run_dir}: the checkpoint was saved by another RL run ({'; '.join(differ)}); resuming "
                         "would mix two runs (use a new run_dir, or change only "
                         f"{', '.join(RESUMABLE_FIELDS)})")


def logged_history(metrics_path: epath.Path, up_to: int) -> dict[int, dict[str, float]]:
    """The metrics a run logged for iterations 1..up_to (the last line of each: a resumed run re-logs the
    iterations after its checkpoint), so the monitors of a resumed run see what a straight one saw."""
    if not metrics_path.exists():
        return {}
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return {row["step"]: {k: v for k, v in row.items() if k != "step"} for row in rows if row["step"] <= up_to}


CURVES = (("score", "RM / rule score"), ("gold", "gold check"), ("kl", "KL to the reference (per token)"),
          ("response_length", "response length"), ("actor/clipfrac", "clip fraction"),
          ("critic/loss", "value loss"), ("actor/entropy", "entropy"))


def plot_rl_curves(metrics_path: epath.Path, out_path: epath.Path) -> epath.Path | None:
    """A PNG of the per-iteration curves (score, KL, length, clip fraction, value loss, entropy) that exist."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    latest = {row["step"]: row for row in rows}  # a resumed run re-logs the iterations after its checkpoint
    present = [(key, title) for key, title in CURVES if any(key in row for row in latest.values())]
    if not present:
        return None
    from matplotlib.figure import Figure  # not pyplot: no global backend switch under a notebook

    fig = Figure(figsize=(4 * len(present), 3.2))
    for ax, (key, title) in zip(np.atleast_1d(fig.subplots(1, len(present))), present, strict=True):
        points = sorted((step, row[key]) for step, row in latest.items() if key in row)
        ax.plot(*zip(*points, strict=True), ".-")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with out_path.open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return out_path


def train_rl(cfg: RLConfig, actor: ModelSetup, prompts, reward: RewardFn, *, critic: ModelSetup | None = None,
             ptx=None, gold: RewardFn | None = None, mesh_cfg: MeshConfig = MeshConfig(),
             step_cfg: StepConfig = StepConfig(), pad_id: int = 0, tokenizer=None,
             metadata: dict[str, Any] | None = None, progress: bool = True) -> RLResult:
    """Runs (or resumes) online RL to `cfg.iterations`.

    `prompts` is a prompt source (`data.prompts.PromptDataIterator`: `PromptBatch`es of
    `cfg.prompts_per_iteration`, `get_state`/`set_state`); `reward(prompts, rollout) -> [rows]` scores the samples.
    The actor starts from `actor` (the SFT model; it is also the frozen reference), the critic (PPO) from `critic`
    (the reward model). `ptx` (optional) is an LM data iterator (`SFTDataIterator`, rows of prompt width +
    max_new_tokens) whose batches join the actor's mini-batches (`rl_iteration`). Checkpoints hold `RLState` and the
    prompt and PTX sources' states; `metadata` adds what they should record (the experiment config, data hashes).
    `gold` is a reward source logged beside the optimised one (never trained on), for the hacking monitors
    (`cfg.monitor`): their alerts are logged every iteration, and one named in `monitor.stop_round_on` ends the
    round after a checkpoint (`RLResult.stopped_by`).
    """
    if mesh_cfg.sequence != 1:
        raise ValueError(f"mesh.sequence={mesh_cfg.sequence}: RL rows are not split over the sequence yet (GAE runs "
                         "along each row); use the data and fsdp axes")
    run_dir = epath.Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(mesh_cfg)
    process_row_degree(mesh)  # several processes: each must hold whole data-parallel shards
    program = build_rl_program(cfg, actor, critic, mesh, step_cfg)
    metadata = provenance(model=dataclasses.asdict(actor.model), optimizer=dataclasses.asdict(actor.optimizer),
                          objective=f"rl_{cfg.algorithm}", model_class="RLState", seed=cfg.seed,
                          rl=dataclasses.asdict(cfg), **(metadata or {}))
    checkpointer = Checkpointer(run_dir / "checkpoints", save_every=cfg.checkpoint_every,
                                keep=cfg.keep_checkpoints)
    restored = checkpointer.restore_latest(program.abstract_state(), metadata)
    if restored is not None:
        _, state, data_state, saved = restored
        check_same_run(saved.get("rl"), metadata["rl"], run_dir)
        prompts.set_state(data_state["prompts"])
        if ("ptx" in data_state) != (ptx is not None):
            said = lambda yes: "with" if yes else "without"  # noqa: E731
            raise ValueError(f"{run_dir}: the checkpoint was saved by a run {said('ptx' in data_state)} PTX data and "
                             f"this run is {said(ptx is not None)}: resuming would change the run (use a new run_dir)")
        if ptx is not None:
            ptx.set_state(data_state["ptx"])
        ref_params = reference_params(actor, mesh, cfg.seed)
    else:  # the starting weights are read once: the reference is cast from them before the state takes them
        starting = starting_params(actor, InternLM2ForCausalLM, mesh, cfg.seed)
        ref_params = reference_params(actor, mesh, cfg.seed, starting)
        state = init_rl_state(program, cfg, actor, critic, starting)
    log, stop = MetricsLog(run_dir), StopRequest()

    def sources_state() -> dict:
        return {"prompts": prompts.get_state(), **({} if ptx is None else {"ptx": ptx.get_state()})}

    history: dict[int, dict[str, float]] = {}
    iteration = int(state.iteration)
    watched = logged_history(log.path, iteration)  # what the monitors compare: the whole round, resumes included
    alerts, stopped_by = [], None
    bar = tqdm(total=cfg.iterations, initial=iteration, desc=f"rl {cfg.algorithm}", unit="iter",
               disable=not progress or jax.process_index() != 0)
    try:
        while iteration < cfg.iterations and not stop.stop_at(iteration):
            batch = next(prompts)
            state, values, samples = rl_iteration(program, state, batch, reward, cfg, ref_params=ref_params,
                                                  pad_id=pad_id, ptx=ptx, gold=gold)
            iteration += 1
            watched[iteration] = values
            for found in check_hacking(watched, cfg.monitor):
                alerts.append(found)
                values[f"alert/{found.name}"] = 1.0
                bar.write(f"iteration {iteration}: {found.name}: {found.message}")
                if found.name in cfg.monitor.stop_round_on and stopped_by is None:
                    stopped_by = found.name
            history[iteration] = values
            if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
                log.write(iteration, values)
            if cfg.dump_every and iteration % cfg.dump_every == 0:
                dump_samples(run_dir / "samples" / sample_file(iteration), batch, samples, tokenizer,
                             cfg.rollout.samples_per_prompt, reward)
            bar.set_postfix(score=f"{values['score']:.3f}", kl=f"{values['kl']:.4f}",
                            len=f"{values['response_length']:.1f}", tok_s=f"{values['rollout_tokens_per_s']:.0f}")
            bar.update(1)
            if checkpointer.manager.should_save(iteration):
                checkpointer.save(iteration, state, data_state=sources_state(), metadata=metadata)
            if stopped_by is not None:
                break
        if iteration not in checkpointer.steps():
            checkpointer.save(iteration, state, data_state=sources_state(), metadata=metadata, force=True)
    finally:
        bar.close()
        stop.close()
        checkpointer.close()
        log.close()
    if jax.process_index() == 0:
        plot_rl_curves(log.path, run_dir / "rl_curves.png")
    return RLResult(state=state, iterations=iteration, metrics=history, interrupted=stop.requested, run_dir=run_dir,
                    alerts=alerts, stopped_by=stopped_by)
