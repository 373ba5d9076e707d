"""InternLM2-7B SFT (spec §6.2): one epoch over ~10M ChatML conversations at AdamW lr 4e-5, from the base model.

The recipe's numbers are the report's; the batch (4M tokens of packed conversations) and the 2% warmup are ours.
Check it fits: python -m internlm2_jax.launch experiments/internlm2_7b_sft.py --compile-only --topology v5p:4x4x4
Run (one process per host): --set train.init_weights=<internlm2-7b model dir> --set data.train_files=... --set
data.tokenizer=<model dir> --set train.steps=<conversations * mean length / batch tokens>
"""

from internlm2_jax.config import preset
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train import OptimizerConfig, StepConfig
from internlm2_jax.train.loop import TrainConfig

SEQ, BATCH_TOKENS = 32768, 4 * 1024 * 1024
STEPS = 10_000_000 * 1_500 // BATCH_TOKENS  # 10M conversations of ~1.5K tokens, one epoch


def config() -> Experiment:
    return Experiment(
        name="internlm2_7b_sft",
        model=preset("internlm2_7b", dtype="bfloat16", scan_layers=True, remat="full"),
        train=TrainConfig(steps=STEPS, batch_size=BATCH_TOKENS // SEQ, seq_len=SEQ, log_every=10,
                          checkpoint_every=500, run_dir="runs/internlm2_7b_sft", init_weights="models/internlm2-7b"),
        optimizer=OptimizerConfig(peak_lr=4e-5, warmup_steps=STEPS // 50, total_steps=STEPS, min_lr_ratio=0.0,
                                  weight_decay=0.0),
        step=StepConfig(loss_chunk_size=2048),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(format="messages", train_files=("data/sft/train.jsonl",),
                        tokenizer="models/internlm2-7b"))


def main(exp: Experiment) -> None:
    run_training(exp)
