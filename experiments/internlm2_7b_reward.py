"""InternLM2-7B conditional reward model (spec §7.1): initialised from the chat-SFT model, one epoch over binarized
preference pairs with domain system prompts, chosen and rejected packed into 4K rows, focal ranking loss + 0.02 x log
barrier. Learning rate, betas, warmup and packed length follow XTuner's open reward config (2e-5, (0.9, 0.999),
3%, 4096): the report does not give its own.

Check it fits: python -m internlm2_jax.launch experiments/internlm2_7b_reward.py --compile-only --topology v5p:2x2x2
Run (one process per host): --set train.init_weights=<internlm2-chat-7b-sft model dir> --set data.train_files=...
--set data.tokenizer=<model dir> --set train.steps=<pairs / (rows x max_pairs)>
"""

from internlm2_jax.config import preset
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.objectives import RewardObjective

SEQ, ROWS = 4096, 256
STEPS = 2_400_000 // (ROWS * 4)  # 2.4M pairs (the released RMs' data), ~4 pairs per packed 4K row, one epoch


def config() -> Experiment:
    return Experiment(
        name="internlm2_7b_reward",
        model=preset("internlm2_7b", dtype="bfloat16", scan_layers=True, remat="full"),
        train=TrainConfig(steps=STEPS, batch_size=ROWS, seq_len=SEQ, log_every=10, checkpoint_every=500,
                          run_dir="runs/internlm2_7b_reward", init_weights="models/internlm2-chat-7b-sft"),
        optimizer=OptimizerConfig(peak_lr=2e-5, warmup_steps=STEPS * 3 // 100, total_steps=STEPS, b2=0.999,
                                  weight_decay=0.0, min_lr_ratio=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(format="pairs", train_files=("data/preferences/train.jsonl",),
                        tokenizer="models/internlm2-chat-7b-sft", max_pairs=8),
        objective=RewardObjective(penalty_weight=0.02))


def main(exp: Experiment) -> None:
    run_training(exp)
