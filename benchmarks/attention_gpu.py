"""GPU attention benchmark: our two sets of Pallas GPU flash kernels (Triton, and Mosaic GPU for Hopper) against
cuDNN, the XLA reference and jax's shipped Pallas GPU attentions (the Triton `mha` and the Mosaic GPU
FlashAttention-3 example). bf16, causal, 32 query heads / 8 kv heads / head_dim 128, T = 2K..32K with
B = 32K tokens / T.

First checks each of our kernels' forward and gradients against the XLA reference on the device (a kernel that fails
is reported and left out of the timings; the script then exits non-zero after printing the table), then times
forward and forward+backward (median of several runs) and prints TFLOP/s (causal FLOPs halved; backward = 2.5x
forward, the FlashAttention-2 convention) and the ratio to cuDNN. A contender that fails at some shape (OOM, an
unsupported case such as the shipped FA3's causal backward) is a table entry, not a crash. `--results FILE` appends
the markdown table with card and date. `--dry-run` runs everything at a tiny shape on CPU (interpret mode) so the
script is tested without a GPU; its numbers mean nothing.

    python benchmarks/attention_gpu.py [--results benchmarks/RESULTS.md]
"""

import argparse
import datetime
import functools
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from internlm2_jax.kernels import flash_gpu, flash_mgpu  # noqa: E402
from internlm2_jax.kernels.reference import xla_attention  # noqa: E402


def _inputs(batch, seq, heads, kv_heads, head_dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:])
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return q, k, v, positions, jnp.ones((batch, seq), jnp.int32)


OURS = {"ours (pallas triton)": flash_gpu.flash_attention, "ours (pallas mosaic)": flash_mgpu.flash_attention,
        "ours (pallas mosaic, ping-pong)": functools.partial(flash_mgpu.flash_attention, ping_pong=True)}


def _contenders(interpret: bool, on_gpu: bool):
    """name -> f(q, k, v, positions, segments) for [B, T, H, D] inputs, causal."""
    def ours(kernel):
        return lambda q, k, v, pos, seg: kernel(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                                kv_segment_ids=seg, interpret=interpret)

    def xla(q, k, v, pos, seg):
        return xla_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)

    def shipped(q, k, v, pos, seg):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as jax_gpu_attention
        group = q.shape[2] // k.shape[2]  # the shipped kernel needs as many kv heads as query heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        return jax_gpu_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=interpret)

    def shipped_fa3(q, k, v, pos, seg):
        from jax.experimental.pallas.ops.gpu import attention_mgpu
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        return attention_mgpu.attention(q, k, v, config)

    def cudnn(q, k, v, pos, seg):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    out = {name: ours(kernel) for name, kernel in OURS.items()}
    if on_gpu:  # neither has a CPU form
        out.update({"cudnn": cudnn, "jax pallas fa3 (mosaic)": shipped_fa3})
    out.update({"xla reference": xla, "jax pallas mha": shipped})
    return out


def _timed(fn, args, iters):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_correctness(name, interpret, heads, kv_heads, head_dim, seq):
    """One of our kernels against the XLA reference (fp32 maths on the same bf16 inputs), forward and gradients.
    Returns an error message, or None when it agrees."""
    q, k, v, pos, seg = _inputs(2, seq, heads, kv_heads, head_dim, seed=1)
    contenders = _contenders(interpret, False)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, pos, seg).astype(jnp.float32) * jnp.cos(q.astype(
        jnp.float32)))
    f32 = lambda x: x.astype(jnp.float32)
    try:
        got = jax.jit(jax.value_and_grad(loss(contenders[name]), argnums=(0, 1, 2)))(q, k, v)
    except Exception as err:  # noqa: BLE001 - a kernel that does not compile here is reported, the others still run
        return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    want = jax.jit(jax.value_and_grad(loss(contenders["xla reference"]), argnums=(0, 1, 2)))(f32(q), f32(k), f32(v))
    errors = {}
    for part, a, b in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        errors[part] = float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))
    print(f"correctness of {name} (max error / max |reference|):", {k: f"{v:.1e}" for k, v in errors.items()})
    return f"disagrees with the XLA reference: {errors}" if max(errors.values()) > 5e-2 else None


def run(args):
    on_gpu = jax.default_backend() == "gpu"
    if not (on_gpu or args.dry_run):
        raise SystemExit("no GPU here: run on a GPU machine, or pass --dry-run for the tiny CPU smoke run")
    interpret = not on_gpu
    # The dry run's head_dim is 64: the Mosaic kernel's wgmma tiles need a multiple of 64.
    heads, kv_heads, head_dim = (4, 2, 64) if args.dry_run else (32, 8, 128)
    seq_lens = [64, 128] if args.dry_run else args.seq_lens
    tokens = 256 if args.dry_run else args.tokens
    failed = {name: error for name in OURS
              if (error := check_correctness(name, interpret, heads, kv_heads, head_dim,
                                             136 if args.dry_run else 1024))}
    for name, error in failed.items():
        print(f"{name} FAILED its correctness check, left out of the timings: {error}")
    device = jax.devices()[0]
    memory = (device.memory_stats() or {}).get("bytes_limit", 0) if on_gpu else 0
    rows = []
    for seq in seq_lens:
        batch = max(1, tokens // seq)
        inputs = _inputs(batch, seq, heads, kv_heads, head_dim)
        fwd_flops = 4 * batch * heads * seq * seq * head_dim / 2  # causal: half the tiles
        for name, fn in _contenders(interpret, on_gpu).items():
            if name in failed:
                continue
            scores_bytes = 3 * batch * heads * seq * seq * 4  # fp32 scores, probabilities and their gradient
            if name == "xla reference" and memory and scores_bytes > 0.8 * memory:
                rows.append((seq, batch, name, "OOM", "OOM"))
                continue
            grad = jax.grad(lambda q, k, v, p, s, fn=fn: jnp.sum(fn(q, k, v, p, s).astype(jnp.float32)),
                            argnums=(0, 1, 2))
            cells = []
            for part, flops, step in (("fwd", fwd_flops, fn), ("fwd+bwd", 3.5 * fwd_flops, grad)):
                try:
                    seconds = _timed(jax.jit(step), inputs, args.iters)
                except Exception as err:  # noqa: BLE001 - an OOM or unsupported case is a table entry, not a crash
                    print(f"  T={seq:6d} {name} {part}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                    cells.append("error")
                    continue
                cells.append(flops / seconds / 1e12)
                print(f"  T={seq:6d} B={batch:3d} {name:32s} {part:8s} {seconds * 1e3:9.3f} ms")
            rows.append((seq, batch, name, *cells))
    table = _markdown(rows, device.device_kind if on_gpu else "CPU dry run (interpret mode; numbers meaningless)")
    print(table)
    if args.results and not args.dry_run:
        with open(args.results, "a") as f:
            f.write("\n" + table + "".join(f"\n{name} failed its correctness check: {error}\n"
                                           for name, error in failed.items()))
    if failed:
        raise SystemExit(f"kernels that disagree with the reference or do not run: {sorted(failed)}")
    return rows


def _markdown(rows, card):
    cudnn = {(seq, kind): val for seq, _, name, *vals in rows if name == "cudnn" for kind, val in enumerate(vals)}
    lines = [f"### Attention kernels, {card}, {datetime.date.today().isoformat()}", "",
             "bf16, causal, 32/8 heads, head_dim 128, B = 32K tokens / T; TFLOP/s (causal FLOPs halved, "
             "backward 2.5x forward); ratio = TFLOP/s / cuDNN's.", "",
             "| T | B | kernel | fwd TFLOP/s | fwd ratio | fwd+bwd TFLOP/s | fwd+bwd ratio |",
             "|---|---|---|---|---|---|---|"]
    for seq, batch, name, *vals in rows:
        cells = []
        for kind, val in enumerate(vals):
            base, measured = cudnn.get((seq, kind)), not isinstance(val, str)  # else "OOM" or "error"
            cells += [f"{val:.1f}" if measured else val,
                      f"{val / base:.2f}" if measured and isinstance(base, float) else "-"]
        lines.append(f"| {seq} | {batch} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on CPU in interpret mode")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch: B = tokens / T")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--results", help="append the markdown table to this file")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
