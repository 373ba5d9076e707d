"""The pure, jitted steps: `train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics`,
for any `Objective` (LM pretraining and SFT, reward model, DPO), full or with only some parameters trainable."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from internlm2_jax.parallel import batch_shardings
from internlm2_jax.train.loss import Batch
from internlm2_jax.train.objectives import LM, Objective
from internlm2_jax.train.optim import path_string
from internlm2_jax.train.state import TrainState, split_trainable


@dataclasses.dataclass(frozen=True)
class StepConfig:
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many sequential micro-batches
    loss_chunk_size: int = 1024  # sequence chunk of the cross-entropy (bounds the fp32 logits in memory)


def objective_loss(objective: Objective, graphdef, params, batch: Batch, rng, chunk_size: int, extra):
    """The objective's loss; an objective with its own state (`init_extra`) also receives it."""
    if objective.init_extra is None:
        return objective.loss(graphdef, params, batch, rng, chunk_size)
    return objective.loss(graphdef, params, batch, rng, chunk_size, extra=extra)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule | dict[str, optax.Schedule],
                    cfg: StepConfig = StepConfig(), *, objective: Objective = LM,
                    trainable: tuple[str, ...] = ()) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The step of any objective. With `trainable` patterns only the matching parameters get gradients and
    optimizer moments (LoRA: `("lora_",)`; parameter groups: their union); the rest ride along in the state
    unchanged. `schedule` is the learning rate to log, or {metric name: schedule} (`optim.lr_schedules`)."""
    schedules = schedule if isinstance(schedule, dict) else {"lr": schedule}

    def loss_fn(train_params, frozen_params, batch, rng, extra):
        params = nnx.merge_state(train_params, frozen_params) if trainable else train_params
        loss_sum, count, sums = objective_loss(objective, graphdef, params, batch, rng, cfg.loss_chunk_size, extra)
        return loss_sum, (count, sums)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(train_params, frozen_params, batch, rng, extra):
        """Summed loss, count, metric sums and gradients over the micro-batches."""
        if cfg.micro_batches == 1:
            (loss_sum, (count, sums)), grads = grad_fn(train_params, frozen_params, batch, rng, extra)
            return loss_sum, count, sums, grads
        rows = batch["input_ids"].shape[0]
        if rows % cfg.micro_batches:
            raise ValueError(f"batch of {rows} rows cannot be split into {cfg.micro_batches} micro-batches")
        micro = jax.tree.map(lambda x: x.reshape(cfg.micro_batches, rows // cfg.micro_batches, *x.shape[1:]), batch)
        keys = jax.random.split(rng, cfg.micro_batches)

        def accumulate(carry, xs):
            micro_batch, key = xs
            (loss_sum, (count, sums)), grads = grad_fn(train_params, frozen_params, micro_batch, key, extra)
            return jax.tree.map(jnp.add, carry, (loss_sum, count, sums, grads)), None

        zero = jnp.zeros((), jnp.float32)
        shapes = jax.eval_shape(lambda: grad_fn(train_params, frozen_params, jax.tree.map(lambda x: x[0], micro),
                                                keys[0], extra))
        init = (zero, zero, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0][1][1]),
                jax.tree.map(jnp.zeros_like, train_params))
        (loss_sum, count, sums, grads), _ = jax.lax.scan(accumulate, init, (micro, keys))
        return loss_sum, count, sums, grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        train_params, frozen_params = split_trainable(state.params, trainable)
        check_differentiable(train_params)
        rng = jax.random.fold_in(state.rng, state.step)  # dropout: new masks every step, reproducible on resume
        loss_sum, count, sums, grads = gradients(train_params, frozen_params, batch, rng, state.extra)
        denom = jnp.maximum(count, 1.0)  # a batch of pure padding gives loss 0, not NaN
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, train_params)
        new_params = optax.apply_updates(train_params, updates)
        # A non-finite loss or gradient skips the update (counted) instead of poisoning the weights.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_params = keep(new_params, train_params)
        params = nnx.merge_state(new_params, frozen_params) if trainable else new_params
        extra = state.extra
        if objective.update_extra is not None:
            extra = keep(objective.update_extra(state.extra, sums, count), state.extra)
        new_state = state.replace(params=params, opt_state=keep(opt_state, state.opt_state), extra=extra,
                                  step=state.step + 1, skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, objective.count_name: count, "skipped": ~finite,
                   "real_tokens": jnp.sum(batch["segment_ids"] != 0),  # throughput and MFU count no padding
                   **{name: fn(state.step - state.skipped_steps) for name, fn in schedules.items()},
                   **{name: value / denom for name, value in sums.items()}}
        return new_state, metrics

    return train_step


def check_differentiable(train_params) -> None:
    """Trained parameters must be floating point: an integer leaf (QLoRA's NF4 base, int8 weights) has no
    gradient, and the base is frozen anyway; the error says how to select the adapters."""
    integer = [path_string(path) for path, leaf in jax.tree_util.tree_leaves_with_path(train_params)
               if not jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if integer:
        raise ValueError(f"{len(integer)} trained parameters are quantized (integer) and cannot be trained, e.g. "
                         f"{integer[:3]}: train the adapters only (optimizer.trainable=('lora_',)) or keep the base "
                         "in floating point (model.lora.quantize_base=None)")


def make_eval_step(graphdef, cfg: StepConfig = StepConfig(), *,
                   objective: Objective = LM) -> Callable[[TrainState, Batch], dict]:
    """Sums over the batch (`loss_sum`, the count, each metric's sum): the caller adds batches up and divides."""

    def eval_step(state: TrainState, batch: Batch) -> dict:
        loss_sum, count, sums = objective_loss(objective, graphdef, state.params, batch, None, cfg.loss_chunk_size,
                                               state.extra)
        loss = loss_sum / jnp.maximum(count, 1.0)
        out = {"loss_sum": loss_sum, objective.count_name: count, "loss": loss, **sums}
        if objective.count_name == "tokens":
            out["perplexity"] = jnp.exp(loss)
        return out

    return eval_step


def jit_train_step(train_step, state_shardings: TrainState, mesh: Mesh):
    """The step jitted over the mesh once per batch structure (a run has one): state donated and kept on its
    shardings, batch split over the data axes (and its tokens over `sequence`). `run.jitted(fields)` is the jitted
    step for a batch with those fields."""

    @functools.cache
    def jitted(fields: tuple[str, ...]):
        return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings(mesh, fields)),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))

    def run(state, batch):
        with jax.set_mesh(mesh):  # lets the model's activation constraints see the mesh
            return jitted(tuple(sorted(batch)))(state, batch)

    run.jitted = jitted
    return run


def jit_eval_step(eval_step, state_shardings: TrainState, mesh: Mesh):
    @functools.cache
    def jitted(fields: tuple[str, ...]):
        return jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings(mesh, fields)))

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(tuple(sorted(batch)))(state, batch)

    return run
