"""GPU train-step benchmark: tokens/s and MFU of the InternLM2-1.8B shape on one GPU.

Preset internlm2_1_8b with the scanned layer stack, bf16 compute (fp32 master weights and AdamW moments), a remat
policy (default `dots_no_batch`: projections saved, attention recomputed), T = 4096, attention `auto` (our Pallas
flash kernel on GPU), the chunked fp32 cross-entropy. Times the jitted train step (forward + backward + AdamW) over
several runs after a warm-up and prints the median, tokens/s, MFU (conventions: 6 N + causal attention FLOPs per
token, against the card's dense bf16 peak in `metrics.PEAK_FLOPS`) and the peak device memory. If the batch does not
fit, it is halved and retried (the table says so). `--results FILE` appends the markdown table with card and date.
`--dry-run` runs the same code on a tiny shape on CPU so the script is tested without a GPU; its numbers mean nothing.

    python benchmarks/train_gpu.py [--batch 4] [--remat dots_no_batch] [--results benchmarks/RESULTS.md]
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from internlm2_jax.config import GPU_FLASH_KERNELS, REMAT_POLICIES, preset  # noqa: E402
from internlm2_jax.parallel import MeshConfig, make_mesh  # noqa: E402
from internlm2_jax.train import (  # noqa: E402
    OptimizerConfig,
    StepConfig,
    init_train_state,
    jit_train_step,
    lr_schedule,
    make_optimizer,
    make_train_step,
    train_state_shardings,
)
from internlm2_jax.train.metrics import PEAK_FLOPS, mfu, peak_flops_key, train_flops_per_token  # noqa: E402
from internlm2_jax.model import model_graphdef  # noqa: E402

OPT = OptimizerConfig(peak_lr=3e-4, warmup_steps=2, total_steps=1000)


def peak_flops(device) -> tuple[str, float]:
    key = peak_flops_key(device.platform, device.device_kind, "bfloat16")
    if key is None:
        raise SystemExit(f"no bf16 peak known for {device.device_kind!r}: add it to metrics.PEAK_FLOPS")
    return key, PEAK_FLOPS[key]


def make_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    ids = np.random.RandomState(0).randint(3, vocab, (batch, seq + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.float32)}


def run(cfg, batch_size: int, seq: int, runs: int, loss_chunk: int):
    """(median seconds, first loss, peak bytes) of the jitted train step on the first device."""
    device = jax.devices()[0]
    mesh = make_mesh(MeshConfig(), [device])
    tx = make_optimizer(OPT)
    graphdef, _ = model_graphdef(cfg)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(OPT), StepConfig(loss_chunk_size=loss_chunk)),
                          train_state_shardings(cfg, tx, mesh), mesh)
    state = init_train_state(cfg, tx, mesh, seed=0)
    batch = jax.device_put(make_batch(batch_size, seq, cfg.vocab_size), device)
    state, metrics = step(state, batch)  # compile + warm-up
    loss = float(metrics["loss"])
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    del state
    return statistics.median(times), loss, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="internlm2_1_8b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="rows per step; halved until it fits")
    parser.add_argument("--remat", default="dots_no_batch", choices=REMAT_POLICIES)
    parser.add_argument("--attention", default="auto", help="attention impl (auto = Pallas kernel on GPU)")
    parser.add_argument("--gpu-flash-kernel", default="triton", choices=GPU_FLASH_KERNELS,
                        help="which Pallas GPU flash kernels (mosaic: the Hopper ones)")
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--results", help="append the markdown table to this file")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny scanned model, T64 B2, on CPU: checks the script, numbers meaningless")
    args = parser.parse_args(argv)
    if args.dry_run:
        jax.config.update("jax_platforms", "cpu")
        args.preset, args.seq, args.batch, args.runs, args.attention = "tiny", 64, 2, 2, "xla"
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.dry_run:
        raise SystemExit(f"no GPU here (default device: {device.platform}); use --dry-run to check the script")
    peak_name, peak = peak_flops(device)
    cfg = preset(args.preset, scan_layers=True, dtype="bfloat16", remat=args.remat, attention_impl=args.attention,
                 gpu_flash_kernel=args.gpu_flash_kernel)

    batch, notes = args.batch, []
    while True:
        try:
            seconds, loss, peak_bytes = run(cfg, batch, args.seq, args.runs, args.loss_chunk)
            break
        except jax.errors.JaxRuntimeError as error:  # out of memory: halve the batch
            if "RESOURCE_EXHAUSTED" not in str(error) or batch == 1:
                raise
            notes.append(f"B{batch} did not fit")
            batch //= 2
    tokens_per_second = batch * args.seq / seconds
    utilisation = mfu(train_flops_per_token(cfg, args.seq), tokens_per_second, peak)
    title = device.device_kind if not args.dry_run else "CPU dry run (tiny shape; numbers meaningless)"
    header = "| shape | params | remat | attention | B x T | step s | tokens/s | TFLOP/s | MFU | peak mem |"
    row = (f"| {args.preset} | {cfg.num_params() / 1e9:.2f}B | {args.remat} "
           f"| {args.attention} ({args.gpu_flash_kernel}) | {batch} x {args.seq} "
           f"| {seconds:.3f} | {tokens_per_second:,.0f} | "
           f"{train_flops_per_token(cfg, args.seq) * tokens_per_second / 1e12:.1f} | {utilisation:.1%} "
           f"| {peak_bytes / 2**30:.1f} GiB |")
    table = "\n".join([f"train step on {title}, jax {jax.__version__}, MFU against {peak_name} "
                       f"{peak / 1e12:.3g} TFLOP/s bf16 dense, first loss {loss:.3f}"
                       + (f" ({'; '.join(notes)})" if notes else ""),
                       "", header, "|" + "---|" * (header.count("|") - 1), row])
    print(table)
    if args.results and not args.dry_run:
        with open(args.results, "a") as f:
            f.write(f"\n## train_gpu.py ({datetime.date.today().isoformat()}, {device.device_kind})\n\n{table}\n")


if __name__ == "__main__":
    main()
