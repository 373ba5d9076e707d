"""The long-context recipe (spec §5.4: 4K with RoPE base 50,000, then 32K with base 1,000,000) in miniature, on CPU.

Phase 1 pretrains a tiny model (2 layers x 128, 2 heads of 64) at `train.seq_len` tokens (RoPE base 50,000,
max_position_embeddings = seq_len) on passkey rows (`recipes.passkey_data`: a 4-digit number hidden at a random depth
of the classic periodic filler, then asked for; loss weight 1 on the answer tokens, CONTEXT_WEIGHT on the rest) mixed
with copy documents (a random sequence, repeated: the induction-head curriculum that makes retrieval learnable in
~1,000 steps; without them the answers stay at chance). Phase 2 continues it from phase 1's checkpoint
(`train.init_from`: the weights, Adam moments and step count carry over) at FACTOR x the length with RoPE base
1,000,000 and mesh.sequence=2 (context parallel: attention split over 2 devices, rows laid out zigzag). The needle
sweep (`eval.needle`) then scores three models over length x depth: phase 1, phase 2, and the control (phase 1 with
dynamic NTK RoPE scaling, no further training). Everything else is derived from the phase-1 config, so `--set`
overrides shrink both phases at once (tests/test_long_context_recipe.py). The held-out loss in the run directories'
metrics.jsonl is the answer loss (passkey rows of another seed, answers only): ~1.3 nats at chance, ~0 retrieving.

Writes under runs/long_context_tiny/: phase1/ and phase2/ (run directories), needle_{phase1,phase2,control}.png,
needle.json (the grids) and needle.md (retrieval per length).

Run: python -m internlm2_jax.launch experiments/long_context_tiny.py --cpu-devices 2   (about 6 minutes on 2 cores)
"""

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
from flax import nnx

from internlm2_jax.config import ModelConfig, RopeScaling
from internlm2_jax.data_formats import host_rows, register_data_format
from internlm2_jax.eval.needle import NEEDLE, QUESTION, haystack_prompt, needle_sweep, plot_heatmap
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.model import model_graphdef
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.recipes.passkey_data import FILLER, PasskeyRows, passkey_tokenizer
from internlm2_jax.run import load_tokenizer, run_training
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig

RUN = Path("runs/long_context_tiny")
FACTOR = 4  # phase 2's length over phase 1's
PHASE2_SHARE = 0.3  # phase 2's steps, as a share of phase 1's
LONG_THETA = 1_000_000.0
CONTROL = RopeScaling("dynamic", 2.0)  # InternLM2's own inference setting beyond its trained length (spec §1.3)
DEPTHS = tuple(i / 10 for i in range(11))
SEEDS = (0, 1)  # needle sweeps per model, averaged: 22 haystacks per length
MIN_DOCUMENT = 32  # tokens: BOS, needle, question and answer take 30
CONTEXT_WEIGHT = 0.1  # loss weight of the haystack and question tokens (the answer's is 1)
COPY_SHARE = 0.5  # share of copy documents (a random sequence, repeated) among the training documents
DIGIT_WEIGHT = 3  # see copy_tokens
WHOLE_ROW = 0.25  # share of rows that are one haystack (the others pack several: more answers per step)
TOKENIZER_VOCAB = 384  # what the passkey text supports (model.vocab_size must be at least this)


def answer_ids(tokenizer, number: int) -> list[int]:
    return tokenizer.encode(f" {number}.", allow_special=False)


def copy_tokens(tokenizer) -> list[int]:
    """What the copy documents are drawn from: the tokens of the haystack text, and the digits DIGIT_WEIGHT times
    over (runs of digits with repeats are what the answer's copy must get right: it needs more than the last token
    to find its place)."""
    text = tokenizer.encode(FILLER + NEEDLE.format(number=0) + QUESTION, allow_special=False)
    digits = tokenizer.encode("0123456789", allow_special=False)
    return sorted(set(text) - set(digits)) + sorted(set(digits)) * DIGIT_WEIGHT


def passkey_data(exp: Experiment, tokenizer):
    """The `passkey` data format: rows of haystacks built by the needle sweep's own prompt builder, a share
    COPY_SHARE of copy documents among them; held out: passkey rows of another seed, loss on the answers only (so
    `eval_loss` is the answer loss: ln 10 = 2.3 nats per digit at chance)."""
    rows, processes = host_rows(exp)
    rows_of = functools.partial(PasskeyRows, functools.partial(haystack_prompt, tokenizer, FILLER),
                                functools.partial(answer_ids, tokenizer), seq_len=exp.train.seq_len, rows=rows,
                                eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id, min_length=MIN_DOCUMENT,
                                whole_row=WHOLE_ROW, **processes)
    data = rows_of(seed=exp.train.seed, context_weight=CONTEXT_WEIGHT, copy_share=COPY_SHARE,
                   copy_tokens=copy_tokens(tokenizer))

    def heldout():
        rows = rows_of(seed=exp.train.seed + 1_000_003)
        return (next(rows) for _ in range(exp.data.eval_batches))

    return data, heldout, data.data_hash()


register_data_format("passkey", passkey_data)


def config() -> Experiment:
    seq = 128
    model = ModelConfig(vocab_size=384, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=seq,
                        rope_theta=50_000.0)
    return Experiment(
        name="long_context_tiny", model=model,
        train=TrainConfig(steps=1100, batch_size=16, seq_len=seq, log_every=20, checkpoint_every=550, eval_every=100,
                          run_dir=str(RUN / "phase1")),
        optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=50, total_steps=1100, weight_decay=0.0),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(format="passkey", tokenizer=str(RUN / "tokenizer.model"), eval_batches=2))


def phase2(exp: Experiment) -> Experiment:
    """Phase 1 continued: FACTOR x the length, RoPE base 1e6, mesh.sequence=2, from phase 1's last checkpoint."""
    seq = exp.train.seq_len * FACTOR
    steps = exp.train.steps + max(1, round(exp.train.steps * PHASE2_SHARE))
    rows = max(exp.train.batch_size // FACTOR, jax.device_count() // 2)  # at least one row per fsdp shard
    run_dir = Path(exp.train.run_dir).with_name("phase2")
    return dataclasses.replace(
        exp, name=exp.name + "_phase2",
        model=exp.model.replace(rope_theta=LONG_THETA, max_position_embeddings=seq),
        train=dataclasses.replace(exp.train, steps=steps, batch_size=rows, seq_len=seq, run_dir=str(run_dir),
                                  init_from=exp.train.run_dir),
        optimizer=dataclasses.replace(exp.optimizer, total_steps=max(steps, exp.optimizer.warmup_steps + 1)),
        mesh=dataclasses.replace(exp.mesh, sequence=2))


def on_host(config: ModelConfig, params):
    """The model of `config` with `params` gathered to the first device (decoding runs there, unsharded)."""
    graphdef, _ = model_graphdef(config)
    return nnx.merge(graphdef, jax.device_put(jax.device_get(params), jax.devices()[0]))


def sweep(model, tokenizer, lengths) -> dict:
    """The needle grid over `lengths` x DEPTHS, averaged over SEEDS."""
    results = [needle_sweep(model, tokenizer, FILLER, lengths=lengths, depths=DEPTHS, seed=s) for s in SEEDS]
    grid = [[sum(r["grid"][i][j] for r in results) / len(results) for j in range(len(DEPTHS))]
            for i in range(len(lengths))]
    return {**results[0], "grid": grid, "retrieval": sum(map(sum, grid)) / (len(lengths) * len(DEPTHS)),
            "prompt_hash": "+".join(r["prompt_hash"] for r in results),
            "outputs": [o for r in results for o in r["outputs"]]}


def table(results: dict[str, dict], lengths, short: int) -> str:
    lines = ["| model | " + " | ".join(f"{n}{' *' if n > short else ''}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, result in results.items():
        rates = [sum(row) / len(row) for row in result["grid"]]
        lines.append(f"| {name} | " + " | ".join(f"{r:.0%}" for r in rates) + " |")
    return "\n".join(lines)


def main(exp: Experiment) -> dict:
    if jax.device_count() < 2:
        raise SystemExit("phase 2 runs with mesh.sequence=2: split the CPU with --cpu-devices 2")
    started = time.perf_counter()
    out = Path(exp.train.run_dir).parent
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = passkey_tokenizer(exp.data.tokenizer, [FILLER, NEEDLE, QUESTION, " {number}."],
                                  vocab_size=TOKENIZER_VOCAB)
    assert load_tokenizer(exp).sha256 == tokenizer.sha256
    first = run_training(exp)
    long = phase2(exp)
    second = run_training(long)
    trained = time.perf_counter() - started

    short = exp.train.seq_len
    lengths = [short // 2, short, 2 * short, long.train.seq_len]
    models = {"phase 1": on_host(exp.model, first.state.params),
              "phase 2": on_host(long.model, second.state.params),
              "control (phase 1 + dynamic NTK)": on_host(exp.model.replace(rope_scaling=CONTROL), first.state.params)}
    results = {}
    for (name, model), file in zip(models.items(), ("phase1", "phase2", "control"), strict=True):
        results[name] = sweep(model, tokenizer, lengths)
        trained_length = long.train.seq_len if file == "phase2" else short
        results[name]["heatmap"] = str(plot_heatmap(results[name], out / f"needle_{file}.png",
                                                    max_position_embeddings=trained_length))
    summary = {"lengths": lengths, "phase1_seq_len": short, "phase2_seq_len": long.train.seq_len,
               "phase1_steps": first.final_step, "phase2_steps": second.final_step,
               "phase2_init_from": long.train.init_from, "train_seconds": round(trained, 1),
               "total_seconds": round(time.perf_counter() - started, 1),
               "retrieval": {name: {str(n): sum(row) / len(row) for n, row in zip(lengths, r["grid"], strict=True)}
                             for name, r in results.items()},
               "models": {name: {k: v for k, v in r.items() if k != "outputs"} for name, r in results.items()}}
    (out / "needle.json").write_text(json.dumps(summary, indent=2))
    report = (f"# {exp.name}: needle retrieval per length (mean over {len(DEPTHS)} depths x {len(SEEDS)} seeds)\n\n"
              f"Phase 1: {first.final_step} steps at {short} tokens, RoPE base {exp.model.rope_theta:,.0f}. "
              f"Phase 2: steps {first.final_step}-{second.final_step} at {long.train.seq_len} tokens, RoPE base "
              f"{LONG_THETA:,.0f}, mesh.sequence=2. * = beyond phase 1's length. Control: phase 1 with "
              f"rope_scaling=dynamic {CONTROL.factor}.\n\n{table(results, lengths, short)}\n\n"
              f"Heat maps: {', '.join(r['heatmap'] for r in results.values())}. Wall time "
              f"{summary['total_seconds']:.0f} s ({summary['train_seconds']:.0f} s training).\n")
    (out / "needle.md").write_text(report)
    print("\n" + report)
    return summary
