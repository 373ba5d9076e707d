"""InternLM2-7B QLoRA SFT with XTuner's settings (`internlm2_7b_qlora_*_e3` configs): rank 64, alpha 16, dropout 0.1
on every projection of an NF4 (double-quantized) base, AdamW lr 2e-4 with 3% warmup, 2,048-token packed sequences,
16 accumulated micro-batches, gradient clipping at 1.

Only the adapters train (and hold Adam moments). As in XTuner and the QLoRA paper, the frozen embedding, head and
norms sit in bf16 (`param_dtype`) and the adapters, their gradients and Adam moments in fp32 (`lora.adapter_dtype`);
the adapter products run in bf16 like the rest. Compiled for one v5e chip (16 GiB) this step needs 7.44 GiB at
rank 8 (`--set model.lora.rank=8`; 7.30 with bf16 adapters, `--set model.lora.adapter_dtype=None`) and 11.01 GiB
at rank 64 (README, "Fine-tuning"): XTuner's "7B on 8 GB" holds at rank 8, not at its default rank 64.
Check it fits: python -m internlm2_jax.launch experiments/internlm2_7b_qlora.py --compile-only --topology v5e:2x2
Run: --set train.init_weights=<internlm2-7b model dir> --set data.train_files=... --set data.tokenizer=<model dir>
"""

from internlm2_jax.config import LoraConfig, preset
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.run import run_training
from internlm2_jax.train import OptimizerConfig, StepConfig
from internlm2_jax.train.loop import TrainConfig

SEQ, MICRO_BATCHES = 2048, 16
STEPS = 3 * 10_000  # three epochs of ~160K packed sequences at 16 per step


def config() -> Experiment:
    return Experiment(
        name="internlm2_7b_qlora",
        model=preset("internlm2_7b", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat="full",
                     lora=LoraConfig(rank=64, alpha=16.0, dropout=0.1, quantize_base="nf4", adapter_dtype="float32")),
        train=TrainConfig(steps=STEPS, batch_size=MICRO_BATCHES, seq_len=SEQ, log_every=10, checkpoint_every=500,
                          run_dir="runs/internlm2_7b_qlora", init_weights="models/internlm2-7b"),
        optimizer=OptimizerConfig(peak_lr=2e-4, warmup_steps=STEPS * 3 // 100, total_steps=STEPS, min_lr_ratio=0.0,
                                  weight_decay=0.0, clip_norm=1.0, trainable=("lora_",)),
        step=StepConfig(loss_chunk_size=1024, micro_batches=MICRO_BATCHES),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(format="messages", train_files=("data/sft/train.jsonl",),
                        tokenizer="models/internlm2-7b"))


def main(exp: Experiment) -> None:
    run_training(exp)
