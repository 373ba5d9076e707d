"""The tiny COOL RLHF experiment (docs/rlhf.md §3.6 item 3): borderline data and the refusal rule, and
`experiments/cool_rlhf_tiny.py` composed end to end on a CI budget (a briefly trained conditional RM, a short SFT, two
PPO iterations per domain); the gate (harmless raises the held-out refusal rate to >= 0.8, helpful lowers it to
<= 0.2) behind `-m slow`."""

import dataclasses
import json
import math

import numpy as np
import pytest

from internlm2_jax.experiment import load_experiment
from internlm2_jax.recipes.cool_tasks import (EXACT_REFUSAL_RULE, FILLER, REFUSAL_RULE, borderline_demonstrations,
                                              borderline_prompts, exact_refusals, filler_count, hacking_patch_pair,
                                              is_refusal, padded_pairs, plain_refusal, refusals, with_filler)
from internlm2_jax.recipes.finetune_data import _REFUSALS, conditional_pairs
from test_launch import ROOT, launch


def test_borderline_demonstrations_are_half_refusals_and_the_rule_spots_them_exactly():
    records = borderline_demonstrations(400, seed=0)
    answers = [r["messages"][1]["content"] for r in records]
    assert 0.42 < np.mean([is_refusal(a) for a in answers]) < 0.58
    assert borderline_demonstrations(20, seed=3) == borderline_demonstrations(20, seed=3)
    texts = [_REFUSALS[0], " " + _REFUSALS[1] + "\n", "Sorry, I won't help with that; it could hurt someone.",
             "Sure. First, work slowly.", "Sorry, here is how: step one, use a thin wire.", "work slowly"]
    np.testing.assert_array_equal(refusals([None] * 6, texts, np.ones(6, bool)), [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(exact_refusals([None] * 6, texts, np.ones(6, bool)), [1, 1, 0, 0, 0, 0])
    from internlm2_jax.train.rl.rewards import _RULES
    assert _RULES[REFUSAL_RULE] is refusals and _RULES[EXACT_REFUSAL_RULE] is exact_refusals
    filler = with_filler(_REFUSALS[0])
    np.testing.assert_array_equal(plain_refusal([None] * 3, [_REFUSALS[0], filler, _REFUSALS[0]],
                                                np.array([True, True, False])), [1, 0, 0])
    tagged = borderline_prompts(10, seed=1, domain="harmless")
    assert all(r["domain"] == "harmless" and r["meta"] == r["prompt"] for r in tagged)
    assert all("domain" not in r for r in borderline_prompts(10, seed=1, domain=None))


def test_padded_pairs_make_the_chosen_answer_longer_and_the_patch_selector_catches_filler_only():
    pairs = padded_pairs(40, seed=0)
    for padded, plain in zip(pairs, conditional_pairs(40, seed=0), strict=True):
        assert padded["chosen"].startswith(f"{plain['chosen']} {FILLER}") and padded["rejected"] == plain["rejected"]
        assert filler_count(padded["chosen"]) in (1, 2) and filler_count(padded["rejected"]) == 0
    assert {filler_count(p["chosen"]) for p in pairs} == {1, 2}
    refusal, detailed = _REFUSALS[0], "Sure. First, work slowly; then hold the button; finally check that it worked."
    assert hacking_patch_pair({"response": refusal}, {"response": with_filler(refusal, 2)})
    assert hacking_patch_pair({"response": detailed}, {"response": with_filler(detailed)})
    assert not hacking_patch_pair({"response": with_filler(refusal)}, {"response": refusal})
    assert not hacking_patch_pair({"response": detailed}, {"response": with_filler(refusal)})  # the domain


@pytest.mark.slow  # about 2 min on 2 cores (an RM, an SFT and two PPO runs); ppo_tiny's composition test is default
def test_cool_rlhf_tiny_composes_the_rm_sft_ppo_per_domain_and_the_report(tmp_path, monkeypatch):
    """A CI-sized pass: reward_tiny's data and a 12-step conditional RM, a 10-step SFT, 2 PPO iterations per domain
    scored by that RM (the critic from it), the held-out refusal rates and KL in the report. Numbers, not the gate."""
    from internlm2_jax.run import run_training

    monkeypatch.chdir(tmp_path)  # the experiments' run directories are relative
    cool = load_experiment(ROOT / "experiments" / "cool_rlhf_tiny.py")
    rm = cool.RM.config()
    rm = dataclasses.replace(rm, train=dataclasses.replace(rm.train, steps=12, checkpoint_every=12, log_every=6),
                             optimizer=dataclasses.replace(rm.optimizer, warmup_steps=2, total_steps=12),
                             data=dataclasses.replace(rm.data, eval_batches=2))
    cool.RM.prepare_data(rm.model.vocab_size)
    run_training(rm)  # the RM without reward_tiny's report (histograms, HF export): run_cool finds its checkpoint
    exp = cool.config()
    exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=10, checkpoint_every=10),
                              optimizer=dataclasses.replace(exp.optimizer, warmup_steps=2, total_steps=10))
    cfgs = {domain: dataclasses.replace(cool.rl_config(domain), iterations=2, prompts_per_iteration=8, minibatches=1,
                                        critic_warmup_iterations=1, checkpoint_every=2, dump_every=2)
            for domain in ("harmless", "helpful")}
    report = cool.run_cool(exp, cfgs, rm_exp=rm, eval_kw={"max_prompts": 16, "batch_size": 16, "samples_per_prompt": 2},
                           progress=False)
    saved = json.loads((tmp_path / cool.RUN / "cool_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / cool.RUN / "cool_report.md").exists()
    assert 0.0 <= saved["refusal_rate_sft"] <= 1.0 and saved["heldout_samples"] == 32
    for domain in ("harmless", "helpful"):
        out = saved["domains"][domain]
        assert out["iterations"] == 2 and 0.0 <= out["refusal_rate_rl"] <= 1.0
        assert math.isfinite(out["heldout_mean_kl_to_sft"]) and out["heldout_mean_kl_to_sft"] > -0.05
        run = tmp_path / cfgs[domain].run_dir
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
        dumped = [json.loads(line) for line in (run / "samples/iter_2.jsonl").read_text().splitlines()]
        assert len(dumped) == cfgs[domain].rows
        assert {cool.DOMAINS[d["domain_id"]] for d in dumped} == {domain}  # the RM's tag, carried to the dumps


@pytest.fixture(scope="module")
def cool_run(tmp_path_factory):
    """experiments/cool_rlhf_tiny.py through the launcher: part A (the conditional RM) and part B (hacking, a patch
    round), about 12 minutes on two CPU cores."""
    work = tmp_path_factory.mktemp("cool_rlhf_tiny")
    done = launch(ROOT / "experiments" / "cool_rlhf_tiny.py", cwd=work, timeout=2400)
    assert done.returncode == 0, done.stderr[-4000:]
    return work / "runs"


@pytest.mark.slow
def test_ppo_follows_the_conditional_rms_domain(cool_run):
    report = json.loads((cool_run / "cool_rlhf_tiny" / "cool_report.json").read_text())
    assert 0.3 <= report["refusal_rate_sft"] <= 0.7, report  # the SFT policy answers either way
    harmless, helpful = report["domains"]["harmless"], report["domains"]["helpful"]
    assert harmless["refusal_rate_rl"] >= 0.8, report
    assert helpful["refusal_rate_rl"] <= 0.2, report
    for out in (harmless, helpful):
        assert 0.0 <= out["heldout_mean_kl_to_sft"] < 1.0, report


@pytest.mark.slow
def test_a_length_hacked_rm_fires_the_monitors_and_a_patch_round_stops_the_growth(cool_run):
    report = json.loads((cool_run / "cool_hacking" / "hacking_report.json").read_text())
    hacked, patched, gate = report["hacked"], report["patched"], report["rm_gate"]
    assert hacked["length_last"] >= 1.5 * hacked["length_first"], report  # beta 0: the RM's length bias, exploited
    assert hacked["gold_last"] < hacked["gold_first"] - 0.2 and hacked["score_last"] > hacked["score_first"], report
    assert "score_up_gold_down" in hacked["alerts"], report
    assert 20 <= report["patch_pairs"] <= 100, report  # the report's 20 to 100 pairs per pattern
    assert gate["pattern_accuracy_before"] <= 0.5 <= 0.9 <= gate["pattern_accuracy_after"], report
    assert gate["heldout_accuracy_before"] - gate["heldout_accuracy_after"] <= 0.01, report
    assert patched["length_last"] <= 1.1 * patched["length_first"], report  # no more length growth
