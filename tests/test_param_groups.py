"""Several models in one training state, as online RLHF needs them: a policy and a value head trained with their own
learning rates (one optax.multi_transform), a frozen reference on the mesh without optimizer state, a small `extra`
state the objective updates every step (a running mean, an adaptive KL coefficient), and batches made from the
current state (`batch_source`). Sharded equals one device; a resumed run equals a straight one bitwise."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import StepConfig, init_train_state, jit_train_step, make_optimizer, make_train_step
from internlm2_jax.artifacts import CheckpointMismatch
from internlm2_jax.train.loop import TrainConfig, state_classes, to_global_batch, train
from internlm2_jax.train.objectives import Objective
from internlm2_jax.train.optim import OptimizerConfig, ParamGroup, lr_schedules
from internlm2_jax.model import model_graphdef

CFG = preset("tiny")
SEQ, ROWS = 32, 8
KL_TARGET = 0.01


class PolicyValueReference(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.policy = InternLM2ForCausalLM(cfg, rngs=rngs)
        self.value = nnx.Linear(cfg.hidden_size, 1, rngs=rngs)
        self.reference = InternLM2ForCausalLM(cfg, rngs=rngs)


def loss(graphdef, params, batch, rng, chunk_size, *, extra):
    models = nnx.merge(graphdef, params)
    args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    hidden = models.policy(*args, return_hidden=True)
    logprobs = models.policy.token_logprobs(hidden, batch["targets"], chunk_size=chunk_size)
    reference = jax.lax.stop_gradient(models.reference.token_logprobs(
        models.reference(*args, return_hidden=True), batch["targets"], chunk_size=chunk_size))
    mask = batch["loss_mask"]
    kl = jnp.sum((logprobs - reference) * mask)
    advantage = batch["returns"] - extra["return_mean"]
    value = models.value(jax.lax.stop_gradient(hidden))[..., 0]
    value_loss = jnp.sum(jnp.square(value - advantage) * mask)
    total = -jnp.sum(logprobs * mask * advantage) + extra["kl_coef"] * kl + value_loss
    return total, jnp.sum(mask), {"kl": kl, "value_loss": value_loss, "returns": jnp.sum(batch["returns"] * mask)}


def update_extra(extra, sums, count):
    observed = sums["kl"] / jnp.maximum(count, 1.0)
    return {"return_mean": 0.9 * extra["return_mean"] + 0.1 * sums["returns"] / jnp.maximum(count, 1.0),
            "kl_coef": extra["kl_coef"] * (1.0 + 0.1 * jnp.clip(observed / KL_TARGET - 1.0, -0.2, 0.2))}


OBJECTIVE = Objective("toy_ppo", loss, PolicyValueReference,
                      init_extra=lambda: {"return_mean": jnp.zeros((), jnp.float32),
                                          "kl_coef": jnp.full((), 0.1, jnp.float32)},
                      update_extra=update_extra)
OPTIMIZER = OptimizerConfig(warmup_steps=0, total_steps=100, clip_norm=1e6, groups=(
    ParamGroup("policy", ("^policy/",), OptimizerConfig(peak_lr=1e-3, warmup_steps=0, total_steps=100,
                                                       weight_decay=0.0)),
    ParamGroup("value", ("^value/",), OptimizerConfig(peak_lr=1e-1, warmup_steps=0, total_steps=100,
                                                     weight_decay=0.0))))


def batch_source(state, step):
    """On-policy data: the returns depend on the state's running mean, so a resumed run must restore it."""
    rng = np.random.RandomState(step)
    ids = rng.randint(3, CFG.vocab_size, (ROWS, SEQ + 1)).astype(np.int32)
    mean = float(np.asarray(jax.device_get(state.extra["return_mean"])))
    returns = (ids[:, 1:] % 5).astype(np.float32) / 4.0 + 0.5 * mean
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "returns": returns,
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy(),
            "segment_ids": np.ones((ROWS, SEQ), np.int32), "loss_mask": np.ones((ROWS, SEQ), np.float32)}


MESH = MeshConfig(data=2, fsdp=2, tensor=2)


def run(run_dir, steps, mesh=MESH):
    cfg = TrainConfig(steps=steps, batch_size=ROWS, seq_len=SEQ, log_every=1, checkpoint_every=2,
                      run_dir=str(run_dir))
    return train(CFG, OPTIMIZER, StepConfig(), mesh, cfg, None, metadata={}, progress=False, objective=OBJECTIVE,
                 batch_source=batch_source)


def test_groups_have_their_own_learning_rate_and_frozen_models_no_optimizer_state():
    mesh = make_mesh(MESH)
    tx = make_optimizer(OPTIMIZER)
    classes = state_classes(OPTIMIZER, OBJECTIVE)
    state = init_train_state(CFG, tx, mesh, seed=0, **classes)
    moments = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if leaf.ndim > 0]
    assert not any("reference" in m for m in moments)  # a frozen model gets no optimizer state
    # e.g. "[1].inner_states['value'].inner_state[0].nu['value']['kernel'].value": each group keeps moments for
    # its own parameters only
    owners = {(re.search(r"inner_states\['(\w+)'\]", m)[1], re.search(r"\.(?:mu|nu)\['(\w+)'\]", m)[1])
              for m in moments}
    assert owners == {("policy", "policy"), ("value", "value")}
    before = jax.tree.map(np.asarray, state.params)
    graphdef, _ = model_graphdef(CFG, PolicyValueReference)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedules(OPTIMIZER), objective=OBJECTIVE,
                                          trainable=OPTIMIZER.trained), state_shardings(state), mesh)
    state, metrics = step(state, to_global_batch(batch_source(state, 0), mesh))
    assert float(metrics["lr/policy"]) == pytest.approx(1e-3) and float(metrics["lr/value"]) == pytest.approx(1e-1)
    after = jax.tree.map(np.asarray, state.params)

    def largest_change(name):  # Adam's first step moves every weight with a gradient by about its learning rate
        return max(float(np.abs(a - b).max()) for (p, a), (_, b) in zip(nnx.to_flat_state(after),
                                                                       nnx.to_flat_state(before), strict=True)
                   if p[0] == name)

    assert largest_change("policy") == pytest.approx(1e-3, rel=1e-3)
    assert largest_change("value") == pytest.approx(1e-1, rel=1e-3)
    assert largest_change("reference") == 0.0
    assert float(state.extra["return_mean"]) > 0 and float(state.extra["kl_coef"]) != 0.1


def state_shardings(state):
    return jax.tree.map(lambda x: x.sharding, state)


def test_sharded_equals_one_device_and_a_resumed_run_equals_a_straight_one(tmp_path):
    straight = run(tmp_path / "straight", 4)
    first = run(tmp_path / "resumed", 2)
    second = run(tmp_path / "resumed", 4)
    assert {**first.losses, **second.losses} == straight.losses  # bitwise, extra state and moments included
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(second.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx = make_optimizer(OPTIMIZER)
    state = init_train_state(CFG, tx, mesh, seed=0, **state_classes(OPTIMIZER, OBJECTIVE))
    graphdef, _ = model_graphdef(CFG, PolicyValueReference)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedules(OPTIMIZER), objective=OBJECTIVE,
                                          trainable=OPTIMIZER.trained), state_shardings(state), mesh)
    losses = {}
    for i in range(4):
        state, metrics = step(state, to_global_batch(batch_source(state, i), mesh))
        losses[i + 1] = float(metrics["loss"])
    np.testing.assert_allclose(list(losses.values()), list(straight.losses.values()), rtol=2e-5)


def test_a_checkpoint_of_other_groups_is_refused(tmp_path):
    run(tmp_path / "run", 2)
    other = dataclasses.replace(OPTIMIZER, groups=OPTIMIZER.groups[:1])
    with pytest.raises(CheckpointMismatch, match="state tree does not fit.*only in the checkpoint"):
        train(CFG, other, StepConfig(), MESH,
              TrainConfig(steps=3, batch_size=ROWS, seq_len=SEQ, run_dir=str(tmp_path / "run")), None, metadata={},
              progress=False, objective=OBJECTIVE, batch_source=batch_source)
