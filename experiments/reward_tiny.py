"""A tiny conditional reward model (COOL RLHF, spec §7.1) on CPU in a couple of minutes.

Two kinds of preference, both learnable: code whose doctest passes over code whose doctest fails (checked by running
them), and pairs whose preference depends on the domain (the helpful system prompt prefers the detailed answer, the
harmless one the refusal). The report at the end: held-out pairwise accuracy per domain, how often the held-out
margin flips sign with the system prompt, score histograms per domain (PNG), and an HF export that reloads exactly.

Run: python -m internlm2_jax.launch experiments/reward_tiny.py [--set train.steps=300]
"""

import json
from pathlib import Path

from internlm2_jax.config import preset
from internlm2_jax.recipes.finetune_data import (conditional_pairs, doctest_pairs, train_finetune_tokenizer,
                                                 write_jsonl)
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.objectives import RewardObjective

RUN = Path("runs/reward_tiny")
DATA = RUN / "data"


def config() -> Experiment:
    return Experiment(
        name="reward_tiny",
        model=preset("tiny", vocab_size=1024, max_position_embeddings=512),
        train=TrainConfig(steps=160, batch_size=8, seq_len=512, log_every=10, checkpoint_every=80,
                          run_dir=str(RUN)),
        # XTuner's RM recipe scaled down: AdamW, no weight decay, short warmup.
        optimizer=OptimizerConfig(peak_lr=2e-3, warmup_steps=10, total_steps=160, weight_decay=0.0, b2=0.999),
        mesh=MeshConfig(fsdp=-1),  # every device there is
        data=DataConfig(format="pairs", train_files=(str(DATA / "train.jsonl"),),
                        heldout_files=(str(DATA / "heldout.jsonl"),), tokenizer=str(DATA / "tokenizer.model"),
                        max_pairs=4, eval_batches=64),
        objective=RewardObjective(penalty_weight=0.02))


def prepare_data(vocab_size: int, data_dir: Path = DATA) -> None:
    """Train/held-out JSONL (held-out pairs never seen in training) and a tokenizer that knows both."""
    train = doctest_pairs(1200, seed=0) + conditional_pairs(1200, seed=0)
    seen = {(r["prompt"], r["chosen"], r["rejected"]) for r in train}
    heldout = [r for r in doctest_pairs(300, seed=1) + conditional_pairs(300, seed=1)
               if (r["prompt"], r["chosen"], r["rejected"]) not in seen]
    write_jsonl(train, data_dir / "train.jsonl")
    write_jsonl(heldout, data_dir / "heldout.jsonl")
    train_finetune_tokenizer(train[::4], vocab_size, data_dir / "tokenizer.model")


def heldout_scores(model, tokenizer, records: list[dict]) -> dict:
    """The held-out numbers of a reward model on preference `records`: pairwise accuracy (overall and per domain),
    how often the margin of a detailed answer over a refusal flips sign with the domain prompt (positive under
    helpful, negative under harmless), the mean margins, and the scores themselves (`chosen`, `rejected`, `domains`:
    arrays)."""
    import numpy as np

    from internlm2_jax.data.conversations import preference_pair
    from internlm2_jax.decode.reward import score

    pairs = [preference_pair(r) for r in records]
    chosen = score(model, tokenizer, [p + c for _, p, c, _ in pairs], domain=[d for d, *_ in pairs])
    rejected = score(model, tokenizer, [p + r for _, p, _, r in pairs], domain=[d for d, *_ in pairs])
    domains = np.array([d for d, *_ in pairs])
    out = {"heldout_pairs": len(pairs), "accuracy": float(np.mean(chosen > rejected)),
           "accuracy_by_domain": {str(d): float(np.mean((chosen > rejected)[domains == d]))
                                  for d in sorted(set(domains))}}
    # Conditioning: the same held-out (prompt, detailed, refusal) under both system prompts.
    conditional = [(p, c, r) if d == "helpful" else (p, r, c) for d, p, c, r in pairs if d in ("helpful", "harmless")]
    margins = {}
    for domain in ("helpful", "harmless"):
        detailed = score(model, tokenizer, [p + c for p, c, _ in conditional], domain=domain)
        refusal = score(model, tokenizer, [p + r for p, _, r in conditional], domain=domain)
        margins[domain] = detailed - refusal
    out["conditional_flip_rate"] = float(np.mean((margins["helpful"] > 0) & (margins["harmless"] < 0)))
    out["mean_margin_detailed_minus_refusal"] = {d: float(np.mean(m)) for d, m in margins.items()}
    return {**out, "chosen": chosen, "rejected": rejected, "domains": domains}


def heldout_records(exp: Experiment) -> list[dict]:
    return [json.loads(line) for line in open(exp.data.heldout_files[0], encoding="utf-8")]


def report(exp: Experiment, run_dir: Path) -> dict:
    """Held-out accuracy per domain, the conditioning flip rate, histograms, and the HF export round trip."""
    import numpy as np

    from internlm2_jax.convert import load_pretrained, save_pretrained
    from internlm2_jax.data.conversations import preference_pair
    from internlm2_jax.decode.reward import score
    from internlm2_jax.tokenizer import Tokenizer
    from internlm2_jax.artifacts import load_run

    _, model, _ = load_run(run_dir)
    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    records = heldout_records(exp)
    out = heldout_scores(model, tokenizer, records)
    chosen, rejected, domains = (out.pop(key) for key in ("chosen", "rejected", "domains"))
    plot_histograms(chosen, rejected, domains, run_dir / "score_histograms.png")
    # HF export (InternLM2ForRewardModel, v_head) and back: bit-exact scores.
    pairs = [preference_pair(r) for r in records[:32]]
    save_pretrained(model, run_dir / "hf", tokenizer=tokenizer)
    _, again = load_pretrained(run_dir / "hf")
    out["hf_round_trip_exact"] = bool(np.array_equal(
        score(again, tokenizer, [p + c for _, p, c, _ in pairs], domain=[d for d, *_ in pairs]), chosen[:32]))
    (run_dir / "reward_report.json").write_text(json.dumps(out, indent=2))
    return out


def stage(exp: Experiment, *, progress: bool = True) -> dict:
    """Data (once), the held-out numbers of the reward model the run starts from (its seed's weights, a fresh value
    head), training, the numbers after: what `make demo` shows of this experiment."""
    from flax import nnx

    from internlm2_jax.artifacts import load_run
    from internlm2_jax.model import InternLM2ForRewardModel
    from internlm2_jax.tokenizer import Tokenizer

    if not Path(exp.data.tokenizer).exists():
        prepare_data(exp.model.vocab_size, Path(exp.data.tokenizer).parent)
    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    records = heldout_records(exp)

    def numbers(model) -> dict:
        return {k: v for k, v in heldout_scores(model, tokenizer, records).items()
                if k not in ("chosen", "rejected", "domains")}

    before = numbers(InternLM2ForRewardModel(exp.model, rngs=nnx.Rngs(exp.train.seed)))
    result = run_training(exp, progress=progress)
    after = numbers(load_run(result.run_dir)[1])
    out = {"steps": result.final_step, "before": before, "after": after}
    (result.run_dir / "reward_stage.json").write_text(json.dumps(out, indent=2))
    return out


def plot_histograms(chosen, rejected, domains, path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no global backend switch under a notebook

    names = sorted(set(domains))
    fig = Figure(figsize=(4 * len(names), 3))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.hist(chosen[domains == name], bins=30, alpha=0.6, label="chosen")
        ax.hist(rejected[domains == name], bins=30, alpha=0.6, label="rejected")
        ax.set_title(f"{name}: held-out scores")
        ax.set_xlabel("reward")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(exp: Experiment) -> None:
    before = stage(exp)["before"]
    out = report(exp, Path(exp.train.run_dir))
    print(json.dumps(out, indent=2))
    print(f"held-out pairwise accuracy {before['accuracy']:.3f} -> {out['accuracy']:.3f} (chance 0.5); conditional "
          f"flip rate {before['conditional_flip_rate']:.3f} -> {out['conditional_flip_rate']:.3f}; "
          f"{exp.train.run_dir}/score_histograms.png")
