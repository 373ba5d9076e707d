"""A dataset definition in three parts, as OpenCompass has them: where the rows come from (`Reader`), how a row
becomes a prompt (`Prompt`: template, few-shot retriever, chat or plain, BOS), and how it is inferred and scored
(`Task`: PPL or GEN inferencer, scoring rule, postprocessor, metric).

Each task's prompt setting has a short hash (`Task.prompt_hash`) stored with its results, so two scores are
comparable only when the prompts and the model are identical: harnesses disagreeing because their prompts differ is
OpenCompass users' first complaint.

Rows are JSONL objects. A multiple-choice row has the fields the template names (e.g. "question"), a list of option
texts ("choices" by default) and an answer ("answer": the option's index, its letter "A"-"Z", or its text); a
generation row has the template's fields and the reference answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import string
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from internlm2_jax.eval.loglikelihood import RULES, choose, encode_pair, score_pairs

RETRIEVERS = ("zero", "fixed", "random")
INFERENCERS = ("ppl", "gen", "agent", "teval", "cibench")
# Inferencers whose task carries a config of its own in `Task.agent` (eval.agent, eval.teval, eval.cibench): it
# validates itself and its `setting()` joins the prompt hash.
AGENT_INFERENCERS = ("agent", "teval", "cibench")


@dataclasses.dataclass(frozen=True)
class Reader:
    path: str  # JSONL rows to evaluate
    answer: str = "answer"  # the field holding the reference
    choices: str = "choices"  # multiple choice: the field holding the option texts
    few_shot_path: str | None = None  # JSONL rows the in-context examples come from


@dataclasses.dataclass(frozen=True)
class Prompt:
    template: str = "Question: {question}\nAnswer:"  # str.format over the row's fields
    continuation: str = " {choice}"  # how an option (and a few-shot example's answer) follows the prompt
    retriever: str = "zero"  # "zero"; "fixed": the first `shots` examples; "random": `shots` per row, seeded
    shots: int = 0
    seed: int = 0
    separator: str = "\n\n"  # between few-shot examples and the question
    bos: bool = True
    chat: bool = False  # render as a user turn through the chat template (chat models); GEN only


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    reader: Reader
    prompt: Prompt = Prompt()
    inferencer: str = "ppl"
    rule: str = "lm_eval"  # PPL: "lm_eval" (sum of log-probs, highest) or "opencompass" (mean loss, lowest)
    postprocessor: str = "strip"  # GEN: the name of a postprocessor (eval.postprocess)
    max_new_tokens: int = 64  # GEN
    stop: tuple[str, ...] = ("\n\n",)  # GEN
    max_empty_share: float = 0.1  # GEN: more predictions extracting to "" fails the run
    group: str | None = None  # tasks of a group are also reported as their average (e.g. "mmlu" subjects)
    # AGENT_INFERENCERS: their config, e.g. an `eval.agent.AgentTaskConfig` (typed loosely: those modules build on
    # this one, not the reverse).
    agent: Any = None

    def validate(self) -> None:
        checks = {"inferencer": self.inferencer in INFERENCERS, "rule": self.rule in RULES,
                  "prompt.retriever": self.prompt.retriever in RETRIEVERS, "prompt.shots": self.prompt.shots >= 0,
                  "max_new_tokens": self.max_new_tokens >= 1, "max_empty_share": 0 <= self.max_empty_share <= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"task {self.name!r}: {name} has an invalid value")
        if self.prompt.retriever != "zero" and not (self.prompt.shots and self.reader.few_shot_path):
            raise ValueError(f"task {self.name!r}: retriever {self.prompt.retriever!r} needs shots > 0 and "
                             f"reader.few_shot_path")
        if self.prompt.chat and self.inferencer == "ppl":
            raise ValueError(f"task {self.name!r}: PPL scoring is for base models; use prompt.chat with 'gen'")
        if (self.agent is None) != (self.inferencer not in AGENT_INFERENCERS):
            raise ValueError(f"task {self.name!r}: the {'/'.join(AGENT_INFERENCERS)} inferencers and their agent "
                             f"config go together")
        if self.agent is not None:
            self.agent.validate(f"task {self.name!r}")

    def prompt_hash(self) -> str:
        """10 hex digits naming everything that shapes the prompts and their scoring."""
        setting = {"prompt": dataclasses.asdict(self.prompt), "inferencer": self.inferencer, "rule": self.rule,
                   "postprocessor": self.postprocessor, "max_new_tokens": self.max_new_tokens,
                   "stop": list(self.stop), "few_shot": _file_digest(self.reader.few_shot_path)}
        if self.agent is not None:  # added only here, so the hashes of every other task stay what they were
            setting["agent"] = self.agent.setting()
        return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]


def _file_digest(path: str | None) -> str | None:
    return None if path is None else hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()[:16]


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSONL rows of `path` (local or a URL); a malformed line is an error naming the file and line."""
    rows = []
    with epath.Path(path).open("r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _fill(template: str, row: Mapping[str, Any], where: str) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise ValueError(f"{where}: the template names field {e.args[0]!r}, which the row lacks "
                         f"(fields: {sorted(row)})") from None


def answer_index(row: Mapping[str, Any], reader: Reader, where: str) -> int:
    """The reference option's index from an index, a letter or the option's text."""
    choices, answer = row[reader.choices], row.get(reader.answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str) and len(answer) == 1 and answer in string.ascii_uppercase[:len(choices)]:
        return string.ascii_uppercase.index(answer)
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    raise ValueError(f"{where}: answer {answer!r} is not an option index, letter or text of {choices!r}")


class Prompter:
    """Builds each row's context (few-shot examples + the filled template) for a task."""

    def __init__(self, task: Task):
        self.task = task
        self.examples = read_rows(task.reader.few_shot_path) if task.reader.few_shot_path else []

    def _example(self, row: Mapping[str, Any], where: str) -> str:
        reader, prompt = self.task.reader, self.task.prompt
        if self.task.inferencer == "ppl":
            reference = row[reader.choices][answer_index(row, reader, where)]
        else:
            reference = row[reader.answer]
        return _fill(prompt.template, row, where) + prompt.continuation.format(choice=reference)

    def context(self, index: int, row: Mapping[str, Any]) -> str:
        prompt = self.task.prompt
        shots: list[int] = []
        if prompt.retriever == "fixed":
            shots = list(range(min(prompt.shots, len(self.examples))))
        elif prompt.retriever == "random":
            shots = random.Random(prompt.seed * 1_000_003 + index).sample(range(len(self.examples)),
                                                                          min(prompt.shots, len(self.examples)))
        parts = [self._example(self.examples[i], f"{self.task.reader.few_shot_path} row {i}") for i in shots]
        return prompt.separator.join(parts + [_fill(prompt.template, row, f"{self.task.reader.path} row {index}")])


def run_ppl(model, tokenizer, task: Task, *, progress: bool = False, batch_tokens: int = 16384) -> dict[str, Any]:
    """Multiple-choice accuracy by log-likelihood (and, under the lm_eval rule, `acc_norm`), with each row's
    per-option scores."""
    task.validate()
    rows = read_rows(task.reader.path)
    prompter = Prompter(task)
    pairs, spans, options = [], [], []
    for index, row in enumerate(rows):
        where = f"{task.reader.path} row {index}"
        choices = row.get(task.reader.choices)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: {task.reader.choices!r} must be a list of at least 2 option strings")
        context = prompter.context(index, row)
        continuations = [task.prompt.continuation.format(choice=c) for c in choices]
        spans.append((len(pairs), len(choices), answer_index(row, task.reader, where)))
        pairs += [encode_pair(tokenizer, context, c, bos=task.prompt.bos) for c in continuations]
        options.append(choices)
    scores = score_pairs(model, pairs, batch_tokens=batch_tokens, context_loss=task.rule == "opencompass",
                         progress=progress, desc=task.name)
    details, correct, correct_norm = [], 0, 0
    for (start, n, answer), choices in zip(spans, options, strict=True):
        row_scores = scores[start:start + n]
        pred = choose(row_scores, task.rule)
        correct += pred == answer
        entry = {"prediction": pred, "answer": answer, "logprobs": [s.logprob for s in row_scores],
                 "greedy": [s.greedy for s in row_scores]}
        if task.rule == "opencompass":
            entry["mean_loss"] = [s.mean_loss for s in row_scores]
        if task.rule == "lm_eval":
            entry["prediction_norm"] = choose(row_scores, task.rule, choices)
            correct_norm += entry["prediction_norm"] == answer
        details.append(entry)
    result = {"task": task.name, "group": task.group, "prompt_hash": task.prompt_hash(), "mode": "ppl",
              "rule": task.rule,
              "rows": len(rows), "accuracy": correct / len(rows), "details": details}
    if task.rule == "lm_eval":
        result["accuracy_norm"] = correct_norm / len(rows)
    return result


METRICS = ("accuracy", "accuracy_norm", "pass@1", "perplexity", "bits_per_byte", "retrieval",
           # agent tasks (eval.agent_scoring)
           "follow_acc", "reasoning_acc", "code_acc", "action_pct", "parse_error_rate", "exec_error_rate",
           "timeout_rate", "mean_turns", "max_turns_rate", "repeated_call_rate", "unnecessary_call_rate",
           "no_answer_rate", "circular_accuracy", "injection_compliance_rate", "undeclared_attempt_rate",
           "undeclared_call_rate",
           # the T-Eval-like abilities (eval.teval)
           "instruct", "plan", "reason", "retrieve", "understand", "review", "overall",
           # the CIBench-like notebooks (eval.cibench)
           "tool_rate", "executable", "numeric_correct", "numeric_lenient", "text_score", "vis_sim", "vis_structure",
           # eval.contamination (with --train-data)
           "train_overlap")


def suite_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table: dataset, prompt hash, metric, mode, score; then each group's unweighted average per
    metric (its prompt hashes joined, so a group average is comparable only when all of them match)."""
    lines = ["| dataset | prompt hash | metric | mode | score |", "|---|---|---|---|---:|"]
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        for metric in METRICS:
            if r.get(metric) is not None:  # None: not defined for this run (no control questions, say)
                lines.append(f"| {r['task']} | {r['prompt_hash']} | {metric} | {r['mode']} | {r[metric]:.4f} |")
                if r.get("group"):
                    groups.setdefault((r["group"], metric, r["mode"]), []).append(r)
    for (group, metric, mode), members in groups.items():
        hashes = "+".join(sorted({m["prompt_hash"] for m in members}))
        average = sum(m[metric] for m in members) / len(members)
        lines.append(f"| **{group}** (average of {len(members)}) | {hashes} | {metric} | {mode} | {average:.4f} |")
    return "\n".join(lines)
