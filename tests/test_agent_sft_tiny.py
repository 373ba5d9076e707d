"""`experiments/agent_sft_tiny.py` (docs/agents.md §4.6): a CI-sized pass (few problems, few steps) that composes
oracle trajectories, SFT, and both evaluations (direct and through the agent loop with the sandboxed interpreter on
the in-process engine) into the report; the real gate, agent accuracy well above direct accuracy, behind `-m slow`."""

import dataclasses
import json

import pytest

from internlm2_jax.agents.trajectories import read_records
from internlm2_jax.experiment import load_experiment
from test_launch import ROOT

MODES = ("heldout_direct", "heldout_agent")


def shortened(module, steps: int):
    exp = module.config()
    train = dataclasses.replace(exp.train, steps=steps, batch_size=8, checkpoint_every=steps)
    return dataclasses.replace(exp, train=train,
                               optimizer=dataclasses.replace(exp.optimizer, warmup_steps=2, total_steps=steps))


@pytest.mark.slow  # ~40 s; the default run keeps under 30 min (tests/test_agents_tasks.py covers the records)
def test_a_short_run_writes_the_trajectories_and_a_report_with_both_accuracies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the experiment's run directory is relative
    module = load_experiment(ROOT / "experiments" / "agent_sft_tiny.py")
    report = module.run(shortened(module, 4), module.Sizes(train=40, controls=4, heldout=6, ood=0))
    records = read_records(tmp_path / module.DATA / "train.jsonl")
    episodes = {r["meta"]["episode"] for r in records}
    assert {"tool", "no_tool"} <= episodes and all(r["meta"]["answer"] for r in records)
    saved = json.loads((tmp_path / module.RUN / "report.json").read_text())
    assert saved["steps"] == 4 and "ood_agent" not in saved
    for mode in (*MODES, "heldout_lying", "heldout_unheard"):
        metrics = saved[mode]
        assert metrics["n"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["mean_turns"] >= 1
    assert saved["heldout_direct"]["tool_rate"] == 0.0  # no interpreter announced, one turn: calls are banned
    assert saved["margin"] == pytest.approx(report["margin"])
    assert "| heldout agent |" in (tmp_path / module.RUN / "report.md").read_text()


@pytest.mark.slow
def test_the_interpreter_beats_answering_directly(tmp_path, monkeypatch):
    """The gate of agents.md §4.6 on the experiment as configured: the same model is near 0 answering 4-digit ×
    3-digit products directly and far better writing the program."""
    monkeypatch.chdir(tmp_path)
    module = load_experiment(ROOT / "experiments" / "agent_sft_tiny.py")
    report = module.run(module.config())
    direct, agent = report["heldout_direct"], report["heldout_agent"]
    assert direct["accuracy"] <= 0.05
    assert agent["accuracy"] - direct["accuracy"] >= 0.4
    assert agent["parse_error_rate"] <= 0.05 and agent["exec_error_rate"] <= 0.05
    assert 1.9 <= agent["mean_turns"] <= 2.2
    # The causality checks: answers follow a lying interpreter, and collapse when its results are not shown.
    assert report["heldout_lying"]["accuracy"] >= 0.8 * agent["accuracy"]
    assert report["heldout_unheard"]["accuracy"] <= 0.05
