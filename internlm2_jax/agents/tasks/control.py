"""Control questions (agents.md §3 "Controls" (a)): things a tool would only slow down, so an agent trained on them
learns to answer directly when the interpreter is offered (`needs_tool=False`, scored by `unnecessary_call_rate`)."""

from __future__ import annotations

import random

from internlm2_jax.agents.tasks import Problem

_COLOURS = ("red", "blue", "green", "yellow", "white", "black")
_WORDS = ("apple", "river", "stone", "cloud", "tiger", "garden", "window", "pencil")


def problem(rng: random.Random, pid: str, difficulty: int) -> Problem:
    """One of a few question shapes whose answer is a single token-short string; difficulty is ignored (these are
    easy by design)."""
    shape = rng.choice(("add", "compare", "colour", "first_letter", "count_words"))
    if shape == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        question, answer = f"What is {a} + {b}?", str(a + b)
    elif shape == "compare":
        a, b = rng.sample(range(1, 100), 2)
        question, answer = f"Which is larger, {a} or {b}?", str(max(a, b))
    elif shape == "colour":
        colour = rng.choice(_COLOURS)
        question, answer = f"My car is {colour}. What colour is my car?", colour
    elif shape == "first_letter":
        word = rng.choice(_WORDS)
        question, answer = f"What is the first letter of the word {word}?", word[0]
    else:
        words = rng.sample(_WORDS, rng.randint(2, 5))
        question, answer = f"How many words are in this list: {', '.join(words)}?", str(len(words))
    return Problem(id=pid, suite="control", question=question, answer=answer, program=f"print({answer!r})",
                   needs_tool=False, meta={"difficulty": difficulty, "kind": shape})
