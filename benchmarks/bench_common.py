"""What every benchmark script shares: timing by median after a warm-up, the bench-shape command line, and the
CPU split for a --mesh row."""

import argparse
import math
import statistics
import time


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shape_arguments(description: str) -> argparse.Namespace:
    """--batch/--seq/--runs for the bench shape (B8 T512, 5 runs), and --quick (B2 T128, 2 runs) for smoke tests."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B2 T128, 2 runs: a smoke test of the script")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.runs = 2, 128, 2
    return args


def split_cpu_for_mesh(parser: argparse.ArgumentParser, spec: str) -> None:
    """Splits the CPU into the devices of the mesh `spec` (every axis sized, no -1), before JAX starts: a mesh row
    on a CPU machine, where the devices share its cores (so its speed says nothing about an accelerator mesh)."""
    from internlm2_jax.parallel import AXES, parse_mesh
    from internlm2_jax.parallel.mesh import split_cpu

    sizes = [getattr(parse_mesh(spec), axis) for axis in AXES]
    if -1 in sizes:
        parser.error("--mesh: give every axis's size here (no -1): the CPU is split into their product")
    split_cpu(math.prod(sizes))
