"""`make demo`: the whole chain on the embedded default, on 2 CPU cores in under 10 minutes.

Python standard library source (real code, on every machine) with a held-out split -> our own 8K tokenizer ->
the curation pipeline (clean -> dedup -> code-quality tiers -> weighted mixture manifest) -> pretrain a
~10M-parameter InternLM2 -> checkpoint -> held-out perplexity against the unigram baseline -> greedy completion of
code prompts -> the evaluation demo suite (held-out perplexity, HumanEval-style code completion executed in the
sandbox, a needle sweep crossing max_position_embeddings) -> a short report with the curation stage table.
Run: python -m internlm2_jax.launch experiments/tiny_chain.py [--set train.steps=50 ...]
"""

import itertools
import math
from collections import Counter
from pathlib import Path

import jax
from flax import nnx

from internlm2_jax.config import ModelConfig, RopeScaling
from internlm2_jax.data import PretrainDataIterator
from internlm2_jax.data.curation.report import format_report
from internlm2_jax.decode import greedy_generate
from internlm2_jax.eval.suites import demo_suite
from internlm2_jax.eval.tasks import suite_table
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.model.quantize import quantize_int8, weight_bytes
from internlm2_jax.recipes.stdlib_data import prepare_stdlib_dataset
from internlm2_jax.train import OptimizerConfig, StepConfig
from internlm2_jax.train.loss import next_token_loss
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.model import model_graphdef

RUN = Path("runs/tiny_chain")
PROMPTS = ["def __init__(self", "import os\nimport ", "    for i in range(", "class Error(Exception):\n    "]


def config() -> Experiment:
    model = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                        rope_theta=50_000.0, rope_scaling=RopeScaling("dynamic", 2.0), dtype="bfloat16")
    return Experiment(
        name="tiny_chain", model=model,
        train=TrainConfig(steps=300, batch_size=32, seq_len=128, log_every=10, checkpoint_every=100,
                          run_dir=str(RUN)),
        optimizer=OptimizerConfig(peak_lr=4e-3, warmup_steps=20, total_steps=300, weight_decay=0.1),
        step=StepConfig(loss_chunk_size=128), mesh=MeshConfig(fsdp=-1),
        data=DataConfig(manifest=str(RUN / "data/train/manifest.json"),
                        heldout_manifest=str(RUN / "data/heldout/manifest.json"),
                        tokenizer=str(RUN / "data/tokenizer.model"), eval_batches=12))


def unigram_nats(tokenizer, train_docs, heldout_docs) -> float:
    """Cross-entropy of an add-one unigram model fitted on the training split: the baseline to beat.

    Scored like the model: every token after <s> is predicted, </s> included.
    """
    counts = Counter()
    for d in train_docs:
        counts.update([*tokenizer.encode(d.text, allow_special=False), tokenizer.eos_id])
    total, vocab = sum(counts.values()), tokenizer.vocab_size
    nll = n = 0
    for d in heldout_docs:
        ids = [*tokenizer.encode(d.text, allow_special=False), tokenizer.eos_id]
        nll -= sum(math.log((counts[i] + 1) / (total + vocab)) for i in ids)
        n += len(ids)
    return nll / n


def heldout_loss(model, exp: Experiment, tokenizer) -> float:
    """Mean loss over the run's own evaluation batches (the rows `run_training` evaluated, in order)."""
    rows = PretrainDataIterator(exp.data.heldout_manifest, tokenizer, exp.train.seq_len, exp.train.batch_size,
                                seed=0, shuffle=False, repeat=False)
    loss = jax.jit(lambda m, batch: next_token_loss(m, batch, chunk_size=exp.step.loss_chunk_size))
    sums = [loss(model, batch) for batch in itertools.islice(rows, exp.data.eval_batches)]
    return sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums)


def main(exp: Experiment) -> None:
    data_dir = Path(exp.data.tokenizer).parent  # the manifests are data_dir/{train,heldout}/manifest.json
    tokenizer, train_docs, heldout_docs, curation = prepare_stdlib_dataset(data_dir, exp.model.vocab_size)
    result = run_training(exp)
    graphdef, _ = model_graphdef(exp.model)
    model = nnx.merge(graphdef, result.state.params)
    completions = greedy_generate(model, [tokenizer.encode(p, add_bos=True, allow_special=False) for p in PROMPTS],
                                  max_new_tokens=24, stop_ids=[tokenizer.eos_id])
    baseline = unigram_nats(tokenizer, train_docs, heldout_docs)
    fp32_graphdef, _ = model_graphdef(exp.model.replace(dtype="float32"))
    fp32 = nnx.merge(fp32_graphdef, result.state.params)
    int8 = quantize_int8(fp32)
    fp32_loss, int8_loss = heldout_loss(fp32, exp, tokenizer), heldout_loss(int8, exp, tokenizer)
    losses = result.losses
    lines = [
        f"# {exp.name}: {exp.model.num_params() / 1e6:.1f}M parameters, {result.final_step} steps of "
        f"{exp.train.batch_size}x{exp.train.seq_len} tokens",
        "",
        "| metric | value |", "|---|---|",
        f"| first / last train loss (nats/token) | {losses[min(losses)]:.3f} / {losses[max(losses)]:.3f} |",
        f"| held-out loss / perplexity | {result.eval['eval_loss']:.3f} / {result.eval['eval_perplexity']:.1f} |",
        f"| unigram baseline loss / perplexity | {baseline:.3f} / {math.exp(baseline):.1f} |",
        f"| held-out perplexity, fp32 / int8 weights (decoding) | {math.exp(fp32_loss):.2f} / "
        f"{math.exp(int8_loss):.2f} ({math.exp(int8_loss - fp32_loss) - 1:+.2%}); weights "
        f"{weight_bytes(fp32) / 2**20:.1f} / {weight_bytes(int8) / 2**20:.1f} MiB |",
        f"| loss curve | {result.run_dir / 'loss_curve.png'} |",
        "", "Greedy completions:",
    ]
    for prompt, ids in zip(PROMPTS, completions, strict=True):
        lines.append(f"  {prompt!r} -> {tokenizer.decode(ids, skip_special_tokens=True)!r}")
    evaluation = demo_suite(fp32, tokenizer, result.run_dir, progress=True)
    lines += ["", "Evaluation (the demo suite of `python -m internlm2_jax.eval`; needle heat map "
              f"{result.run_dir / 'needle.png'}):", "", suite_table(evaluation)]
    lines += ["", f"Data curation ({curation.output_dir}):", "", format_report(curation.report)]
    report = "\n".join(lines)
    (result.run_dir / "report.md").write_text(report + "\n")
    print("\n" + report)
    if not result.eval["eval_loss"] < baseline:
        raise SystemExit(f"held-out loss {result.eval['eval_loss']:.3f} did not beat the unigram baseline "
                         f"{baseline:.3f}")
