"""Every weight format x every KV cache format on one trained model: held-out perplexity, weight and cache memory,
and greedy decode speed at batch 1 and 16 (issue 23's table).

Weights: fp32, int8 (per channel, the CPU kernel), int4 round-to-nearest and int4 AWQ (groups of --group inputs, the
AWQ checkpoint format; AWQ calibrated on --calib-rows rows of the run's training data), NF4 (QLoRA's frozen-base
format, blocks of 64, double-quantized). KV cache: the compute dtype (fp32 here), int8, int4 (per token and kv head).
Perplexity is teacher-forced through the static cache in chunks of 16 tokens (`decode.scoring.cached_logprobs`), so
the cache format counts; rows are the run's held-out stdlib rows (never trained on). Decode speed: `generate_ids`
of --new tokens after a --prompt-token prompt, median of --runs after a warm-up, in the same process.

Default: the model `make demo` pretrains (runs/tiny_chain, 10.5M parameters). Writes a JSON next to the table
(--out). Usage: python benchmarks/quantization.py [--run runs/tiny_chain] [--rows 32] [--runs 3] [--quick]
"""

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import median_seconds  # noqa: E402
from flax import nnx  # noqa: E402

from internlm2_jax.artifacts import load_model  # noqa: E402
from internlm2_jax.data import PretrainDataIterator  # noqa: E402
from internlm2_jax.decode import generate_ids  # noqa: E402
from internlm2_jax.eval.quantization import compare_formats, markdown_table, weight_formats  # noqa: E402
from internlm2_jax.tokenizer import Tokenizer  # noqa: E402


def data_rows(manifest, tokenizer, seq_len: int, rows: int, *, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, loss mask) [rows, seq_len] of packed rows from `manifest`."""
    batches = PretrainDataIterator(manifest, tokenizer, seq_len, rows, seed=0, shuffle=shuffle, repeat=shuffle)
    batch = next(iter(batches))
    return batch["input_ids"], batch["loss_mask"]


def decode_speed(model, prompts: np.ndarray, new: int, runs: int, kv_dtype) -> float:
    graphdef, params = nnx.split(model)

    def call():
        generate_ids((graphdef, params), prompts.tolist(), max_new_tokens=new, chunk=64, kv_dtype=kv_dtype)

    return len(prompts) * new / median_seconds(call, runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/tiny_chain", help="a run directory (or a model directory)")
    parser.add_argument("--data", default=None, help="the run's data directory (default: RUN/data)")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--rows", type=int, default=32, help="held-out rows scored")
    parser.add_argument("--calib-rows", type=int, default=32, help="training rows AWQ calibrates on")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/quantization.json")
    parser.add_argument("--quick", action="store_true", help="4 rows, 8 new tokens, 1 run: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.calib_rows, args.new, args.runs = 4, 8, 8, 1
    data = Path(args.data or Path(args.run) / "data")
    tokenizer = Tokenizer.from_file(data / "tokenizer.model")
    _, model, _ = load_model(args.run, dtype="float32")
    heldout, mask = data_rows(data / "heldout/manifest.json", tokenizer, args.seq, args.rows, shuffle=False)
    train, _ = data_rows(data / "train/manifest.json", tokenizer, args.seq, args.calib_rows, shuffle=True)
    formats = weight_formats(model, [train[i:i + 8] for i in range(0, len(train), 8)], group=args.group)
    print(f"{model.cfg.num_params() / 1e6:.1f}M parameters, {args.rows} held-out rows of {args.seq} tokens, decode "
          f"{args.prompt}+{args.new} tokens, median of {args.runs}; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}", flush=True)
    rows = compare_formats(formats, heldout, mask)
    speeds = [f"tok/s b{b}" for b in args.batch]
    for row in rows:
        for b, column in zip(args.batch, speeds, strict=True):
            row[column] = decode_speed(formats[row["weights"]], heldout[:b, :args.prompt], args.new, args.runs,
                                       row["kv_dtype"])
        print(markdown_table([row], tuple(speeds)).splitlines()[-1], flush=True)
    print("\n" + markdown_table(rows, tuple(speeds)))
    Path(args.out).write_text(json.dumps({"run": args.run, "args": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
