"""COOL RLHF's guard against reward hacking (docs/rlhf.md §1.11, §2.10): monitors over the per-iteration metrics,
and the fast path's patch pairs built from the samples the loop dumps.

The report's fast path: after a PPO round, find the patterns the policy exploits (high RM score, bad response),
contrast early and late responses of the round as preference pairs ("20 to 100 such preference pairs ... is
sufficient"), update the reward model on them (with a replay of its original pairs) and run the next round.

- `check_hacking(history, cfg)`: alerts from the metrics the loop logs, each comparing the last `window`
  iterations with the `window` before: the RM score rising while a gold check (`gold`, a reward source the loop
  logs but never optimises) falls; response length growing much faster than the score; KL per token over a
  budget; entropy collapsing; the stop rate falling. `train_rl` runs it every iteration, logs the alerts and stops
  the round on those named in `stop_round_on`.
- `make_patch_pairs(early, late, ...)`: preference records `{"domain", "prompt", "chosen", "rejected"}` in the
  reward-model pair format (`data.conversations.PairDataIterator`), the early response chosen over the late one
  of the same prompt where a `prefer` rule says the late one is the hacked pattern.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from internlm2_jax.config import ConfigError

ALERTS = ("score_up_gold_down", "length_drift", "kl_budget", "entropy_collapse", "stop_rate_drop")


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the hacking monitors; `stop_round_on` names the alerts that end the round (default: log only)."""

    window: int = 5  # iterations per compared window
    gold_drop: float = 0.02  # the gold metric fell by more than this while the score rose
    length_growth: float = 1.5  # response length p95 grew by this factor or more...
    score_growth: float = 0.1  # ...while the score rose by less than this (in score units)
    kl_budget: float | None = None  # mean per-token KL to the reference above this
    entropy_floor: float | None = None  # mean per-token entropy below this
    stop_rate_drop: float = 0.2  # the share of responses ending on a stop id fell by more than this
    stop_round_on: tuple[str, ...] = ()

    def __post_init__(self):
        if self.window < 1:
            raise ConfigError(f"monitor.window={self.window!r}: must be >= 1")
        unknown = [name for name in self.stop_round_on if name not in ALERTS]
        if unknown:
            raise ConfigError(f"monitor.stop_round_on={self.stop_round_on!r}: unknown alerts {unknown}; the alerts "
                              f"are {ALERTS}")
        if self.length_growth <= 1:
            raise ConfigError(f"monitor.length_growth={self.length_growth!r}: must be > 1 (a growth factor)")


@dataclasses.dataclass(frozen=True)
class Alert:
    name: str  # one of ALERTS
    iteration: int
    message: str


def _window_means(history: Mapping[int, Mapping[str, float]], key: str, window: int) -> tuple[float, float] | None:
    """(mean over the `window` iterations before the last window, mean over the last window), or None when the
    history is too short or lacks `key`."""
    steps = sorted(k for k in history if key in history[k])
    if len(steps) < 2 * window:
        return None
    values = [history[k][key] for k in steps[-2 * window:]]
    return float(np.mean(values[:window])), float(np.mean(values[window:]))


def check_hacking(history: Mapping[int, Mapping[str, float]], cfg: MonitorConfig = MonitorConfig()) -> list[Alert]:
    """The alerts the metrics of iterations 1..now raise at the newest iteration (see the module docstring)."""
    if not history:
        return []
    now = max(history)
    alerts = []

    def alert(name, message):
        alerts.append(Alert(name, now, message))

    score = _window_means(history, "score", cfg.window)
    gold = _window_means(history, "gold", cfg.window)
    if score and gold and score[1] > score[0] and gold[0] - gold[1] > cfg.gold_drop:
        alert("score_up_gold_down", f"the reward score rose {score[0]:.3f} -> {score[1]:.3f} while the gold check "
                                    f"fell {gold[0]:.3f} -> {gold[1]:.3f} (last {cfg.window} iterations vs the "
                                    "ones before)")
    length = _window_means(history, "response_length_p95", cfg.window)
    if score and length and length[0] > 0 and length[1] / length[0] >= cfg.length_growth \
            and score[1] - score[0] < cfg.score_growth:
        alert("length_drift", f"response length p95 grew {length[0]:.1f} -> {length[1]:.1f} "
                              f"(x{length[1] / length[0]:.2f}) while the score moved only {score[1] - score[0]:+.3f}")
    if cfg.kl_budget is not None:
        kl = [history[k]["kl"] for k in sorted(history)[-cfg.window:] if "kl" in history[k]]
        if kl and np.mean(kl) > cfg.kl_budget:
            alert("kl_budget", f"KL to the reference {np.mean(kl):.4f} per token over the last {len(kl)} iterations "
                               f"exceeds the budget {cfg.kl_budget}")
    if cfg.entropy_floor is not None:
        entropy = [history[k]["actor/entropy"] for k in sorted(history)[-cfg.window:] if "actor/entropy" in history[k]]
        if entropy and np.mean(entropy) < cfg.entropy_floor:
            alert("entropy_collapse", f"policy entropy {np.mean(entropy):.4f} per token is under the floor "
                                      f"{cfg.entropy_floor}")
    stops = _window_means(history, "stop_rate", cfg.window)
    if stops and stops[0] - stops[1] > cfg.stop_rate_drop:
        alert("stop_rate_drop", f"the stop rate fell {stops[0]:.2f} -> {stops[1]:.2f}: responses run to "
                                "max_new_tokens")
    return alerts


# ---- the fast path: patch pairs ------------------------------------------------------------------------------------


def read_samples(path: str | epath.Path) -> list[dict[str, Any]]:
    """The samples `train_rl` dumped (`samples/iter_{k}.jsonl`); a run of several processes wrote one file each
    (`iter_{k}.process{p}.jsonl`), which are read together, in process order, for that name."""
    path = epath.Path(path)
    parts = [path] if path.exists() else sorted(
        path.parent.glob(f"{path.stem}.process*.jsonl"), key=lambda p: int(p.stem.rsplit("process", 1)[1]))
    if not parts:
        raise FileNotFoundError(f"{path}: no sample dump (nor per-process dumps {path.stem}.process*.jsonl)")
    return [json.loads(line) for part in parts for line in part.read_text().splitlines() if line.strip()]


def make_patch_pairs(early: Iterable[Mapping[str, Any]], late: Iterable[Mapping[str, Any]],
                     prefer: Callable[[Mapping[str, Any], Mapping[str, Any]], bool], *, domains: Sequence[str],
                     limit: int = 100) -> list[dict[str, Any]]:
    """Reward-model preference records contrasting early (chosen) and late (rejected) responses to the same prompt.

    `early`, `late`: dumped samples (`read_samples`) of one round, which carry each prompt as its record wrote it
    (`record`), its `domain_id`, and the decoded `response`. `prefer(early_sample, late_sample)` says whether this
    pair shows the hacked pattern (e.g. the late response is much longer but no more correct): only those pairs
    are kept, at most `limit` (the report used 20 to 100 per pattern). A sample without a record or domain is an
    error: the conditional RM is trained per domain, on the prompt as the policy saw it."""
    by_prompt: dict[str, list[Mapping[str, Any]]] = {}
    for sample in early:
        by_prompt.setdefault(_prompt_key(sample), []).append(sample)
    pairs = []
    for sample in late:
        for before in by_prompt.get(_prompt_key(sample), []):
            if len(pairs) == limit:
                return pairs
            if before["response"] != sample["response"] and prefer(before, sample):
                pairs.append({"domain": domains[_domain_id(sample, domains)], "prompt": sample["record"],
                              "chosen": before["response"], "rejected": sample["response"]})
                break
    return pairs


def _prompt_key(sample: Mapping[str, Any]) -> str:
    if sample.get("record") is None:
        raise ValueError(f"sample {sample.get('row')} has no 'record' (the prompt as written): dump samples from a "
                         "prompt source that keeps its records (PromptDataIterator)")
    return json.dumps(sample["record"], sort_keys=True)


def _domain_id(sample: Mapping[str, Any], domains: Sequence[str]) -> int:
    domain_id = int(sample.get("domain_id", -1))
    if not 0 <= domain_id < len(domains):
        raise ValueError(f"sample {sample.get('row')} has domain id {domain_id}, not one of the {len(domains)} "
                         f"domains {tuple(domains)}: a patch pair for the conditional RM needs its domain")
    return domain_id


def write_pairs(pairs: Sequence[Mapping[str, Any]], path: str | epath.Path) -> epath.Path:
    """JSONL the reward model's pair iterator reads (`data.format="pairs"`)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return path
