"""The training state: one named pytree (conventions) and how it is created directly onto its shardings."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.parallel import DEFAULT_RULES, state_shardings


@flax.struct.dataclass
class TrainState:
    params: nnx.State  # fp32 master weights
    opt_state: Any
    step: jax.Array  # steps taken, skipped ones included
    rng: jax.Array
    skipped_steps: jax.Array  # updates dropped because the loss or the gradient norm was not finite


def model_graphdef(cfg: ModelConfig, model_class=InternLM2ForCausalLM):
    """The static half of `nnx.split`, and the abstract parameters, without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(0))))


def train_state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                          model_class=InternLM2ForCausalLM, rules=DEFAULT_RULES) -> TrainState:
    """NamedShardings for every leaf of the TrainState: optimizer moments follow their parameters."""
    _, abstract_params = model_graphdef(cfg, model_class)
    params = state_shardings(abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_params), params,
                                transform_non_params=lambda _: replicated)
    return TrainState(params=params, opt_state=opt, step=replicated, rng=replicated, skipped_steps=replicated)


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *, seed: int = 0,
                     model_class=InternLM2ForCausalLM, rules=DEFAULT_RULES) -> TrainState:
    """Initialises parameters and optimizer state inside one jit, so each shard is born on its own device."""
    shardings = train_state_shardings(cfg, tx, mesh, model_class=model_class, rules=rules)

    def init() -> TrainState:
        params = nnx.state(model_class(cfg, rngs=nnx.Rngs(seed)))
        return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                          rng=jax.random.PRNGKey(seed), skipped_steps=jnp.zeros((), jnp.int32))

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)()


def abstract_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                         model_class=InternLM2ForCausalLM, rules=DEFAULT_RULES) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the target a checkpoint is restored onto (any mesh shape)."""
    shardings = train_state_shardings(cfg, tx, mesh, model_class=model_class, rules=rules)

    def init() -> TrainState:
        params = nnx.state(model_class(cfg, rngs=nnx.Rngs(0)))
        return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                          rng=jax.random.PRNGKey(0), skipped_steps=jnp.zeros((), jnp.int32))

    shapes = jax.eval_shape(init)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
