"""MathBench-like set (agents.md §1.8, §3, §4.7): the generator is deterministic and pinned, each level has its kinds,
MCQs come as 4 rotations whose right letter moves through A-D; option letters are read as OpenCompass's
`first_option_postprocess` reads them; through the real loop and sandbox an oracle scores 100% and 100% circular in
every mode, and a client that always answers "A" gets exactly 25% of the rows and no question under CircularEval."""

import dataclasses
import hashlib
import json
from fractions import Fraction

import pytest

from internlm2_jax.agents.clients import ScriptedClient
from internlm2_jax.agents.tasks import generate
from internlm2_jax.agents.tasks.mathbench import LETTERS, LEVELS, MCQ_INSTRUCTION
from internlm2_jax.agents.tasks.oracle import OraclePolicy
from internlm2_jax.eval.agent import AgentTaskConfig, load_problems, run_agent_task
from internlm2_jax.eval.agent_scoring import agent_metrics, circular_metrics, option_answer
from internlm2_jax.eval.tasks import Reader, Task

SEED = 10**9 + 7  # difficulty 2, first 10 rows: an MCQ (4 rows), a cloze question, an MCQ, and a group cut at row 9
# sha256 of 20 problems (seed 7) per difficulty, for GENERATOR_VERSION 1.
PINNED = {1: "53940ecbbc2eb4a447c3add0e3790b598c2e92d8eee6dc8ae8cc7bff93259635",
          2: "c36b2ff88622fd7a50f21e84594863e1f8877b7083d5d51be375202fe3ac26b2",
          3: "a55aca7ac2d2f214db6dc9cc12548070fbd829d03c2459e9138e4726e1a1f8d2"}


def digest(problems):
    return hashlib.sha256(json.dumps([dataclasses.asdict(p) for p in problems], sort_keys=True).encode()).hexdigest()


def mathbench_task(**fields):
    config = AgentTaskConfig(**{"suite": "mathbench", "n": 10, "seed": SEED, "difficulty": 2, **fields})
    return Task(f"mathbench-{config.mode}", Reader("agents.tasks:mathbench"), inferencer="agent", agent=config)


def oracle(problems):
    """Knows each problem: runs its reference program and answers with what it printed (agent mode, through
    `OraclePolicy`), returns the answer from `solution()` (PAL), or states it (direct mode)."""
    def policy(prompt):
        user = next(m["content"] for m in prompt.messages if m["role"] == "user")
        # The longest question the turn contains: a cloze stem is also the start of an MCQ asking the same.
        problem = max((p for p in problems if p.question in user), key=lambda p: len(p.question))
        if "solution()" in user:
            *steps, last = problem.program.splitlines()
            body = "\n".join(f"    {line}" for line in [*steps, "return " + last.removeprefix("print")])
            return f"```python\ndef solution():\n{body}\n```"
        return OraclePolicy(problem, "tool" if prompt.interpreter else "no_tool").next_turn(prompt.messages)
    return policy


# ---- the generator ---------------------------------------------------------------------------------------------


def test_the_generator_is_pinned_and_each_level_has_its_kinds_in_both_formats():
    for difficulty, expected in PINNED.items():
        assert digest(generate("mathbench", 20, 7, difficulty=difficulty)) == expected, difficulty
    kinds = {}
    for difficulty in (1, 2, 3, 5):
        problems = generate("mathbench", 400, 3, difficulty=difficulty)
        assert {p.meta["level"] for p in problems} == {LEVELS[min(difficulty, 3) - 1]}
        assert {p.meta["format"] for p in problems} == {"cloze", "mcq"}
        kinds[difficulty] = {p.meta["kind"] for p in problems}
    assert [len(kinds[d]) for d in (1, 2, 3)] == [4, 6, 7] and kinds[5] == kinds[3]
    cloze = [p for p in generate("mathbench", 200, 3, difficulty=2) if p.meta["format"] == "cloze"]
    assert all(p.answer == p.meta["value"] and "circular" not in p.meta and "\nA. " not in p.question for p in cloze)
    assert any("/" in p.answer for p in cloze)
    assert all(str(Fraction(p.answer)) == p.answer for p in cloze)  # integers, or fractions "p/q" in lowest terms


def test_an_mcq_is_four_rotations_of_distinct_options_with_the_right_letter_moving():
    problems = generate("mathbench", 200, 5, difficulty=3)
    groups = {}
    for p in problems:
        if p.meta["format"] == "mcq":
            groups.setdefault(p.meta["circular"]["group"], []).append(p)
    assert len(groups) >= 20
    for group, rotations in list(groups.items())[:-1]:  # the last may be cut at n
        assert [p.meta["circular"]["rotation"] for p in rotations] == [0, 1, 2, 3] and rotations[0].id == group
        indices = [int(p.id.rsplit("-", 1)[1]) for p in rotations]
        assert indices == list(range(indices[0], indices[0] + 4))  # consecutive rows
        assert sorted(p.answer for p in rotations) == list(LETTERS)  # always "A" is right exactly once
        first = list(rotations[0].meta["options"].values())
        assert len(set(first)) == 4 and first.count(rotations[0].meta["value"]) == 1
        for k, p in enumerate(rotations):
            options = p.meta["options"]
            assert list(options.values()) == first[k:] + first[:k]
            assert options[p.answer] == p.meta["value"]
            assert p.question.endswith(MCQ_INSTRUCTION)
            assert all(f"\n{letter}. {value}\n" in p.question for letter, value in options.items())
            # Plausible: numbers of the answer's kind, never negative unless the answer is.
            assert all(Fraction(v) >= 0 or Fraction(p.meta["value"]) < 0 for v in options.values())
    cut = generate("mathbench", 10, SEED, difficulty=2)
    assert [p.meta.get("circular", {}).get("rotation") for p in cut] == [0, 1, 2, 3, None, 0, 1, 2, 3, 0]
    assert generate("mathbench", 30, SEED, difficulty=2)[:10] == cut  # cutting a group does not change the rest


# ---- option extraction and CircularEval --------------------------------------------------------------------------

OPTIONS = {"A": "12", "B": "7/12", "C": "54", "D": "0.5"}


@pytest.mark.parametrize("text, letter", [
    ("The answer is \\boxed{B}.", "B"),
    ("The answer is (C).", "C"),
    ("Answer: D", "D"),
    ("B. 7/12", "B"),
    ("A is wrong and so is B; the correct answer is C.", "C"),  # the stated answer beats letters met before it
    ("Apple pie aside, I pick D", "D"),  # "Apple" and "I" are not options
    ("The answer is \\boxed{7/12}.", "B"),  # no letter: the option whose value the answer states exactly
    ("So 3/4 of 72 is \\boxed{54}.", "C"),
    ("\\boxed{1/2}", "D"),  # exact value: 1/2 is 0.5
    ("\\boxed{13}", ""),  # no option has it
    ("no idea", ""),
    ("", ""),
    (None, ""),
])
def test_option_answer(text, letter):
    assert option_answer(text, OPTIONS) == letter


def test_circular_accuracy_counts_whole_groups_and_cloze_questions():
    def row(correct, group=None):
        extra = {"group": group, "group_size": 4} if group else {}
        return {"correct": correct, "prediction": "A", "needs_tool": True, "calls": 0, "call_errors": 0,
                "timeouts": 0, "parse_errors": 0, "attempts": 0, "last_call_ok": False, "last_output_correct": False,
                "turns": 1, "stop": "answered", **extra}

    rows = ([row(True, "g1")] * 4 + [row(True, "g2")] * 3 + [row(False, "g2")] + [row(True), row(False)]
            + [row(True, "cut")] * 2)  # a group cut at n: left out of the circular count, kept in accuracy
    assert circular_metrics(rows) == {"circular_accuracy": pytest.approx(2 / 4), "circular_questions": 4}
    metrics = agent_metrics(rows)
    assert metrics["accuracy"] == pytest.approx(10 / 12) and metrics["circular_accuracy"] == pytest.approx(0.5)
    assert "circular_accuracy" not in agent_metrics([row(True), row(False)])  # other sets: metrics unchanged


# ---- through the loop --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["direct", "pal", "agent"])
def test_an_oracle_scores_everything_and_every_question_under_circular_eval(released, mode):
    task = mathbench_task(mode=mode)
    problems = load_problems(task.agent, None)
    result = run_agent_task(None, released, task, client=ScriptedClient(released, oracle(problems)))
    assert result["accuracy"] == 1.0 and result["circular_accuracy"] == 1.0, result["details"]
    assert result["circular_questions"] == 3 and result["no_answer_rate"] == 0.0  # 2 MCQs + 1 cloze; 1 cut
    assert [d["prediction"] for d in result["details"]] == [p.answer for p in problems]
    if mode == "agent":
        assert result["action_pct"] == result["code_acc"] == result["reasoning_acc"] == 1.0
        assert result["details"][0]["trajectory"][2]["content"] == problems[0].answer  # the sandbox printed it


def test_always_answering_a_gets_a_quarter_of_the_rows_and_no_question(released):
    task = mathbench_task(mode="direct", n=24, seed=SEED + 3)
    problems = load_problems(task.agent, None)
    client = ScriptedClient(released, lambda prompt: "The answer is A.")
    groups = {}
    for p in problems:
        if "circular" in p.meta:
            groups.setdefault(p.meta["circular"]["group"], []).append(p)
    whole = [p for rotations in groups.values() if len(rotations) == 4 for p in rotations]
    assert len(whole) >= 12
    result = run_agent_task(None, released, task, client=client, problems=whole)
    assert result["accuracy"] == 0.25 and result["circular_accuracy"] == 0.0  # one rotation of four has "A" right
    assert result["no_answer_rate"] == 0.0 and result["circular_questions"] == len(whole) // 4
    # The whole set: cloze questions are wrong too ("A" is no number), so the rows score below a quarter.
    everything = run_agent_task(None, released, task, client=client)
    assert everything["circular_accuracy"] == 0.0 and 0 < everything["accuracy"] < 0.25
