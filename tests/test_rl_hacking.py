"""COOL's reward-hacking tooling (train/rl/hacking.py; docs rlhf §2.10, §3.7): each monitor fires on the drift it
names and stays quiet otherwise, and patch pairs contrast early (chosen) and late (rejected) responses to the same
prompt in the reward model's pair format."""

import json

import pytest

from internlm2_jax.config import ConfigError
from internlm2_jax.data.conversations import preference_pair
from internlm2_jax.train.rl.hacking import MonitorConfig, check_hacking, make_patch_pairs, read_samples, write_pairs

CALM = {"score": 0.5, "gold": 0.5, "response_length_p95": 40.0, "kl": 0.01, "actor/entropy": 1.0, "stop_rate": 0.95}


def history(changes_in_second_window: dict, window=3):
    first = {k: dict(CALM) for k in range(1, window + 1)}
    second = {k: {**CALM, **changes_in_second_window} for k in range(window + 1, 2 * window + 1)}
    return {**first, **second}


def fired(changes, **cfg):
    return [a.name for a in check_hacking(history(changes), MonitorConfig(window=3, **cfg))]


def test_a_calm_run_raises_nothing():
    assert fired({}, kl_budget=0.1, entropy_floor=0.1) == []
    assert check_hacking({}, MonitorConfig()) == [] and check_hacking({1: CALM}, MonitorConfig()) == []


@pytest.mark.parametrize("changes, cfg, expected", [
    ({"score": 0.9, "gold": 0.3}, {}, "score_up_gold_down"),
    ({"response_length_p95": 90.0}, {}, "length_drift"),
    ({"kl": 0.5}, {"kl_budget": 0.1}, "kl_budget"),
    ({"actor/entropy": 0.01}, {"entropy_floor": 0.1}, "entropy_collapse"),
    ({"stop_rate": 0.4}, {}, "stop_rate_drop"),
])
def test_each_monitor_fires_on_its_drift(changes, cfg, expected):
    assert fired(changes, **cfg) == [expected]


def test_monitors_stay_quiet_on_honest_progress():
    assert fired({"score": 0.9, "gold": 0.8}) == []  # the score rose and the gold check with it
    assert fired({"response_length_p95": 90.0, "score": 0.9}) == []  # longer, and scored better for it


def test_alerts_say_what_moved():
    [alert] = check_hacking(history({"score": 0.9, "gold": 0.3}), MonitorConfig(window=3))
    assert alert.iteration == 6 and "0.500 -> 0.900" in alert.message and "0.500 -> 0.300" in alert.message


def test_monitor_config_refuses_unknown_alerts():
    with pytest.raises(ConfigError, match="unknown alerts"):
        MonitorConfig(stop_round_on=("lenght_drift",))


def sample(row, prompt, response, domain_id=0, **extra):
    return {"row": row, "record": prompt, "domain_id": domain_id, "response": response, **extra}


def test_patch_pairs_prefer_early_responses_to_the_hacked_late_ones(tmp_path):
    early = [sample(0, "Explain sort().", "Sorts in place."), sample(1, [{"role": "user", "content": "Hi"}], "Hi!")]
    late = [sample(0, "Explain sort().", "Sorts in place. " * 8), sample(1, [{"role": "user", "content": "Hi"}],
                                                                        "Hello!"),
            sample(2, "Unseen prompt", "x" * 99)]
    longer = lambda before, after: len(after["response"]) > 2 * len(before["response"])  # noqa: E731
    pairs = make_patch_pairs(early, late, longer, domains=("helpful", "harmless"))
    assert pairs == [{"domain": "helpful", "prompt": "Explain sort().", "chosen": "Sorts in place.",
                      "rejected": "Sorts in place. " * 8}]
    assert make_patch_pairs(early, late, lambda a, b: True, domains=("helpful",), limit=1) == pairs
    # The reward model's pair reader takes them as they are.
    path = write_pairs(pairs, tmp_path / "patches.jsonl")
    domain, prompt, chosen, rejected = preference_pair(json.loads(path.read_text().splitlines()[0]))
    assert domain == "helpful" and prompt[0]["content"] == "Explain sort()." and chosen[0]["role"] == "assistant"
    dumped = tmp_path / "iter_1.jsonl"
    dumped.write_text("".join(json.dumps(s) + "\n" for s in early))
    assert read_samples(dumped) == early


def test_patch_pairs_need_records_and_domains():
    with pytest.raises(ValueError, match="no 'record'"):
        make_patch_pairs([sample(0, None, "a")], [sample(0, None, "b")], lambda a, b: True, domains=("x",))
    with pytest.raises(ValueError, match="domain id -1"):
        make_patch_pairs([sample(0, "p", "a", -1)], [sample(0, "p", "b", -1)], lambda a, b: True, domains=("x",))
