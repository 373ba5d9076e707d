"""Overlap between the questions a model was trained on and the ones it is evaluated on (agents.md §2.9): the
generators keep training seeds below 10**6 and evaluation seeds from 10**9 on, but a template that leaves few free
numbers can still repeat a question, and hand-made data can contain anything.

A question counts as seen when its normalised text (lower case, runs of non-alphanumerics as one space) equals a
training question's, or, for questions of at least `n` words, when it shares an `n`-word sequence with one (13 words:
the threshold of the GPT-3 and PaLM contamination studies; short generated questions such as "What is 9492 * 466?"
are compared whole).

Training data is SFT records (`{"messages": [...]}`, agent trajectories included: their user turns are the
questions) or rows with a "question" field, as JSONL. Evaluation rows are the `details` of a task's result: the
agent tasks' "question", T-Eval's "query", CIBench's step "prompt".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath

NGRAM = 13
_SEPARATORS = re.compile(r"[^0-9a-z]+")
QUESTION_FIELDS = ("question", "query", "prompt")


def normalise(text: str) -> str:
    return _SEPARATORS.sub(" ", text.lower()).strip()


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def training_questions(path: str | epath.PathLike) -> list[str]:
    """The questions of a JSONL training file: each SFT record's user turns, or each row's "question"; a line that
    is neither is an error naming the file and line."""
    questions = []
    lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        if isinstance(row, Mapping) and isinstance(row.get("messages"), list):
            questions += [m["content"] for m in row["messages"]
                          if isinstance(m, Mapping) and m.get("role") == "user" and isinstance(m.get("content"), str)]
        elif isinstance(row, Mapping) and isinstance(row.get("question"), str):
            questions.append(row["question"])
        else:
            raise ValueError(f"{path}:{number}: neither an SFT record (\"messages\") nor a row with a \"question\"")
    return questions


class TrainingIndex:
    """The training questions, indexed for `seen`."""

    def __init__(self, questions: Iterable[str], n: int = NGRAM):
        self.n = n
        self.whole: set[str] = set()
        self.grams: set[tuple[str, ...]] = set()
        for question in questions:
            text = normalise(question)
            self.whole.add(text)
            self.grams |= _ngrams(text.split(), n)

    def seen(self, question: str) -> bool:
        text = normalise(question)
        if text in self.whole:
            return True
        words = text.split()
        return len(words) >= self.n and not self.grams.isdisjoint(_ngrams(words, self.n))


def train_overlap(result: Mapping[str, Any], index: TrainingIndex) -> dict[str, Any] | None:
    """{"train_overlap": share of the result's rows whose question was seen, "train_overlap_ids": up to 10 of
    them}, or None for a result whose rows carry no question (perplexity, multiple choice)."""
    rows = [row for row in result.get("details") or [] if isinstance(row, Mapping)]
    questions = [(row.get("id"), next((row[f] for f in QUESTION_FIELDS if isinstance(row.get(f), str)), None))
                 for row in rows]
    questions = [(i, q) for i, q in questions if q is not None]
    if not questions:
        return None
    seen = [i for i, q in questions if index.seen(q)]
    return {"train_overlap": len(seen) / len(questions), "train_overlap_ids": seen[:10]}
