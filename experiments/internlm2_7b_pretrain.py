"""InternLM2-7B phase-1 pretraining: the 1.8B recipe (4K context, 4M-token batches, RoPE base 50,000) at 7B.

python -m internlm2_jax.launch experiments/internlm2_7b_pretrain.py --compile-only --topology v5p:4x4x4
"""

import dataclasses
from pathlib import Path

from internlm2_jax.config import preset
from internlm2_jax.experiment import Experiment, load_experiment
from internlm2_jax.run import run_training


def config() -> Experiment:
    recipe = load_experiment(Path(__file__).with_name("internlm2_1_8b_pretrain.py")).config()
    return dataclasses.replace(
        recipe, name="internlm2_7b_pretrain",
        model=preset("internlm2_7b", rope_theta=50_000.0, dtype="bfloat16", scan_layers=True, remat="full"),
        train=dataclasses.replace(recipe.train, run_dir="runs/internlm2_7b_pretrain"))


def main(exp: Experiment) -> None:
    run_training(exp)
