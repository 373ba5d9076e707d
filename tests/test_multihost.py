"""Two processes on localhost (4 CPU devices each, `jax.distributed` with gloo) train exactly like one process with
8 devices fed the same global batches.

Each run is a subprocess (`train_child.py`) with a hard timeout: a hang in the collectives is a failure, not a stuck
test session (and when one process fails, its peers are killed at once).
"""

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from train_child import (complete_checkpoints, free_port, kill_all, log_tail, prepare_data, read_metrics, start,
                         wait_all)

STEPS = 4
TIMEOUT_S = 240
COMMON = {"log_every": 1, "batch_size": 8, "mesh": [2, 4, 1, 1]}


def start_reference(tmp_path, data, steps, name="reference"):
    """One process, 8 devices, reading the data as 2 processes would and concatenating their rows."""
    return start({**COMMON, "data_dir": str(data), "steps": steps, "devices": 8, "simulate_processes": 2,
                  "run_dir": str(tmp_path / name), "out": str(tmp_path / f"{name}.out.json")}, tmp_path, name)


def start_two_processes(tmp_path, data, steps, run_dir, name):
    port = free_port()
    return [start({**COMMON, "data_dir": str(data), "steps": steps, "devices": 4, "num_processes": 2,
                   "process_id": i, "coordinator": f"127.0.0.1:{port}", "run_dir": str(run_dir),
                   "out": str(tmp_path / f"{name}{i}.out.json")}, tmp_path, f"{name}{i}") for i in range(2)]


def results(procs, tmp_path):
    codes = wait_all(procs, TIMEOUT_S)
    if any(codes):
        pytest.fail(f"exit codes {codes}\n" + "\n".join(log_tail(p) for p in procs))
    return [json.loads(Path(tmp_path / (p.log_path.stem + ".out.json")).read_text()) for p in procs]


def assert_same_losses(got: dict, expected: dict):
    assert list(got) == list(expected)
    np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=2e-5)


@pytest.mark.slow  # the default run checks the same through the SIGTERM test below
def test_two_processes_give_the_losses_of_one_process_with_eight_devices(tmp_path):
    data = prepare_data(tmp_path / "data")
    # The three runs start together and share the cores.
    reference = start_reference(tmp_path, data, STEPS)
    two = start_two_processes(tmp_path, data, STEPS, tmp_path / "two", "process")
    ref, p0, p1 = results([reference, *two], tmp_path)

    assert [p0["process_index"], p1["process_index"]] == [0, 1]
    expected = ref["losses"]
    assert list(expected) == [str(s) for s in range(1, STEPS + 1)]
    assert_same_losses(p0["losses"], expected)
    assert p0["losses"] == p1["losses"]  # one global loss, seen by both processes
    assert expected["1"] - expected[str(STEPS)] > 0.1  # it learns: the comparison is not between constants
    assert STEPS in complete_checkpoints(tmp_path / "two")  # orbax saved across both processes


@pytest.mark.slow
def test_two_processes_resume_from_their_checkpoint_like_one_process(tmp_path):
    """3 steps with 2 processes, then a restart of both to step 5: steps 4-5 equal one process's straight run.
    Each process must get back its own data iterator state (each reads different records)."""
    data = prepare_data(tmp_path / "data")
    reference = start_reference(tmp_path, data, 5)
    first = start_two_processes(tmp_path, data, 3, tmp_path / "two", "first")
    ref, *_ = results([reference, *first], tmp_path)
    assert complete_checkpoints(tmp_path / "two")[-1] == 3
    second = start_two_processes(tmp_path, data, 5, tmp_path / "two", "second")
    s0, s1 = results(second, tmp_path)
    assert_same_losses(s0["losses"], {k: ref["losses"][k] for k in ("4", "5")})
    assert s0["losses"] == s1["losses"]


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_bitwise(tmp_path):
    """A preemption notice reaches one host only: both agree on the step to stop at (jax's preemption sync point),
    save that one checkpoint together, exit 0, and the resumed pair continues exactly as a straight run."""
    data = prepare_data(tmp_path / "data")
    reference = start_reference(tmp_path, data, 8)
    port = free_port()
    pair = [start({**COMMON, "data_dir": str(data), "steps": 8, "devices": 4, "num_processes": 2, "process_id": i,
                   "coordinator": f"127.0.0.1:{port}", "run_dir": str(tmp_path / "two"), "step_delay_s": 0.3,
                   "out": str(tmp_path / f"stopped{i}.out.json")}, tmp_path, f"stopped{i}") for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    while not [r for r in read_metrics(tmp_path / "two") if r["step"] >= 2]:
        if time.monotonic() > deadline or any(p.poll() is not None for p in pair):
            kill_all([reference, *pair])
            pytest.fail("the pair did not reach step 2\n" + "\n".join(log_tail(p) for p in pair))
        time.sleep(0.01)
    pair[1].send_signal(signal.SIGTERM)
    ref, s0, s1 = results([reference, *pair], tmp_path)
    assert [s0["process_index"], s1["process_index"]] == [0, 1]
    assert s0["interrupted"] and s1["interrupted"] and s0["final_step"] == s1["final_step"] < 8
    assert complete_checkpoints(tmp_path / "two")[-1] == s0["final_step"]  # saved together, across processes
    # Two processes x 4 devices train like one process x 8 fed the same global batches, with one global loss.
    assert_same_losses(s0["losses"], {k: v for k, v in ref["losses"].items() if int(k) <= s0["final_step"]})
    assert s0["losses"] == s1["losses"]
    assert ref["losses"]["1"] - ref["losses"]["8"] > 0.1  # it learns: the comparison is not between constants
    resumed = start_two_processes(tmp_path, data, 8, tmp_path / "two", "resumed")
    r0, r1 = results(resumed, tmp_path)
    assert_same_losses(r0["losses"], {k: v for k, v in ref["losses"].items() if int(k) > s0["final_step"]})
    assert r0["losses"] == r1["losses"]
