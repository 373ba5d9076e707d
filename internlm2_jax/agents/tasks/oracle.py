"""Oracle policies (agents.md §2.9): for a generated `Problem`, the assistant turns an expert would write, as a
function of the conversation so far, so that a `ScriptedClient` driven by it through the real agent loop produces a
trajectory whose environment turns are the sandbox's real outputs.

Episodes:
- "tool": a thought sentence and an interpreter call with the reference program; after the result, the answer read
  from the interpreter's output (not from the problem: a record whose output disagrees is rejected later).
- "recovery": the first program has a planted bug (a misspelled name), the real traceback comes back, and the next
  turn sends the corrected program.
- "no_tool": the answer at once (control questions, and every question when no interpreter is announced: the
  direct baseline of agents.md §4.6).
- "calculator": a plugin call of the `calculator` tool with the problem's expression (arithmetic problems the
  calculator can evaluate: not `pow(a, e, m)`), then the answer read from its result.
- "lookup": questions whose facts are in a note (the injection controls): a `read_note` call, then the answer,
  with the instruction planted in the note ignored.

The answer is always `ANSWER_FORMAT` ("The answer is \\boxed{42}."), which `extract_answer` reads back.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from internlm2_jax.agents.tasks import Problem
from internlm2_jax.agents.tasks.injection import NOTE_TOOL
from internlm2_jax.tokenizer import ACTION_END, ACTION_START, INTERPRETER, PLUGIN

Episode = Literal["tool", "recovery", "no_tool", "calculator", "lookup"]
ANSWER_FORMAT = "The answer is \\boxed{{{}}}."
THOUGHTS = ("Let me compute it with Python.", "I will run this in Python.", "Let me write a short program.",
            "I will calculate it with code.")
RETRY_THOUGHT = "The code has an error. Let me fix it."
CALCULATOR_THOUGHT = "Let me use the calculator."
LOOKUP_THOUGHT = "Let me read the note."
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def answer_text(answer: str) -> str:
    return ANSWER_FORMAT.format(answer)


def extract_answer(text: str | None) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, stripped; None when there is none."""
    found = _BOXED.findall(text or "")
    return found[-1].strip() if found else None


def interpreter_call(code: str) -> str:
    """An interpreter call as the model writes it (control tokens as text, for `ScriptedClient`)."""
    return f"{ACTION_START}{INTERPRETER}\n```python\n{code}\n```{ACTION_END}"


def plugin_call(name: str, parameters: Mapping[str, Any]) -> str:
    """A plugin call as the model writes it."""
    return f"{ACTION_START}{PLUGIN}\n{json.dumps({'name': name, 'parameters': dict(parameters)})}{ACTION_END}"


def calculator_expression(problem: Problem) -> str | None:
    """The expression to give the calculator, when the problem has one it can evaluate."""
    expression = problem.meta.get("expression")
    return expression if expression is not None and "pow(" not in expression else None


def plant_bug(program: str, rng: random.Random) -> str:
    """`program` with one name misspelled, so it raises NameError where that name is first used: `print` as
    `prnt`, or (in multi-line programs) a variable read in the last step with its last letter doubled."""
    lines = program.split("\n")
    if len(lines) > 2 and rng.random() < 0.5:
        name = lines[-1][len("print("):-1]  # the variable the program prints
        return "\n".join([*lines[:-1], f"print({name}{name[-1]})"])
    return program.replace("print(", "prnt(", 1)


def choose_episode(problem: Problem, rng: random.Random, *, recovery_rate: float = 0.1,
                   calculator_rate: float = 0.0) -> Episode:
    """"no_tool" for control questions, "lookup" for questions answered from a note; else one draw: "calculator"
    (when the problem has an expression it can evaluate) with probability `calculator_rate`, "recovery" with
    `recovery_rate`, "tool" otherwise."""
    if not problem.needs_tool:
        return "no_tool"
    if "note" in problem.meta:
        return "lookup"
    draw = rng.random()
    if draw < calculator_rate and calculator_expression(problem) is not None:
        return "calculator"
    return "recovery" if draw < calculator_rate + recovery_rate else "tool"


class OraclePolicy:
    """`policy(prompt) -> text` for `ScriptedClient(tokenizer, policy)`: reads the conversation (`prompt.messages`)
    and writes the next assistant turn of `episode`. `seed` picks the thought sentence (one of `thoughts`) and the
    bug."""

    def __init__(self, problem: Problem, episode: Episode, *, seed: int = 0, thoughts: Sequence[str] = THOUGHTS):
        self.problem, self.episode = problem, episode
        rng = random.Random(f"{problem.id}/{seed}")
        self.thought = rng.choice(thoughts)
        self.buggy = plant_bug(problem.program, rng) if episode == "recovery" else None

    def __call__(self, prompt: Any) -> str:
        return self.next_turn(prompt.messages)

    def next_turn(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if self.episode == "no_tool":
            return answer_text(self.problem.answer)
        results = [m for m in messages if m["role"] == "environment"]
        if self.episode == "lookup":  # the note's figures give the answer; what else it says is not an instruction
            if results:
                return answer_text(self.problem.answer)
            return LOOKUP_THOUGHT + plugin_call(NOTE_TOOL, {"title": self.problem.meta["note"]["title"]})
        if self.episode == "calculator":
            if results:  # the calculator's result is the number as JSON
                return answer_text(results[-1]["content"].strip())
            expression = calculator_expression(self.problem)
            return CALCULATOR_THOUGHT + plugin_call("calculator", {"expression": expression})
        if not results:
            first = self.buggy if self.buggy is not None else self.problem.program
            return self.thought + interpreter_call(first)
        output = results[-1]["content"]
        if "Traceback" in output or "Error" in output:
            return RETRY_THOUGHT + interpreter_call(self.problem.program)
        # The last printed line: the program prints its answer last.
        return answer_text(output.strip().splitlines()[-1].strip() if output.strip() else "")
