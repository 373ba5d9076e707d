"""InternLM2-7B GRPO (DeepSeekMath's critic-free variant, docs/rlhf.md §1.10): 64 prompts x 8 samples per iteration,
group-normalised advantages of the conditional reward model's scores, k3 KL to the SFT model in the loss (beta
0.04), lr 1e-6, on one fsdp axis.

Check it fits: python -m internlm2_jax.launch experiments/internlm2_7b_grpo.py --compile-only --topology v5p:2x2x2
Run: as experiments/internlm2_7b_ppo.py (train.init_weights, rl.reward_model, data.train_files, data.tokenizer).
"""

import dataclasses
from pathlib import Path

from internlm2_jax.experiment import Experiment, load_experiment
from internlm2_jax.run import run_rl
from internlm2_jax.train.rl.core import RLLossConfig

PPO = load_experiment(Path(__file__).with_name("internlm2_7b_ppo.py"))


def config() -> Experiment:
    ppo = PPO.config()
    rl = dataclasses.replace(ppo.rl, algorithm="grpo", prompts_per_iteration=64, loss=RLLossConfig.grpo(),
                             rollout=dataclasses.replace(ppo.rl.rollout, samples_per_prompt=8),
                             critic_warmup_iterations=0, run_dir="runs/internlm2_7b_grpo")
    return dataclasses.replace(ppo, name="internlm2_7b_grpo", rl=rl, critic_optimizer=None,
                               train=dataclasses.replace(ppo.train, run_dir="runs/internlm2_7b_grpo"))


def main(exp: Experiment) -> None:
    run_rl(exp)
