"""A run killed with SIGKILL (kill -9) at a random step and restarted gives bitwise the losses of a straight run; a
run sent SIGTERM stops after the step in progress, leaves a checkpoint of that step and resumes from it.

The runs are subprocesses (`train_child.py`: the tiny preset on the real data pipeline, 8 CPU devices, mesh 2x4)
sharing a persistent compilation cache, so restarts skip XLA compilation. `benchmarks/resume_kill.py` does ten kills
in a row.
"""

import importlib.util
import json
import random
import signal
from pathlib import Path

import pytest
from train_child import complete_checkpoints, last_losses, log_tail, prepare_data, run_and_signal, start, wait_all

STEPS = 12
CHECKPOINT_EVERY = 3
DELAY_S = 0.15  # per step in the signalled runs, so that the watcher acts at the step it chose
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The data, the compilation cache, and the straight run's losses (the reference)."""
    root = tmp_path_factory.mktemp("resume")
    base = {"data_dir": str(prepare_data(root / "data")), "compile_cache": str(root / "jax_cache"), "devices": 8,
            "steps": STEPS, "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY}
    straight = start({**base, "run_dir": str(root / "straight"), "out": str(root / "straight.out.json")}, root,
                     "straight")
    if wait_all([straight], TIMEOUT_S) != [0]:
        pytest.fail(log_tail(straight))
    losses = last_losses(root / "straight")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return root, base, losses


def finish(root, spec, name):
    """Restarts `spec` and runs it to the end; returns its result file."""
    proc = start({**spec, "step_delay_s": 0, "out": str(root / f"{name}.out.json")}, root, name)
    if wait_all([proc], TIMEOUT_S) != [0]:
        pytest.fail(log_tail(proc))
    return json.loads((root / f"{name}.out.json").read_text())


def test_kill_9_at_a_random_step_then_resume_gives_bitwise_the_straight_losses(setup):
    root, base, straight = setup
    kill_step = random.Random(3).randint(CHECKPOINT_EVERY + 1, STEPS - 2)
    spec = {**base, "run_dir": str(root / "killed"), "step_delay_s": DELAY_S, "out": str(root / "killed.out.json")}
    killed = run_and_signal(spec, root, "killed", at_step=kill_step, sig=signal.SIGKILL,
                            jitter_s=random.Random(4).uniform(0, DELAY_S), timeout_s=TIMEOUT_S)
    assert killed["returncode"] == -signal.SIGKILL, log_tail(killed["proc"])
    assert kill_step <= killed["last_step"] < STEPS  # it died mid-run, after the chosen step
    saved = complete_checkpoints(root / "killed")
    assert saved and max(saved) <= killed["last_step"]

    result = finish(root, spec, "resumed")
    resumed_from = min(int(s) for s in result["losses"]) - 1
    assert resumed_from == max(saved)  # it restarted from the newest complete checkpoint, not from scratch
    assert result["final_step"] == STEPS and not result["interrupted"]
    assert last_losses(root / "killed") == straight  # bitwise: every step's last logged loss
    assert {int(k): v for k, v in result["losses"].items()} == {s: straight[s] for s in range(resumed_from + 1,
                                                                                              STEPS + 1)}


def test_sigterm_stops_after_the_step_in_progress_with_a_checkpoint_and_resumes(setup):
    root, base, straight = setup
    at_step = random.Random(5).randint(2, STEPS - 4)
    spec = {**base, "run_dir": str(root / "terminated"), "step_delay_s": DELAY_S,
            "out": str(root / "terminated.out.json")}
    stopped = run_and_signal(spec, root, "terminated", at_step=at_step, sig=signal.SIGTERM, need_checkpoint=False,
                             timeout_s=TIMEOUT_S)
    assert stopped["returncode"] == 0, log_tail(stopped["proc"])  # a clean exit, not death by signal
    out = json.loads((root / "terminated.out.json").read_text())
    final = out["final_step"]
    assert out["interrupted"] and stopped["signalled_after"] <= final < STEPS
    assert final - stopped["signalled_after"] <= 1  # only the step in progress was finished
    assert final == stopped["last_step"] and final in complete_checkpoints(root / "terminated")

    result = finish(root, spec, "after_sigterm")
    assert min(int(s) for s in result["losses"]) == final + 1  # resumed exactly from the SIGTERM checkpoint
    assert last_losses(root / "terminated") == straight


@pytest.mark.slow
def test_benchmark_ten_kills_in_a_row(capsys):
    """benchmarks/resume_kill.py: ten SIGKILLs and restarts of one 30-step run, all bitwise identical."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "resume_kill.py"
    spec = importlib.util.spec_from_file_location("resume_kill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([])
    out = capsys.readouterr().out
    assert "bitwise identical to the straight run" in out and " NO" not in out
