"""Pretrain the `tiny` preset on the embedded stdlib corpus on CPU in about a minute: the smallest real run.

Run: python -m internlm2_jax.launch experiments/pretrain_tiny.py --set train.steps=100   (one device, or all there are)
     python -m internlm2_jax.launch experiments/pretrain_tiny.py --cpu-devices 8 --set mesh.data=2   (a 2x4 mesh)
"""

from pathlib import Path

from internlm2_jax.config import preset
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.recipes.stdlib_data import prepare_stdlib_dataset
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig

RUN = Path("runs/pretrain_tiny")


def config() -> Experiment:
    return Experiment(
        name="pretrain_tiny",
        model=preset("tiny", vocab_size=1024),
        train=TrainConfig(steps=60, batch_size=8, seq_len=64, log_every=5, checkpoint_every=20, run_dir=str(RUN)),
        optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=6, total_steps=60),
        mesh=MeshConfig(fsdp=-1),  # every device there is (a 2x4 mesh: --cpu-devices 8 --set mesh.data=2)
        data=DataConfig(manifest=str(RUN / "data/train/manifest.json"),
                        heldout_manifest=str(RUN / "data/heldout/manifest.json"),
                        tokenizer=str(RUN / "data/tokenizer.model"), eval_batches=4))


def main(exp: Experiment) -> None:
    data_dir = Path(exp.data.tokenizer).parent
    if not (data_dir / "train" / "manifest.json").exists():
        prepare_stdlib_dataset(data_dir, exp.model.vocab_size, train_bytes=1_500_000, heldout_bytes=100_000)
    result = run_training(exp)
    heldout = f"held-out loss {result.eval['eval_loss']:.3f}; " if result.eval else ""
    print(f"step {result.final_step}: {heldout}{result.run_dir}/loss_curve.png")
