"""InternLM2-1.8B phase-1 pretraining (spec §5.4): 4K context, 4M-token batches, RoPE base 50,000, on a TPU pod.

Check it fits before you spend a pod: python -m internlm2_jax.launch experiments/internlm2_1_8b_pretrain.py
  --compile-only --topology v5p:4x4x4
Run (one process per host): --set data.manifest=... --set data.tokenizer=... --set train.run_dir=gs://...
"""

from internlm2_jax.config import preset
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train import OptimizerConfig, StepConfig
from internlm2_jax.train.loop import TrainConfig

SEQ, BATCH_TOKENS, STEPS = 4096, 4 * 1024 * 1024, 500_000  # ~2T tokens; the 32K phase takes ~9% more steps


def config() -> Experiment:
    return Experiment(
        name="internlm2_1_8b_pretrain",
        model=preset("internlm2_1_8b", rope_theta=50_000.0, dtype="bfloat16", scan_layers=True, remat="full"),
        train=TrainConfig(steps=STEPS, batch_size=BATCH_TOKENS // SEQ, seq_len=SEQ, log_every=10,
                          checkpoint_every=1000, run_dir="runs/internlm2_1_8b_pretrain"),
        optimizer=OptimizerConfig(peak_lr=3e-4, warmup_steps=2000, total_steps=STEPS),
        step=StepConfig(loss_chunk_size=1024),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(manifest="data/internlm2_pretrain/manifest.json",
                        tokenizer="tokenizers/internlm2_tokenizer.model"))


def main(exp: Experiment) -> None:
    run_training(exp)
