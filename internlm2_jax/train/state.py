"""The training state: one named pytree (conventions) and how it is created directly onto its shardings.

Several models train in one state by living in one module (e.g. PPO's actor, critic and frozen reference as
attributes of a container): parameter groups select them by path, frozen ones get no optimizer state, and `extra`
holds an objective's small non-parameter state (running statistics, an adaptive coefficient), replicated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import InternLM2ForCausalLM, model_graphdef
from internlm2_jax.parallel import DEFAULT_RULES, state_shardings


@flax.struct.dataclass
class TrainState:
    params: nnx.State  # fp32 master weights
    opt_state: Any
    step: jax.Array  # steps taken, skipped ones included
    rng: jax.Array
    skipped_steps: jax.Array  # updates dropped because the loss or the gradient norm was not finite
    extra: Any = flax.struct.field(default_factory=dict)  # the objective's own state (`Objective.init_extra`)


def trainable_filter(patterns: tuple[str, ...]) -> Callable[[tuple, object], bool]:
    """An nnx filter: the parameters whose path matches one of `patterns` (regular expressions)."""
    compiled = [re.compile(p) for p in patterns]
    return lambda path, _: any(p.search("/".join(map(str, path))) for p in compiled)


def split_trainable(params: nnx.State, patterns: tuple[str, ...]) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) halves of the parameters (all trainable when `patterns` is empty); `nnx.merge_state`
    puts them back together."""
    if not patterns:
        return params, nnx.State({})
    return nnx.split_state(params, trainable_filter(patterns), ...)


def optimizer_init(tx: optax.GradientTransformation, params, trainable: tuple[str, ...] = ()):
    """Optimizer state for the trainable parameters only (LoRA: moments for the adapters, nothing for the base)."""
    return tx.init(split_trainable(params, trainable)[0])


def train_state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                          model_class=InternLM2ForCausalLM, rules=DEFAULT_RULES,
                          trainable: tuple[str, ...] = (), extra: Any = None) -> TrainState:
    """NamedShardings for every leaf of the TrainState: optimizer moments follow their parameters."""
    extra = {} if extra is None else extra
    _, abstract_params = model_graphdef(cfg, model_class)
    params = state_shardings(abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Parameter groups (multi_transform) leave MaskedNode placeholders where a parameter is another group's.
    masked = lambda x: isinstance(x, optax.transforms.MaskedNode)  # noqa: E731
    opt = optax.tree_map_params(tx, lambda value, sharding: value if masked(value) else sharding,
                                jax.eval_shape(lambda p: optimizer_init(tx, p, trainable), abstract_params),
                                split_trainable(params, trainable)[0], transform_non_params=lambda _: replicated,
                                is_leaf=masked)
    return TrainState(params=params, opt_state=opt, step=replicated, rng=replicated, skipped_steps=replicated,
                      extra=jax.tree.map(lambda _: replicated, extra))


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *, seed: int = 0,
                     model_class=InternLM2ForCausalLM, rules=DEFAULT_RULES, trainable: tuple[str, ...] = (),
                     params: nnx.State | None = None, extra: Any = None) -> TrainState:
    """Initialises parameters and optimizer state inside one jit, so each shard is born on its own device.
    `params` (e.g. pretrained weights with fresh adapters, `initial_params`) replace the random ones; `extra` is
    the objective's initial state (a pytree of arrays)."""
    extra = {} if extra is None else extra
    shardings = train_state_shardings(cfg, tx, mesh, model_class=model_class, rules=rules, trainable=trainable,
                                      extra=extra)

    def init(given, extra) -> TrainState:
        params = nnx.state(model_class(cfg, rngs=nnx.Rngs(seed))) if given is None else given
        return TrainState(params=params, opt_state=optimizer_init(tx, params, trainable), step=jnp.zeros((), jnp.int32),
                          rng=jax.random.PRNGKey(seed), skipped_steps=jnp.zeros((), jnp.int32), extra=extra)

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings, donate_argnums=(0,))(params, extra)


def abstract_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                         model_class=InternLM2ForCausalLM, rules=DEFAULT_RULES,
                         trainable: tuple[str, ...] = (), extra: Any = None) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the target a checkpoint is restored onto (any mesh shape)."""
    extra = {} if extra is None else extra
    shardings = train_state_shardings(cfg, tx, mesh, model_class=model_class, rules=rules, trainable=trainable,
                                      extra=extra)

    def init() -> TrainState:
        params = nnx.state(model_class(cfg, rngs=nnx.Rngs(0)))
        return TrainState(params=params, opt_state=optimizer_init(tx, params, trainable), step=jnp.zeros((), jnp.int32),
                          rng=jax.random.PRNGKey(0), skipped_steps=jnp.zeros((), jnp.int32),
                          extra=jax.tree.map(jnp.asarray, extra))

    shapes = jax.eval_shape(init)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
