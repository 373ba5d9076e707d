"""Deterministic task generators for tool use (docs/agents.md §3): each problem carries its reference program, so
oracle policies can write agent trajectories for SFT and scorers can check answers exactly, without any download.

Training generators use seeds below 10**6 and evaluation seeds from 10**9 on (agents.md §2.9)."""

from __future__ import annotations

import dataclasses
import importlib
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from internlm2_jax.agents.tools import Tool


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str  # "<suite>-<seed>-<index>": stable across machines
    suite: str  # the generator's name, e.g. "arith", "gsm"
    question: str  # what the user asks
    answer: str  # the canonical exact answer (an integer as its decimal string, a fraction as "p/q", ...)
    program: str  # a reference Python program that prints `answer` (what an oracle sends to the interpreter)
    needs_tool: bool  # False for control questions a tool would only slow down
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # difficulty, template name, ...


# Bump when any generator's output changes for the same arguments: evaluations record it (prompt hashes), and the
# tests pin each suite's output hash for this version.
GENERATOR_VERSION = 1
TRAIN_SEED_LIMIT = 10**6  # training generators use seeds below this
EVAL_SEED_START = 10**9  # evaluation generators use seeds from this on


# suite -> (module, function(rng, problem_id, difficulty) -> Problem, or a list of problems asked together: an
# MCQ's rotations, which take the next ids)
_MAKERS = {"arith": ("arith", "problem"), "arith_mul": ("arith", "product"), "gsm": ("gsm", "problem"),
           "math": ("math", "problem"), "control": ("control", "problem"), "mathbench": ("mathbench", "question"),
           "injection": ("injection", "problem")}
SUITES = tuple(_MAKERS)
# suite -> (module, function(problems) -> list of Tools): the plugins a suite's questions need, serving those
# problems' own data (the notes of the injection controls); announced with the same schemas whatever the problems.
_TOOLS = {"injection": ("injection", "tools")}
TOOL_SUITES = tuple(_TOOLS)


def generate(suite: str, n: int, seed: int, *, difficulty: int = 1) -> list[Problem]:
    """`n` problems of `suite` (one of `SUITES`), the same for the same arguments on every machine: one
    `random.Random` seeded with the string "suite/seed/difficulty" (string seeds go through SHA-512, never the
    per-process salted `hash()`) drives the whole list, so problem i depends neither on the machine nor on `n`."""
    if suite not in _MAKERS:
        raise ValueError(f"unknown suite {suite!r}; known: {sorted(_MAKERS)}")
    # Imported on use: the suite modules import `Problem` from this package.
    module, function = _MAKERS[suite]
    make = getattr(importlib.import_module(f"internlm2_jax.agents.tasks.{module}"), function)
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    rng = random.Random(f"{suite}/{seed}/{difficulty}")
    problems: list[Problem] = []
    while len(problems) < n:
        made = make(rng, f"{suite}-{seed}-{len(problems)}", difficulty)
        group = [made] if isinstance(made, Problem) else made
        problems += [dataclasses.replace(p, id=f"{suite}-{seed}-{len(problems) + k}") for k, p in enumerate(group)]
    # A group cut at n keeps problem i independent of n; scorers of grouped questions count whole groups only.
    return problems[:n]


def suite_tools(suite: str | None, problems: Sequence[Problem] = ()) -> list[Tool]:
    """The plugins `suite`'s questions need (none for most suites), serving `problems`' data; without problems
    they are announced all the same (their schemas do not depend on the data)."""
    if suite not in _TOOLS:
        return []
    module, function = _TOOLS[suite]
    return getattr(importlib.import_module(f"internlm2_jax.agents.tasks.{module}"), function)(problems)
