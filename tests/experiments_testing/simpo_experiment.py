"""An experiment that brings its own objective and data format, registered here and not in the library: SimPO
(Meng et al. 2024) trained on preference pairs generated at start-up. tests/test_registries.py runs it through the
launcher; it is also a template for adding an objective or a format.

SimPO's per-pair loss: -log sigmoid(beta / |y_w| log p(y_w) - beta / |y_l| log p(y_l) - gamma), length-normalised
log-probabilities of the chosen (w) and rejected (l) responses, with no reference model.

Run: python -m internlm2_jax.launch tests/experiments_testing/simpo_experiment.py [--set objective.gamma=1.0]
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.data.conversations import PairDataIterator
from internlm2_jax.recipes.finetune_data import doctest_pairs, train_finetune_tokenizer, write_jsonl
from internlm2_jax.data_formats import host_rows, register_data_format
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.objectives import Objective, pair_mean_logprobs, pair_metrics
from internlm2_jax.train.registry import register_objective

RUN = Path("runs/simpo")
PAIRS = 64


@dataclasses.dataclass(frozen=True)
class SimPOObjective:
    beta: float = 2.0
    gamma: float = 0.5  # the target reward margin
    name: str = dataclasses.field(default="simpo", init=False)

    def build(self) -> Objective:
        beta, gamma = self.beta, self.gamma

        def loss(graphdef, params, batch, rng, chunk_size):
            chosen, rejected = pair_mean_logprobs(nnx.merge(graphdef, params), batch, chunk_size=chunk_size, rng=rng)
            mask = batch["pair_mask"].astype(jnp.float32)
            per_pair = -jax.nn.log_sigmoid(beta * (chosen - rejected) - gamma)
            return jnp.sum(mask * per_pair), jnp.sum(mask), pair_metrics(beta * chosen, beta * rejected, mask)

        return Objective("simpo", loss, count_name="pairs", rows="policy_pairs")


def synthetic_pairs(exp: Experiment, tokenizer):
    """A data format that reads no files: doctest preference pairs generated from the seed, rendered for a policy."""
    rows, processes = host_rows(exp)
    path = write_jsonl(doctest_pairs(PAIRS, seed=exp.train.seed), Path(exp.train.run_dir) / "data/train.jsonl")
    data = PairDataIterator([path], tokenizer, exp.train.seq_len, rows, kind="dpo", max_pairs=exp.data.max_pairs,
                            seed=exp.train.seed, strict=exp.data.strict, **processes)
    return data, None, f"synthetic_pairs:{data.data_sha256}"


register_objective("simpo", SimPOObjective)
register_data_format("synthetic_pairs", synthetic_pairs, rows=("policy_pairs",))


def config() -> Experiment:
    return Experiment(
        name="simpo",
        model=preset("tiny", vocab_size=1024, max_position_embeddings=512),
        train=TrainConfig(steps=4, batch_size=8, seq_len=512, log_every=2, checkpoint_every=4, run_dir=str(RUN)),
        optimizer=OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=4, weight_decay=0.0),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(format="synthetic_pairs", tokenizer=str(RUN / "tokenizer.model"), max_pairs=2),
        objective="simpo")


def main(exp: Experiment) -> None:
    if not Path(exp.data.tokenizer).exists():
        train_finetune_tokenizer(doctest_pairs(PAIRS, seed=0), exp.model.vocab_size, exp.data.tokenizer)
    result = run_training(exp)
    print(json.dumps({"final_step": result.final_step, "losses": result.losses}))
