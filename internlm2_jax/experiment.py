"""The experiment schema: what an experiment file's `config()` returns (`Experiment`: model, train, optimizer, step,
mesh, data and objective configs, and for online RL the `rl` config), and how the launcher loads such a file.

`--set path=value` overrides (`overrides.apply_overrides`) change any field of it; the objective and data format are
found by name in their registries (`train.registry`, `data_formats`), so an experiment file can add its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from internlm2_jax.config import ModelConfig
from internlm2_jax.data_formats import DATA_FORMATS, data_format
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.objectives import ObjectiveConfig
from internlm2_jax.train.optim import OptimizerConfig
from internlm2_jax.train.registry import objective_config
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.step import StepConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    manifest: str = ""  # pretraining data manifest (see internlm2_jax.data.manifest)
    heldout_manifest: str = ""  # optional: evaluated at the end of the run
    tokenizer: str = ""  # a SentencePiece .model file or a model directory
    strict: bool = False  # raise on the first bad record instead of counting and skipping it
    eval_batches: int = 16
    # A registered data format (data_formats): "pretrain" (the manifest above), "messages" / "alpaca" SFT JSONL or
    # "pairs" preference JSONL (data.conversations), or one an experiment file registers.
    format: str = "pretrain"
    train_files: tuple[str, ...] = ()
    # The train files' shares of the examples drawn, one per file (empty: every record once per pass, so each file
    # counts by its size); a file with a large weight and few records is repeated (data.conversations).
    train_weights: tuple[float, ...] = ()
    heldout_files: tuple[str, ...] = ()
    max_pairs: int = 8  # preference pairs per row
    default_domain: str | None = None  # reward model: the domain of records that name none

    def __post_init__(self):
        data_format(self.format)  # raises naming the registered formats
        if self.format != "pretrain" and self.manifest:
            raise ValueError(f"data.format={self.format!r} reads data.train_files; data.manifest is for pretraining")
        if self.train_weights and len(self.train_weights) != len(self.train_files):
            raise ValueError(f"data.train_weights has {len(self.train_weights)} entries for {len(self.train_files)} "
                             "data.train_files: give one weight per file, or none")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    model: ModelConfig
    train: TrainConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    step: StepConfig = StepConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    # A registered objective's name ("lm", "reward", "dpo", "orpo", ...: its default config) or its config, e.g.
    # DPOObjective(beta=0.1). Always a config after construction, so `--set objective.beta=0.2` reaches it.
    objective: str | ObjectiveConfig = "lm"
    # Online RL (`run.run_rl`): the actor is `model` with `optimizer`, started from `train.init_weights` (the SFT
    # model); the critic (PPO) has `critic_optimizer`; rows are `train.seq_len` tokens (prompts up to seq_len -
    # rl.rollout.max_new_tokens), prompts come from `data.train_files` (`data.prompts` JSONL).
    rl: RLConfig | None = None
    critic_optimizer: OptimizerConfig | None = None

    def __post_init__(self):
        if self.rl is not None:
            if self.train.seq_len <= self.rl.rollout.max_new_tokens:
                raise ValueError(f"train.seq_len={self.train.seq_len} must exceed rl.rollout.max_new_tokens="
                                 f"{self.rl.rollout.max_new_tokens}: an RL row is the prompt and its response")
            if self.rl.algorithm == "ppo" and self.critic_optimizer is None:
                raise ValueError("rl.algorithm='ppo' needs critic_optimizer (the report: lr 5e-6 beside the actor's "
                                 "1e-6)")
        objective = objective_config(self.objective)
        object.__setattr__(self, "objective", objective)  # frozen: the name is resolved once, here
        rows = objective.build().rows
        if rows not in data_format(self.data.format).rows:
            fitting = [name for name in DATA_FORMATS.names() if rows in data_format(name).rows]
            raise ValueError(f"objective={objective.name!r} does not go with data.format={self.data.format!r}: it "
                             f"trains on {rows} rows, which {', '.join(fitting) or 'no registered format'} give")


def load_experiment(path: str | Path):
    """The module of an experiment file (it must define `config() -> Experiment`; `main(experiment)` to run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise AttributeError(f"{path} must define config() -> Experiment")
    return module


def rl_prompt_width(exp: Experiment) -> int:
    """The prompt width of an RL experiment's rows: `train.seq_len` less the response tokens."""
    return exp.train.seq_len - exp.rl.rollout.max_new_tokens
