"""Kill -9 resume, ten times in a row: the loss sequence stays bitwise identical to a straight run.

One straight run of the tiny preset (real data pipeline, 8 fake CPU devices, mesh 2x4), then the same run started in
a fresh run directory and killed with SIGKILL at seeded random steps (and a random moment inside the step, so some
kills land while an asynchronous checkpoint is being written), restarted after each kill, and finally run to the end.
Each restart resumes from the newest complete checkpoint, parameters, optimizer state and data iterator included.
Prints one row per kill (kill step, step it resumed from, whether the steps it logged equal the straight run's
bitwise) and the total time. The runs share a persistent compilation cache, so restarts skip XLA compilation.

Usage: python benchmarks/resume_kill.py [--kills 10] [--steps 30] [--checkpoint-every 3] [--seed 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from train_child import (  # noqa: E402
    complete_checkpoints,
    last_losses,
    log_tail,
    prepare_data,
    run_and_signal,
    start,
    wait_all,
)

TIMEOUT_S = 300


def run_to_end(spec: dict, workdir: Path, name: str) -> dict:
    proc = start({**spec, "step_delay_s": 0}, workdir, name)
    if wait_all([proc], TIMEOUT_S) != [0]:
        raise SystemExit(f"{name} failed\n{log_tail(proc)}")
    return json.loads(Path(spec["out"]).read_text())


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--step-delay", type=float, default=0.15, help="seconds slept per step while killing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = parser.parse_args(argv)
    if args.steps < args.kills + 3:
        parser.error("--steps must leave room for the kills (at least kills + 3)")

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        base = {"data_dir": str(prepare_data(root / "data")), "compile_cache": str(root / "jax_cache"),
                "devices": 8, "steps": args.steps, "log_every": 1, "checkpoint_every": args.checkpoint_every}
        t = time.perf_counter()
        run_to_end({**base, "run_dir": str(root / "straight"), "out": str(root / "straight.out.json")}, root,
                   "straight")
        straight = last_losses(root / "straight")
        print(f"straight run: {args.steps} steps in {time.perf_counter() - t:.1f} s "
              f"(loss {straight[1]:.4f} -> {straight[args.steps]:.4f})")

        rng = random.Random(args.seed)
        schedule = sorted(rng.sample(range(2, args.steps - 1), args.kills))
        spec = {**base, "run_dir": str(root / "killed"), "step_delay_s": args.step_delay,
                "out": str(root / "killed.out.json")}
        attempts = []
        for i, planned in enumerate(schedule):
            saved = complete_checkpoints(spec["run_dir"])
            kill_at = max(planned, (saved[-1] if saved else 0) + 1)
            if kill_at >= args.steps:
                print(f"kill {i + 1}: no step left to kill at (resumes from {saved[-1]})")
                break
            attempt = run_and_signal(spec, root, f"attempt{i}", at_step=kill_at, sig=signal.SIGKILL,
                                     jitter_s=rng.uniform(0, args.step_delay), need_checkpoint=False,
                                     timeout_s=TIMEOUT_S)
            if attempt["returncode"] != -signal.SIGKILL:
                raise SystemExit(f"attempt {i} was not killed (exit code {attempt['returncode']})\n"
                                 f"{log_tail(attempt['proc'])}")
            attempt["checkpoint"] = max(complete_checkpoints(spec["run_dir"]), default=0)
            attempts.append(attempt)
        t = time.perf_counter()
        final = run_to_end(spec, root, "final")
        final_seconds = time.perf_counter() - t
        attempts.append({"first_step": min(int(s) for s in final["losses"]),
                         "losses": {int(s): v for s, v in final["losses"].items()}})
        overall = last_losses(spec["run_dir"]) == straight

    # Row i: the i-th kill, and the restart after it (the next attempt, or the final run to the end).
    print()
    print(f"{'kill':>4} {'killed after step':>18} {'newest checkpoint':>18} {'resumed from step':>18} "
          f"{'identical':>10}")
    ok = overall
    for i, (killed, resumed) in enumerate(zip(attempts[:-1], attempts[1:], strict=True)):
        identical = all(straight[s] == v for s, v in resumed["losses"].items())
        ok = ok and identical and resumed["first_step"] - 1 == killed["checkpoint"]
        print(f"{i + 1:>4} {killed['last_step']:>18} {killed['checkpoint']:>18} {resumed['first_step'] - 1:>18} "
              f"{'yes' if identical else 'NO':>10}")
    print()
    print(f"{len(attempts) - 1} kills; the last restart ran to step {args.steps} in {final_seconds:.1f} s; the loss "
          f"of every step 1..{args.steps} (each step's last logged value) is "
          f"{'bitwise identical to' if overall else 'DIFFERENT from'} the straight run")
    print(f"total time {time.perf_counter() - began:.1f} s")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
