"""GRPO on CPU beats the SFT ceiling: `ppo_tiny`'s task and SFT policy, no critic (docs/rlhf.md §1.10, §3.6 item 2).

Each of the 16 prompts of an iteration is answered 4 times; a sample's advantage is its doctest reward against its
group's mean and standard deviation, the KL to the SFT model is DeepSeekMath's k3 in the loss (beta 0.04). The SFT
stage (noisy demonstrations, held-out pass@1 about 0.5) is `ppo_tiny`'s, shared and run once; the report
(`runs/grpo_tiny/rl_report.json` and `.md`) gives held-out pass@1 before and after and the mean per-token KL to SFT.

Run: python -m internlm2_jax.launch experiments/grpo_tiny.py
"""

import dataclasses
from pathlib import Path

from internlm2_jax.decode.rollout import RolloutConfig
from internlm2_jax.experiment import Experiment, load_experiment
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.rl.core import RLLossConfig

RUN = Path("runs/grpo_tiny")
PPO = load_experiment(Path(__file__).with_name("ppo_tiny.py"))


def config() -> Experiment:
    """`ppo_tiny`'s SFT stage (shared), and the GRPO run from it (`--set rl.iterations=10` reaches it)."""
    return dataclasses.replace(PPO.config(), rl=rl_config(), critic_optimizer=None)


def rl_config(run_dir: Path = RUN) -> RLConfig:
    return RLConfig(
        algorithm="grpo", iterations=40, prompts_per_iteration=16,
        rollout=RolloutConfig(max_new_tokens=PPO.MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, samples_per_prompt=4),
        loss=RLLossConfig.grpo(),  # beta 0.04, k3 in the loss, seq-mean-token-mean, group std (Bessel)
        ppo_epochs=2, minibatches=2, log_every=1, checkpoint_every=20, dump_every=10, run_dir=str(run_dir))


def main(exp: Experiment) -> None:
    PPO.run_rl(exp, exp.rl, critic=False)
