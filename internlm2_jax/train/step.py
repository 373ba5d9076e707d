"""The pure, jitted steps: `train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from internlm2_jax.parallel import batch_sharding
from internlm2_jax.train.loss import Batch, next_token_loss
from internlm2_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many sequential micro-batches
    loss_chunk_size: int = 1024  # sequence chunk of the cross-entropy (bounds the fp32 logits in memory)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    cfg: StepConfig = StepConfig()) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    def loss_fn(params, batch):
        return next_token_loss(nnx.merge(graphdef, params), batch, chunk_size=cfg.loss_chunk_size)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch):
        """Summed loss, token count and summed gradients over the micro-batches."""
        if cfg.micro_batches == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
            return loss_sum, count, grads
        rows = batch["input_ids"].shape[0]
        if rows % cfg.micro_batches:
            raise ValueError(f"batch of {rows} rows cannot be split into {cfg.micro_batches} micro-batches")
        micro = jax.tree.map(lambda x: x.reshape(cfg.micro_batches, rows // cfg.micro_batches, *x.shape[1:]), batch)

        def accumulate(carry, micro_batch):
            loss_acc, count_acc, grads_acc = carry
            (loss_sum, count), grads = grad_fn(params, micro_batch)
            return (loss_acc + loss_sum, count_acc + count, jax.tree.map(jnp.add, grads_acc, grads)), None

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
        (loss_sum, count, grads), _ = jax.lax.scan(accumulate, init, micro)
        return loss_sum, count, grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        loss_sum, count, grads = gradients(state.params, batch)
        denom = jnp.maximum(count, 1.0)  # a batch of pure padding gives loss 0, not NaN
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient skips the update (counted) instead of poisoning the weights.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                                  step=state.step + 1, skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "skipped": ~finite,
                   "lr": schedule(state.step - state.skipped_steps)}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, cfg: StepConfig = StepConfig()) -> Callable[[TrainState, Batch], dict]:
    def eval_step(state: TrainState, batch: Batch) -> dict:
        loss_sum, count = next_token_loss(nnx.merge(graphdef, state.params), batch, chunk_size=cfg.loss_chunk_size)
        loss = loss_sum / jnp.maximum(count, 1.0)
        return {"loss_sum": loss_sum, "tokens": count, "loss": loss, "perplexity": jnp.exp(loss)}

    return eval_step


def jit_train_step(train_step, state_shardings: TrainState, mesh: Mesh):
    """The step jitted once over the mesh: state donated and kept on its shardings, batch split over data axes."""
    jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                     out_shardings=(state_shardings, None), donate_argnums=(0,))

    def run(state, batch):
        with jax.set_mesh(mesh):  # lets the model's activation constraints see the mesh
            return jitted(state, batch)

    run.jitted = jitted
    return run


def jit_eval_step(eval_step, state_shardings: TrainState, mesh: Mesh):
    jitted = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding(mesh)))

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    return run
