"""`python -m internlm2_jax.convert SRC DST --layout llama|internlm2 [--dtype bfloat16]`.

SRC is a model directory (config.json + *.safetensors) or an orbax run directory (its latest complete checkpoint is
exported, with the run's tokenizer when its metadata names one). Converts between the InternLM2 layout (fused wqkv;
LMDeploy, trust_remote_code users) and the Llama layout (current transformers, vLLM). Tokenizer files are carried.
SRC and DST may be local or URLs (gs://...).

`--mesh fsdp=8` (with `--cpu-devices 8` on a CPU machine) spreads the model over devices while it is converted (a
model too big for one device's memory); the kv heads stay as they are (no repetition for the tensor axis: what is
written is the source model). An AWQ int4 SRC (config.json's `quantization_config`) is written as AWQ int4 again,
its codes unchanged, in either layout.

`--quantize int4` writes the projections as AWQ-format int4 rounded to nearest; `--quantize awq-int4` first runs AWQ
(model/awq.py: activation-aware scales folded where the fold is exact for InternLM2, and clipping) on `--samples`
rows of `--seqlen` tokens of `--calib` text (.jsonl with "text", or .txt; default: the training split of the stdlib
corpus), in float32. Either way the result loads with `load_model` / `--checkpoint` like any model directory, and
LMDeploy or AutoAWQ can read it (config.json's `quantization_config`: awq, 4 bits, zero point, `--group`).
"""

import argparse
import logging
import sys

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm2_jax.convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("src", help="model directory, or a run directory with checkpoints/")
    parser.add_argument("dst", help="destination model directory")
    parser.add_argument("--layout", choices=("internlm2", "llama"), required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weight dtype to write (default: keep the source dtype)")
    parser.add_argument("--max-shard-gb", type=float, default=4.0)
    parser.add_argument("--quantize", choices=("int4", "awq-int4"),
                        help="write int4 projections: rounded to nearest, or after AWQ calibration")
    parser.add_argument("--group", type=int, default=128, help="int4 group size (inputs per scale and zero)")
    parser.add_argument("--calib", help="AWQ calibration text: .jsonl with a \"text\" field, or .txt (default: the "
                                        "stdlib corpus' training split)")
    parser.add_argument("--samples", type=int, default=128, help="AWQ calibration rows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per AWQ calibration row")
    from internlm2_jax.artifacts import (CheckpointMismatch, add_placement_arguments, is_run_directory, load_model,
                                         mesh_from_arguments, placement_summary, run_tokenizer)

    add_placement_arguments(parser, dtype=False)  # --dtype here is the dtype written, which float16 is one of
    args = parser.parse_args(argv)
    if args.quantize != "awq-int4" and (args.calib or args.samples != 128 or args.seqlen != 512):
        parser.error("--calib, --samples and --seqlen are for --quantize awq-int4")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from internlm2_jax.convert import CheckpointError, read_hf_config, save_pretrained
    from internlm2_jax.convert.safetensors_io import CheckpointReader
    from internlm2_jax.model.quantize import quantize_int4_model
    from internlm2_jax.paths import absolute
    from internlm2_jax.tokenizer import Tokenizer

    src, dst = absolute(args.src), absolute(args.dst)
    if src == dst:
        print("error: SRC and DST must differ", file=sys.stderr)
        return 2
    tokenizer = None
    try:
        mesh = mesh_from_arguments(args)
        dtype = args.dtype
        if not is_run_directory(src):
            read_hf_config(src)  # a clear error for a wrong SRC before anything else
            reader = CheckpointReader(src)
            # The weights' dtype (bfloat16's numpy kind is "V"), not an AWQ int4 checkpoint's int32 codes.
            dtype = dtype or next(d for d in map(reader.dtype, reader.keys()) if d.kind != "i").name
        if args.quantize == "awq-int4":  # AWQ searches its scales in float32, whatever dtype is written
            cfg, model, meta = load_model(src, mesh=mesh, dtype="float32")
        else:
            cfg, model, meta = load_model(src, mesh=mesh, **({"param_dtype": dtype} if dtype else {}))
        print(placement_summary(model), file=sys.stderr, flush=True)
        tokenizer = run_tokenizer(meta) if meta is not None else None
        if args.quantize == "awq-int4":
            model = awq_calibrated(model, args, tokenizer or Tokenizer.from_pretrained(src))
        if args.quantize:
            model = quantize_int4_model(model, group=args.group)
        dtype = dtype or cfg.param_dtype
        save_pretrained(model, dst, layout=args.layout, dtype=dtype, tokenizer=tokenizer,
                        max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    except (CheckpointError, CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if tokenizer is None:
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                (src / name).copy(dst / name, overwrite=True)
    print(f"wrote {dst} ({args.layout} layout, {cfg.num_params():,} parameters)")
    return 0


def awq_calibrated(model, args, tokenizer):
    """The float model with AWQ's scales folded and its clipping applied, calibrated on `--calib` text."""
    from internlm2_jax.data.calibration import calibration_batches, calibration_texts
    from internlm2_jax.model.awq import awq_calibrate

    batches = calibration_batches(calibration_texts(args.calib), tokenizer, samples=args.samples, seqlen=args.seqlen)
    model, report = awq_calibrate(model, batches, group=args.group)
    print(report.table(), file=sys.stderr, flush=True)
    return model


if __name__ == "__main__":
    sys.exit(main())
