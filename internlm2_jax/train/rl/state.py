"""The RL state pytree and the compiled pieces it moves through (docs/rlhf.md §2.6).

`RLState` is everything a resumed run needs to continue bit for bit: the actor's and the critic's `TrainState`s
(parameters, optimizer moments, step), the running reward moments, the KL coefficient and the iteration. Rollout
keys and mini-batch shuffles derive from (seed, iteration[, epoch]), so no random key is carried. The frozen models
are not in it: the reference is rebuilt from the actor's starting weights (it *is* those weights), and reward
sources hold their own.

`RLProgram` holds the actor's and the critic's `TrainProgram`s (the same `make_train_step` as every other
objective: clipping, accumulation, non-finite skipping and the sharded layout come from there) on one mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel, model_graphdef
from internlm2_jax.parallel import ROLLOUT_RULES, state_shardings
from internlm2_jax.train.init_weights import initial_params
from internlm2_jax.train.loop import TrainProgram, build_program, state_classes
from internlm2_jax.train.objectives import Objective
from internlm2_jax.train.optim import OptimizerConfig
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.rl.core import RunningMoments
from internlm2_jax.train.rl.objectives import ppo_actor_objective, ppo_critic_objective
from internlm2_jax.train.state import TrainState, init_train_state
from internlm2_jax.train.step import StepConfig

CRITIC_HEADS = ("fresh", "rm")


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """One trained model of the run: its config, optimizer and starting weights.

    `init_weights` is a model or run directory (the SFT model for the actor; the reward model for the critic, whose
    trunk it then starts from); `params` are weights already in memory (a notebook's model), exclusive with it.
    `head` (critic): "fresh" re-initialises the value head after loading, as the report does ("initialised from the
    reward model excluding the linear head"); "rm" keeps the loaded one (InstructGPT)."""

    model: ModelConfig
    optimizer: OptimizerConfig
    init_weights: str | None = None
    params: Any = dataclasses.field(default=None, compare=False, repr=False)
    head: str = "fresh"

    def __post_init__(self):
        if self.init_weights is not None and self.params is not None:
            raise ValueError("ModelSetup: give init_weights (a directory) or params (in memory), not both")
        if self.head not in CRITIC_HEADS:
            raise ValueError(f"ModelSetup.head={self.head!r}: must be one of {CRITIC_HEADS}")


@flax.struct.dataclass
class RLState:
    actor: TrainState
    critic: TrainState | None  # None for GRPO
    reward_moments: RunningMoments
    kl_coef: jax.Array  # [] fp32: fixed, or the adaptive controller's
    iteration: jax.Array  # [] int32: rollout batches done


@dataclasses.dataclass
class RLProgram:
    mesh: Any
    actor: TrainProgram
    critic: TrainProgram | None
    actor_objective: Objective
    critic_objective: Objective | None
    rollout_params: Callable[[nnx.State], nnx.State] | None  # the jitted reshard for decoding (None: as trained)

    def abstract_state(self) -> RLState:
        """ShapeDtypeStructs with shardings: what a checkpoint is restored onto."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)  # noqa: E731
        return RLState(actor=self.actor.abstract_state,
                       critic=None if self.critic is None else self.critic.abstract_state,
                       reward_moments=RunningMoments(scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.float32)),
                       kl_coef=scalar(jnp.float32), iteration=scalar(jnp.int32))


def build_rl_program(cfg: RLConfig, actor: ModelSetup, critic: ModelSetup | None, mesh,
                     step_cfg: StepConfig = StepConfig()) -> RLProgram:
    if (cfg.algorithm == "ppo") != (critic is not None):
        raise ValueError(f"rl.algorithm={cfg.algorithm!r}: PPO needs a critic ModelSetup and GRPO takes none")
    step_cfg = dataclasses.replace(step_cfg, loss_chunk_size=cfg.chunk_size)
    actor_objective = ppo_actor_objective(cfg.loss, temperature=cfg.rollout.temperature)
    critic_objective = None if critic is None else ppo_critic_objective(cfg.loss.value_clip)
    actor_program = build_program(actor.model, actor.optimizer, step_cfg, mesh, actor_objective)
    critic_program = None if critic is None else build_program(critic.model, critic.optimizer, step_cfg, mesh,
                                                               critic_objective)
    reshard = None
    if cfg.rollout_weights == "gathered":
        reshard = rollout_reshard(actor.model, mesh)
    return RLProgram(mesh, actor_program, critic_program, actor_objective, critic_objective, reshard)


def rollout_reshard(model: ModelConfig, mesh) -> Callable[[nnx.State], nnx.State]:
    """The "weight sync" of RL as one jitted reshard (§2.3): the actor's training weights -> a copy in the compute
    dtype laid out by ROLLOUT_RULES (whole over the data axes, split by tensor parallelism), which rollouts decode
    with. One all-gather per iteration instead of one per layer per generated token; nothing to keep in sync."""
    _, abstract = model_graphdef(model, InternLM2ForCausalLM)
    return jax.jit(to_compute_dtype(model), out_shardings=state_shardings(abstract, mesh, ROLLOUT_RULES))


def to_compute_dtype(model: ModelConfig) -> Callable[[nnx.State], nnx.State]:
    """params -> their floating leaves in the model's compute dtype: frozen and decoding copies (what the forward
    computes in anyway; the fp32 masters stay in the state)."""
    dtype = jnp.dtype(model.dtype)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return lambda params: jax.tree.map(cast, params)


def starting_params(setup: ModelSetup, model_class, mesh, seed: int) -> nnx.State:
    """The setup's weights on the mesh: loaded, given, or (neither) the seed's fresh initialisation."""
    if setup.init_weights is not None:
        return initial_params(setup.init_weights, setup.model, model_class, mesh, seed=seed)
    _, abstract = model_graphdef(setup.model, model_class)
    shardings = state_shardings(abstract, mesh)
    if setup.params is not None:  # a copy: the state's initialisation donates its input, the caller keeps theirs
        return jax.device_put(jax.tree.map(jnp.copy, setup.params), shardings)
    with jax.set_mesh(mesh):
        return jax.jit(lambda: nnx.state(model_class(setup.model, rngs=nnx.Rngs(seed))), out_shardings=shardings)()


def fresh_value_head(params: nnx.State, cfg: ModelConfig, seed: int) -> nnx.State:
    """`params` with the reward model's value head re-initialised (the critic starts from the RM's trunk only)."""
    fresh = nnx.state(InternLM2ForRewardModel(cfg, rngs=nnx.Rngs(seed)))
    flat = dict(nnx.to_flat_state(params))
    for path, var in nnx.to_flat_state(fresh):
        if path[0] == "v_head":
            old = flat[path].get_value()
            flat[path] = flat[path].replace(jax.device_put(var.get_value().astype(old.dtype), old.sharding))
    return nnx.from_flat_state(list(flat.items()))


def init_rl_state(program: RLProgram, cfg: RLConfig, actor: ModelSetup, critic: ModelSetup | None,
                  actor_params: nnx.State | None = None) -> RLState:
    """Iteration 0: the actor from its starting weights (`actor_params` when already loaded; donated), the critic
    from its own (the RM) with a fresh or kept head, fresh optimizers, empty reward moments and the configured KL
    coefficient."""
    mesh = program.mesh
    if actor_params is None:
        actor_params = starting_params(actor, InternLM2ForCausalLM, mesh, cfg.seed)
    actor_state = init_train_state(actor.model, program.actor.tx, mesh, seed=cfg.seed, params=actor_params,
                                   **state_classes(actor.optimizer, program.actor_objective))
    critic_state = None
    if critic is not None:
        params = starting_params(critic, InternLM2ForRewardModel, mesh, cfg.seed + 1)
        if critic.head == "fresh" and (critic.init_weights is not None or critic.params is not None):
            params = fresh_value_head(params, critic.model, cfg.seed + 1)
        critic_state = init_train_state(critic.model, program.critic.tx, mesh, seed=cfg.seed + 1, params=params,
                                        **state_classes(critic.optimizer, program.critic_objective))
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.device_put(x, replicated)  # noqa: E731
    return RLState(actor=actor_state, critic=critic_state, reward_moments=jax.tree.map(put, RunningMoments.init()),
                   kl_coef=put(jnp.float32(cfg.loss.kl_coef)), iteration=put(jnp.int32(0)))


def reference_params(actor: ModelSetup, mesh, seed: int, starting: nnx.State | None = None) -> nnx.State | None:
    """The frozen reference: None under LoRA (the actor with its adapters off is exactly the SFT model, no second
    copy); otherwise the actor's starting weights (`starting` when already loaded, else read again) in the model's
    compute dtype (what its forward computes in)."""
    if actor.model.lora is not None:
        return None
    if starting is None:
        starting = starting_params(actor, InternLM2ForCausalLM, mesh, seed)
    return jax.jit(to_compute_dtype(actor.model))(starting)
