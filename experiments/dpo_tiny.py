"""DPO with LoRA on CPU: the `sft_tiny` policy learns to prefer code that passes its doctest over code that fails it.

The reference is the policy with its adapters switched off, so no second copy of the weights exists; chosen and
rejected answers are packed into one row as separate segments. The report compares how often the policy gives the
passing implementation the higher log-probability on held-out pairs, before and after.

Run: python -m internlm2_jax.launch experiments/dpo_tiny.py   (runs experiments/sft_tiny.py first if needed)
"""

import json
from pathlib import Path

from internlm2_jax.config import LoraConfig, preset
from internlm2_jax.recipes.finetune_data import doctest_pairs, write_jsonl
from internlm2_jax.experiment import DataConfig, Experiment, load_experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.objectives import DPOObjective

RUN = Path("runs/dpo_tiny")
SFT = load_experiment(Path(__file__).with_name("sft_tiny.py"))


def config() -> Experiment:
    return Experiment(
        name="dpo_tiny",
        model=preset("tiny", vocab_size=1024, max_position_embeddings=512,
                     lora=LoraConfig(rank=8, alpha=16.0, dropout=0.05)),
        train=TrainConfig(steps=100, batch_size=8, seq_len=512, log_every=10, checkpoint_every=50, run_dir=str(RUN),
                          init_weights=str(SFT.RUN)),
        optimizer=OptimizerConfig(peak_lr=5e-3, warmup_steps=5, total_steps=100, weight_decay=0.0,
                                  trainable=("lora_",)),
        mesh=MeshConfig(fsdp=-1),  # every device there is
        data=DataConfig(format="pairs", train_files=(str(RUN / "data/train.jsonl"),),
                        heldout_files=(str(RUN / "data/heldout.jsonl"),), tokenizer=str(SFT.DATA / "tokenizer.model"),
                        max_pairs=4, eval_batches=16),
        objective=DPOObjective(beta=0.1))


def preference_rate(model, exp: Experiment) -> float:
    """Fraction of held-out pairs where the policy's log-probability of the chosen answer beats the rejected one."""
    import numpy as np

    from internlm2_jax.data.conversations import PairDataIterator
    from internlm2_jax.tokenizer import Tokenizer
    from internlm2_jax.train.objectives import pair_values, sequence_logprobs

    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    wins = total = 0
    for batch in PairDataIterator(exp.data.heldout_files, tokenizer, exp.train.seq_len, 8, kind="dpo",
                                  max_pairs=exp.data.max_pairs, shuffle=False, repeat=False):
        logps, _ = sequence_logprobs(model, batch)
        chosen, rejected = (np.asarray(x) for x in pair_values(logps))
        wins += float(np.sum(batch["pair_mask"] * (chosen > rejected)))
        total += float(np.sum(batch["pair_mask"]))
    return wins / max(total, 1.0)


def main(exp: Experiment) -> None:
    from internlm2_jax.artifacts import load_run

    if not (SFT.RUN / "checkpoints").exists():
        SFT.main(SFT.config())
    write_jsonl(doctest_pairs(800, seed=2), RUN / "data/train.jsonl")
    write_jsonl(doctest_pairs(200, seed=3), RUN / "data/heldout.jsonl")
    before = preference_rate(load_run(SFT.RUN)[1], exp)
    result = run_training(exp)
    after = preference_rate(load_run(result.run_dir)[1], exp)  # adapters merged by load_run
    report = {"preference_rate_before": before, "preference_rate_after": after, **(result.eval or {})}
    (result.run_dir / "dpo_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"held-out pairs where the policy prefers the passing code: {before:.3f} -> {after:.3f}")
