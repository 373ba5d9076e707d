"""The standard run of an experiment (`run_training`): its tokenizer, the data of its format, its objective and
configs -> `train.loop.train`, plus the frozen reference that full-parameter DPO-style objectives score every batch
against (`ReferenceLogprobs`, `reference_model`). Experiment files call `run_training` from their `main`.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath

from internlm2_jax.data_formats import data_iterators
from internlm2_jax.experiment import Experiment
from internlm2_jax.model import model_graphdef
from internlm2_jax.overrides import to_dict
from internlm2_jax.parallel import make_mesh
from internlm2_jax.parallel.sequence_layout import CONTIGUOUS, SequenceLayout, sequence_layout
from internlm2_jax.paths import absolute
from internlm2_jax.train.loop import RunResult, train
from internlm2_jax.train.objectives import Objective, sequence_logprobs


def needs_reference_logprobs(exp: Experiment, objective: Objective) -> bool:
    """Full fine-tuning against a reference: its log-probs come with every batch (LoRA: adapters off, in the step)."""
    return objective.reference and exp.model.lora is None


def load_tokenizer(exp: Experiment):
    from internlm2_jax.tokenizer import Tokenizer

    path = epath.Path(exp.data.tokenizer)
    tokenizer = Tokenizer.from_pretrained(path) if path.is_dir() else Tokenizer.from_file(path)
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is "
                         f"{exp.model.vocab_size}")
    return tokenizer


class ReferenceLogprobs:
    """Full-parameter DPO: adds `reference_logps` to every batch of `data`, computed on the mesh by `logprobs` from
    the frozen starting weights (`reference_model`). LoRA DPO needs none of this: its reference is the policy with
    the adapters off, inside the step."""

    def __init__(self, data, logprobs, mesh, layout: SequenceLayout = CONTIGUOUS):
        self.data, self.logprobs, self.mesh, self.layout = data, logprobs, mesh, layout

    def __next__(self):
        from jax.experimental import multihost_utils

        from internlm2_jax.train.loop import to_global_batch

        batch = next(self.data)
        with jax.set_mesh(self.mesh):
            out = self.logprobs(to_global_batch(batch, self.mesh, self.layout))
        batch["reference_logps"] = np.asarray(multihost_utils.global_array_to_host_local_array(
            out, self.mesh, out.sharding.spec))
        return batch

    def __iter__(self):
        return self

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        self.data.set_state(state)

    @property
    def stats(self):
        return self.data.stats


def reference_model(exp: Experiment):
    """(jitted batch -> per-segment reference log-probs, mesh): the run's `init_weights`, else its seed's init."""
    from flax import nnx

    from internlm2_jax.model import InternLM2ForCausalLM
    from internlm2_jax.parallel import state_shardings
    from internlm2_jax.train.init_weights import initial_params

    mesh = make_mesh(exp.mesh)
    graphdef, abstract = model_graphdef(exp.model)
    if exp.train.init_weights:
        params = initial_params(exp.train.init_weights, exp.model, InternLM2ForCausalLM, mesh, seed=exp.train.seed)
    else:
        with jax.set_mesh(mesh):
            params = jax.jit(lambda: nnx.state(InternLM2ForCausalLM(exp.model, rngs=nnx.Rngs(exp.train.seed))),
                             out_shardings=state_shardings(abstract, mesh))()
    chunk = exp.step.loss_chunk_size
    jitted = jax.jit(lambda p, b: sequence_logprobs(nnx.merge(graphdef, p), b, chunk_size=chunk)[0])
    return (lambda batch: jitted(params, batch)), mesh


def run_training(exp: Experiment, *, progress: bool = True) -> RunResult:
    """The standard run of an experiment: tokenizer, data of its format, objective, configs -> `train`."""
    tokenizer = load_tokenizer(exp)
    data, eval_batches, data_hash = data_iterators(exp, tokenizer)
    objective = exp.objective.build()
    if needs_reference_logprobs(exp, objective):
        logprobs, mesh = reference_model(exp)
        layout = sequence_layout(exp.model.context_parallel, mesh)
        data = ReferenceLogprobs(data, logprobs, mesh, layout)
        if eval_batches is not None:
            plain_eval = eval_batches
            eval_batches = lambda: ReferenceLogprobs(iter(plain_eval()), logprobs, mesh, layout)  # noqa: E731
    metadata = {"experiment": to_dict(exp), "tokenizer_sha256": tokenizer.sha256, "manifest_hash": data_hash,
                "tokenizer_path": str(absolute(exp.data.tokenizer))}
    result = train(exp.model, exp.optimizer, exp.step, exp.mesh, exp.train, data, metadata=metadata,
                   eval_batches=eval_batches, progress=progress, objective=objective)
    stats = data.log_stats() if hasattr(data, "log_stats") else data.stats
    (epath.Path(exp.train.run_dir) / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
    return result


def rl_setups(exp: Experiment):
    """(actor, critic or None) `ModelSetup`s of an RL experiment: the actor from `train.init_weights` (the SFT
    model); the critic (PPO) from `rl.reward_model` when given (the report's critic: the RM's trunk, a fresh value
    head), else from the SFT model's trunk."""
    from internlm2_jax.train.rl.state import ModelSetup

    if exp.rl is None:
        raise ValueError(f"experiment {exp.name!r} has no rl config")
    actor = ModelSetup(exp.model, exp.optimizer, init_weights=exp.train.init_weights)
    if exp.rl.algorithm != "ppo":
        return actor, None
    return actor, ModelSetup(exp.model, exp.critic_optimizer,
                             init_weights=exp.rl.reward_model or exp.train.init_weights)


def run_rl(exp: Experiment, *, reward=None, gold=None, ptx=None, progress: bool = True):
    """The standard online RL run of an experiment (`rl` set): prompts from `data.train_files` (prompt JSONL,
    `data.default_domain` for records without one), scored by `reward` (a reward source, `train.rl.rewards`) or,
    when None, by the conditional reward model at `rl.reward_model`; `gold` and `ptx` as `train_rl` takes them."""
    from internlm2_jax.artifacts import load_model
    from internlm2_jax.data.prompts import PromptDataIterator
    from internlm2_jax.experiment import rl_prompt_width
    from internlm2_jax.train.rl.loop import train_rl
    from internlm2_jax.train.rl.rewards import ConditionalRMReward

    tokenizer = load_tokenizer(exp)
    cfg = exp.rl
    prompts = PromptDataIterator(list(exp.data.train_files), tokenizer, rl_prompt_width(exp),
                                 cfg.prompts_per_iteration, default_domain=exp.data.default_domain, seed=cfg.seed,
                                 strict=exp.data.strict)
    if reward is None:
        if cfg.reward_model is None:
            raise ValueError("rl.reward_model: no reward source given and no reward model to score with")
        from flax import nnx

        _, rm, _ = load_model(cfg.reward_model, mesh=make_mesh(exp.mesh))
        reward = ConditionalRMReward(*nnx.split(rm), tokenizer, prompts.domains,
                                     default_domain=exp.data.default_domain)
    actor, critic = rl_setups(exp)
    metadata = {"experiment": to_dict(exp), "tokenizer_sha256": tokenizer.sha256,
                "prompts_sha256": prompts.data_sha256, "tokenizer_path": str(absolute(exp.data.tokenizer))}
    return train_rl(cfg, actor, prompts, reward, critic=critic, ptx=ptx, gold=gold, mesh_cfg=exp.mesh,
                    step_cfg=exp.step, pad_id=tokenizer.pad_id, tokenizer=tokenizer, metadata=metadata,
                    progress=progress)
