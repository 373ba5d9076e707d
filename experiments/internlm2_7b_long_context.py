"""InternLM2-7B phase 2 (spec §5.4): continue the 4K run at 32K context with RoPE base 1,000,000 and a long-context
data mixture; weights, optimizer moments and the step count carry over from the phase-1 run (`train.init_from`).

python -m internlm2_jax.launch experiments/internlm2_7b_long_context.py --compile-only --topology v5p:4x4x4
"""

import dataclasses
from pathlib import Path

from internlm2_jax.experiment import DataConfig, Experiment, load_experiment

from internlm2_jax.run import run_training
from internlm2_jax.train.loop import TrainConfig

SEQ, BATCH_TOKENS, EXTRA_STEPS = 32768, 4 * 1024 * 1024, 50_000


def config() -> Experiment:
    phase1 = load_experiment(Path(__file__).with_name("internlm2_7b_pretrain.py")).config()
    steps = phase1.train.steps + EXTRA_STEPS
    return dataclasses.replace(
        phase1, name="internlm2_7b_long_context",
        model=phase1.model.replace(rope_theta=1_000_000.0, max_position_embeddings=SEQ),
        train=TrainConfig(steps=steps, batch_size=BATCH_TOKENS // SEQ, seq_len=SEQ, log_every=10,
                          checkpoint_every=500, run_dir="runs/internlm2_7b_long_context",
                          init_from=phase1.train.run_dir),
        optimizer=dataclasses.replace(phase1.optimizer, total_steps=steps),
        data=DataConfig(manifest="data/internlm2_long_context/manifest.json", tokenizer=phase1.data.tokenizer))


def main(exp: Experiment) -> None:
    run_training(exp)
