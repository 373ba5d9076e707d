"""InternLM2-7B COOL RLHF PPO (report §4.2.2, docs/rlhf.md §1.12): the SFT model as actor and frozen reference, the
conditional reward model scoring under each prompt's domain and seeding the critic's trunk, InternLM2's settings
(beta 0.01 as a k1 reward, lambda 0.99, gamma 1, top-p 0.9, actor lr 1e-6 and critic lr 5e-6 constant, no value
clipping or advantage whitening, 50 critic warm-up iterations, ~500 prompts per iteration) on one fsdp axis.

Check it fits (every phase of an iteration, per-chip memory with what stays resident beside it):
  python -m internlm2_jax.launch experiments/internlm2_7b_ppo.py --compile-only --topology v5p:2x2x2
Run (one process per host): --set train.init_weights=<SFT model dir> --set rl.reward_model=<RM dir>
  --set data.train_files=<prompt JSONL> --set data.tokenizer=<model dir>
"""

from internlm2_jax.config import preset
from internlm2_jax.decode.rollout import RolloutConfig
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.run import run_rl
from internlm2_jax.train import OptimizerConfig, StepConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.rl.core import RLLossConfig

PROMPT, RESPONSE = 1536, 512  # xtuner's 20B recipe: prompts up to 1536 tokens, 512 new


def constant_lr(lr: float) -> OptimizerConfig:  # the report's: constant, clipped at 1 (betas: OpenRLHF's)
    return OptimizerConfig(peak_lr=lr, warmup_steps=0, total_steps=10**6, min_lr_ratio=1.0, weight_decay=0.0,
                           clip_norm=1.0)


def config() -> Experiment:
    return Experiment(
        name="internlm2_7b_ppo",
        model=preset("internlm2_7b", dtype="bfloat16", scan_layers=True, remat="full"),
        train=TrainConfig(seq_len=PROMPT + RESPONSE, run_dir="runs/internlm2_7b_ppo",
                          init_weights="models/internlm2-7b-sft"),
        optimizer=constant_lr(1e-6),
        critic_optimizer=constant_lr(5e-6),
        step=StepConfig(loss_chunk_size=256),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(train_files=("data/rlhf/prompts.jsonl",), tokenizer="models/internlm2-7b-sft"),
        rl=RLConfig(algorithm="ppo", iterations=400, prompts_per_iteration=512,
                    rollout=RolloutConfig(max_new_tokens=RESPONSE, temperature=1.0, top_p=0.9),
                    loss=RLLossConfig(), minibatches=4, critic_warmup_iterations=50, chunk_size=256,
                    checkpoint_every=10, dump_every=10, reward_model="models/internlm2-7b-reward",
                    run_dir="runs/internlm2_7b_ppo"))


def main(exp: Experiment) -> None:
    run_rl(exp)
