"""What every benchmark script shares: timing by median after a warm-up, and the bench-shape command line."""

import argparse
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
