"""The tiny RL experiments (docs/rlhf.md §3.6 item 2): noisy-demonstration data, the exact-body proxy rule, and
`experiments/ppo_tiny.py` / `grpo_tiny.py` composed end to end on a CI budget; the gate (SFT about 0.5, PPO and GRPO
at least 0.8 held-out pass@1 with the sandboxed doctest reward) behind `-m slow`."""

import dataclasses
import json
import math
import random

import numpy as np
import pytest

from internlm2_jax.experiment import load_experiment
from internlm2_jax.recipes.finetune_data import _TASKS, passes_doctest
from internlm2_jax.recipes.rl_tasks import (BODY_RULE, correct_answer, correct_body, noisy_demonstrations,
                                            rl_prompts, task_name)
from internlm2_jax.train.rl.rewards import doctest_passes
from test_launch import ROOT, launch


def test_noisy_demonstrations_are_half_correct_and_their_wrong_answers_fail_the_doctest():
    records = noisy_demonstrations(400, seed=0)
    correct = 0
    for record in records:
        user, assistant = record["messages"]
        stub = user["content"].split("\n", 1)[1]
        if assistant["content"] == correct_answer(stub):
            correct += 1
        else:  # the wrong answer, put back into the stub with its docstring, fails this stub's doctest
            name = task_name(stub)
            body = assistant["content"].split("return ", 1)[1]
            assert not passes_doctest(stub.replace("return ...", f"return {body}"), name)
    assert 0.42 < correct / len(records) < 0.58
    assert noisy_demonstrations(50, seed=3) == noisy_demonstrations(50, seed=3)
    assert {task_name(r["meta"]) for r in rl_prompts(300, seed=1)} == {task[0] for task in _TASKS}


def test_the_exact_body_proxy_agrees_with_the_sandboxed_doctest_on_right_and_wrong_answers():
    rng = random.Random(0)
    metas, texts = [], []
    for record in rl_prompts(6, seed=4):
        stub = record["meta"]
        name, args, _, good, bad, _ = next(t for t in _TASKS if t[0] == task_name(stub))
        failing = [b for b in bad if not passes_doctest(stub.replace("return ...", f"return {b}"), name)]
        for body in (good, rng.choice(failing)):  # a wrong body can pass one instance by chance ('a' for max)
            metas.append(stub)
            texts.append(f"def {name}({args}):\n    return {body}\n")
    stopped = np.ones(len(texts), bool)
    proxy = correct_body(metas, texts, stopped)
    np.testing.assert_array_equal(proxy, np.tile([1.0, 0.0], 6))
    np.testing.assert_array_equal(doctest_passes(metas, texts, stopped), proxy)
    assert correct_body(metas[:1], texts[:1], np.zeros(1, bool))[0] == 0.0  # cut off before its stop token
    from internlm2_jax.train.rl.rewards import _RULES
    assert _RULES[BODY_RULE] is correct_body


@pytest.mark.slow  # ~85 s; notebooks/rlhf.ipynb runs ppo_tiny's SFT and PPO by default
def test_ppo_and_grpo_tiny_compose_sft_rl_and_the_report(tmp_path, monkeypatch):
    """A CI-sized pass through both experiments: a short SFT, 3 RL iterations each with the exact-body proxy, the
    before/after pass@1 and KL in the report, the loop's metrics, curves and sample dumps. Numbers, not the gate."""
    monkeypatch.chdir(tmp_path)  # the experiments' run directories are relative
    ppo = load_experiment(ROOT / "experiments" / "ppo_tiny.py")
    grpo = load_experiment(ROOT / "experiments" / "grpo_tiny.py")
    exp = ppo.config()
    exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=10, checkpoint_every=10),
                              optimizer=dataclasses.replace(exp.optimizer, warmup_steps=2, total_steps=10))
    eval_kw = {"max_prompts": 32, "samples_per_prompt": 2}
    reports = {}
    for module, critic in ((ppo, True), (grpo, False)):
        cfg = module.rl_config()
        cfg = dataclasses.replace(cfg, iterations=3, prompts_per_iteration=cfg.prompts_per_iteration // 2,
                                  critic_warmup_iterations=1, checkpoint_every=3, dump_every=3)
        reports[cfg.algorithm] = ppo.run_rl(exp, cfg, reward_name=BODY_RULE, critic=critic, eval_kw=eval_kw,
                                            progress=False)
        run = tmp_path / cfg.run_dir
        saved = json.loads((run / "rl_report.json").read_text())
        assert saved["iterations"] == 3 and saved["algorithm"] == cfg.algorithm
        for key in ("pass_at_1_sft", "pass_at_1_rl"):
            assert 0.0 <= saved[key] <= 1.0
        assert math.isfinite(saved["heldout_mean_kl_to_sft"]) and saved["heldout_mean_kl_to_sft"] > -0.05
        assert saved["heldout_samples"] == 64
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
        assert (run / "rl_curves.png").exists() and (run / "rl_report.md").exists()
        assert len((run / "samples/iter_3.jsonl").read_text().splitlines()) == cfg.rows
    assert reports["ppo"]["pass_at_1_sft"] == reports["grpo"]["pass_at_1_sft"]  # one SFT run, evaluated alike


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["ppo_tiny.py", "grpo_tiny.py"])
def test_rl_beats_the_sft_ceiling_on_complete_the_doctest(tmp_path_factory, experiment):
    work = tmp_path_factory.getbasetemp() / "rl_tiny"  # both experiments share the SFT run
    work.mkdir(exist_ok=True)
    done = launch(ROOT / "experiments" / experiment, cwd=work, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((work / "runs" / experiment.removesuffix(".py") / "rl_report.json").read_text())
    assert 0.35 <= report["pass_at_1_sft"] <= 0.65, report  # the SFT ceiling, by construction
    assert report["pass_at_1_rl"] >= 0.8, report
    assert 0.0 <= report["heldout_mean_kl_to_sft"] < 0.2, report  # the KL budget
