"""Online RL as real processes (`rl_child.py`: tiny PPO with critic warm-up, two mini-batches, a host-side rule reward):
a run killed with SIGKILL after a checkpoint and restarted logs bitwise the metrics of a straight run (docs/rlhf.md
§3 item 7), and two `jax.distributed` processes with 4 CPU devices each, each serving and scoring half of every
prompt batch, log the metrics of one process with 8 devices.

The kill catches a resume that restarts from scratch, loses the prompt source's position, or replays a rollout with
other keys; the two processes catch rows scored by the wrong process, per-process keys that differ from the global
row's, and metrics taken over one process's rows only.
"""

import json
import random
import signal

import numpy as np
import pytest
from internlm2_jax.train.rl.hacking import read_samples
from train_child import complete_checkpoints, free_port, log_tail, read_metrics, run_and_signal, start, wait_all

ITERATIONS = 5
CHECKPOINT_EVERY = 2
DELAY_S = 1.0  # per iteration in the killed run: time for the watcher to act at the iteration it chose
TIMEOUT_S = 300
SCRIPT = __file__.replace("test_rl_processes.py", "rl_child.py")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A straight run (one process, 8 devices): the reference, and the compilation cache the others reuse."""
    root = tmp_path_factory.mktemp("rl_processes")
    base = {"compile_cache": str(root / "jax_cache"), "devices": 8, "iterations": ITERATIONS,
            "checkpoint_every": CHECKPOINT_EVERY, "dump_every": ITERATIONS}
    out = finish(root, {**base, "run_dir": str(root / "straight")}, "straight")
    assert sorted(int(k) for k in out["metrics"]) == list(range(1, ITERATIONS + 1))
    return root, base, out["metrics"]


def finish(root, spec, name, procs=None):
    """Runs `spec` (or waits for `procs`) to the end; the result file of each process."""
    procs = procs or [start({**spec, "out": str(root / f"{name}.out.json")}, root, name, SCRIPT)]
    codes = wait_all(procs, TIMEOUT_S)
    if any(codes):
        pytest.fail(f"exit codes {codes}\n" + "\n".join(log_tail(p) for p in procs))
    outs = [json.loads((root / f"{p.log_path.stem}.out.json").read_text()) for p in procs]
    return outs[0] if len(outs) == 1 else outs


def test_kill_9_after_a_checkpoint_then_resume_logs_bitwise_the_straight_metrics(straight):
    root, base, reference = straight
    kill_after = random.Random(7).randint(CHECKPOINT_EVERY + 1, ITERATIONS - 1)
    spec = {**base, "run_dir": str(root / "killed"), "iteration_delay_s": DELAY_S,
            "out": str(root / "killed.out.json")}
    killed = run_and_signal(spec, root, "killed", at_step=kill_after, sig=signal.SIGKILL, timeout_s=TIMEOUT_S,
                            script=SCRIPT, key="score")
    assert killed["returncode"] == -signal.SIGKILL, log_tail(killed["proc"])
    assert kill_after <= killed["last_step"] < ITERATIONS  # it died mid-run
    saved = complete_checkpoints(root / "killed")
    assert saved and max(saved) <= killed["last_step"]

    resumed = finish(root, {**spec, "iteration_delay_s": 0}, "resumed")
    first = min(int(k) for k in resumed["metrics"])
    assert first == max(saved) + 1  # from the newest complete checkpoint, not from scratch
    assert resumed["served"] == ITERATIONS  # the prompt source's position came back with it
    assert resumed["metrics"] == {k: v for k, v in reference.items() if int(k) >= first}  # bitwise
    logged = {r["step"]: r["score"] for r in read_metrics(root / "killed", key="score")}
    assert logged == {int(k): v["score"] for k, v in reference.items()}


@pytest.mark.slow  # two jax.distributed processes (~1.5 min)
def test_two_processes_each_scoring_their_own_rows_log_the_metrics_of_one(straight):
    root, base, reference = straight
    port = free_port()
    procs = [start({**base, "devices": 4, "num_processes": 2, "process_id": i, "coordinator": f"127.0.0.1:{port}",
                    "run_dir": str(root / "two"), "out": str(root / f"two{i}.out.json")}, root, f"two{i}", SCRIPT)
             for i in range(2)]
    first, second = finish(root, None, "two", procs)
    assert first["metrics"] == second["metrics"]  # one global set of metrics, seen by both
    assert list(first["metrics"]) == list(reference)
    for k, expected in reference.items():
        got = first["metrics"][k]
        assert sorted(got) == sorted(expected), k
        # Collectives across processes may sum in another order than one process's: close, not bitwise.
        np.testing.assert_allclose([got[n] for n in sorted(got)], [expected[n] for n in sorted(expected)],
                                   rtol=2e-4, atol=1e-6, err_msg=f"iteration {k}")
    # Each process scored and dumped its own half of the rows: together they are the straight run's samples.
    name = f"iter_{ITERATIONS}.jsonl"
    halves = [read_samples(root / "two" / "samples" / f"iter_{ITERATIONS}.process{i}.jsonl") for i in range(2)]
    assert [len(h) for h in halves] == [8, 8]
    together, whole = read_samples(root / "two" / "samples" / name), read_samples(root / "straight" / "samples" / name)
    assert together == halves[0] + halves[1]
    assert [(s["prompt_ids"], s["response_ids"]) for s in together] == [(s["prompt_ids"], s["response_ids"])
                                                                         for s in whole]
    np.testing.assert_allclose([s["score"] for s in together], [s["score"] for s in whole], rtol=1e-6)
