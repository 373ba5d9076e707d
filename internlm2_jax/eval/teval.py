"""The T-Eval-like inferencer (agents.md §1.8, §3): the six tool-use abilities of T-Eval, asked in InternLM2's own
protocol over the generated items of `agents.tasks.teval`, one generated turn per item and ability, scored
deterministically (no embedding model, no download).

Every prompt starts with a plain system turn that says what the sub-task wants, then the plugin system turn that
announces the toy toolset (`protocol.system_turns`); earlier steps are real assistant turns with their plugin calls
and `environment` turns with the tools' recorded results (`protocol.result_turn`). The model's turn is parsed on its
ids (`protocol.parse_ids` through `Generation.parse`), decoding stops at `protocol.stop_ids`, and nothing is banned:
a call where text was asked for just scores what its content scores.

- instruct: given "Call the tool X with the parameters as follows: 'a' is 1, ...", the model calls it. T-Eval's
  score: (format + args_em) / 2, format = a plugin call was parsed, args_em = (name match + exact matches of the
  gold arguments) / (n_args + 1).
- plan: given the query, the model writes a JSON list `[{"id", "name", "args"}, ...]`. Steps are matched by exact
  name and kept in order (LIS), giving precision, recall and F1; the score is F1.
- reason: given the query and the steps done so far, the model writes its thought and a last line
  `Sub-goal: ...` in one of `SUBGOAL_FORMS`. Score: (token F1 of the thought vs the gold one + exact sub-goal) / 2.
- retrieve: the same prompt asking for the next call; score: exact tool name.
- understand: the same, naming the tool to call; T-Eval v2's score: gold arguments given with the same value
  (compared as str) / (n_args + 1e-5); with no gold arguments 1 iff none were given.
- review: the steps, then one call (gold or corrupted) and its real result; the model picks a class A-D. Score:
  exact match of the letter, read as T-Eval reads its str answers.

overall = the mean of the six. Deviations from T-Eval, on purpose: plan steps are matched by exact name (T-Eval:
sentence embeddings of name and args, threshold 0.8, max-weight matching), so of all matchings we take one with the
longest in-order chain, which is the longest common subsequence of the two name lists; and only matched steps count
(T-Eval's LIS starts every step at 1, so a plan matching nothing still scored 1/len). An empty plan scores 0 (T-Eval
divides by zero when a plan is only FinishAction). **reason is not comparable to T-Eval's number**, which is the
cosine similarity of sentence embeddings.

The prompt hash covers the system prompts, the instruct and review templates, the tool schemas, the style they are
announced in, decoding and stop tokens, and the generator (its version and a fingerprint of its first items).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from internlm2_jax.agents.clients import Decoding, Generation, ModelClient, Prompt
from internlm2_jax.agents.protocol import Call, Parsed, ToolResult, cap, result_turn, stop_ids, system_turns
from internlm2_jax.agents.tasks import EVAL_SEED_START
from internlm2_jax.agents.tasks.teval import (FINISH, REVIEW_LABELS, SUBGOAL_FORMS, TEVAL_VERSION, Step, TEvalItem,
                                              generate, ood_item, toolset)
from internlm2_jax.agents.tools import ToolExecutor
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.eval.agent import TokenNames, engine_client

ABILITIES = ("instruct", "plan", "reason", "retrieve", "understand", "review")
TEMPLATE = "internlm2_chat"
REVIEW_CHOICES = {
    "success": "A. Success: the call did what its step set out to do.",
    "tool_error": "B. Tool error: the tool reported an error.",
    "wrong_arguments": "C. Wrong arguments: the right tool, called with arguments that do not fit the step's goal.",
    "wrong_tool": "D. Wrong tool: the tool called cannot do what the step set out to do.",
}
LETTERS = {label: REVIEW_CHOICES[label][0] for label in REVIEW_LABELS}
# The sub-task each prompt's plain system turn states ("{name}": the tool the understand step must call).
SYSTEM = {
    "instruct": "Call the tools exactly as the user says: one call, with exactly the parameters given.",
    "plan": ("Do not call any tool now. Plan how to answer the user's question with the tools: reply with only a JSON "
             'list of the calls in the order they would run, [{"id": 0, "name": "<tool>", "args": {...}}, ...], '
             f'ending with {{"id": <n>, "name": "{FINISH}", "args": {{}}}}. Where an argument is an earlier '
             'call\'s result, write "<result of step i>".'),
    "reason": ("Do not call any tool now. Say what to do next to answer the user's question: your thought, then a "
               "last line 'Sub-goal: <sub-goal>' in one of these forms: "
               + "; ".join(re.sub(r"\{(\w+)\}", r"<\1>", form) for form in SUBGOAL_FORMS.values()) + "."),
    "retrieve": "Make the next tool call needed to answer the user's question.",
    "understand": "Make the next tool call needed to answer the user's question. It calls the tool {name}.",
    "review": ("Judge the last tool call and its response. Reply with one letter:\n"
               + "\n".join(REVIEW_CHOICES.values())),
}
INSTRUCT_TEMPLATE = "Call the tool {name} with the parameters as follows: {parameters}."
INSTRUCT_NO_PARAMETERS = "Call the tool {name} with no parameters."


@dataclasses.dataclass(frozen=True)
class TEvalTaskConfig:
    n: int = 100  # items; each is asked six times, once per ability
    seed: int = EVAL_SEED_START  # agents.tasks.teval.generate's seed: evaluation seeds only
    style: str = "compact"  # how the tools are announced (protocol.system_turns)
    max_new_tokens: int = 512
    batch: int = 32  # prompts generated together (the engine's batch)
    output_chars: int = 2000  # each recorded model output is capped to this
    ood: bool = False  # the tools renamed, reordered, their parameters listed in reverse (teval.toolset(ood=True))

    def validate(self, where: str) -> None:
        checks = {"n": self.n >= 1, "seed": self.seed >= EVAL_SEED_START, "style": self.style in ("compact", "lagent"),
                  "max_new_tokens": self.max_new_tokens >= 1, "batch": self.batch >= 1,
                  "output_chars": self.output_chars >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{where}: agent.{name} has an invalid value ({getattr(self, name)!r})")

    def decoding(self) -> Decoding:
        return Decoding(max_new_tokens=self.max_new_tokens)

    def toolset(self) -> ToolExecutor:
        return toolset(self.ood)

    def items(self) -> list[TEvalItem]:
        items = generate(self.n, self.seed)
        return [ood_item(item) for item in items] if self.ood else items

    def system(self, ability: str, tool: str = "{name}") -> list[dict[str, Any]]:
        """The system turns of an ability's prompts (understand's names the `tool` to call)."""
        return system_turns(meta=SYSTEM[ability].replace("{name}", tool), tools=self.toolset().openai_tools(),
                            style=self.style)

    def setting(self) -> dict[str, Any]:
        """What the prompt hash covers (module docstring), as JSON-ready values; not `n` or `seed`, which pick the
        items."""
        return {"system": {ability: self.system(ability) for ability in ABILITIES},
                "instruct": [INSTRUCT_TEMPLATE, INSTRUCT_NO_PARAMETERS], "review": REVIEW_CHOICES,
                "tools": self.toolset().openai_tools(), "style": self.style, "template": TEMPLATE,
                "decoding": dataclasses.asdict(self.decoding()), "stop": list(stop_ids(TokenNames())),
                "generator": {"version": TEVAL_VERSION, "fingerprint": generator_fingerprint()}}


def generator_fingerprint() -> str:
    """A digest of the generator's first items at the first evaluation seed: changes with the generator."""
    blob = json.dumps([item.to_json() for item in generate(8, EVAL_SEED_START)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- prompts -----------------------------------------------------------------------------------------------------


def _call_turns(thought: str, name: str, args: Mapping[str, Any], result: ToolResult) -> list[dict[str, Any]]:
    call = Call("plugin", name, dict(args), "")
    return [{"role": "assistant", "content": thought, "tool_call": {"type": "plugin", "name": name,
                                                                     "parameters": dict(args)}},
            result_turn(call, result)]


def _history(item: TEvalItem, done: int) -> list[dict[str, Any]]:
    """The query and the first `done` gold steps with their results."""
    turns = [{"role": "user", "content": item.query}]
    for step in item.steps[:done]:
        turns += _call_turns(step.thought, step.name, step.args, ToolResult(value=step.output))
    return turns


def instruction(step: Step) -> str:
    """The instruct sub-task's user turn, worded as T-Eval's ("'place' is 'Berlin'"), values as JSON."""
    if not step.args:
        return INSTRUCT_NO_PARAMETERS.format(name=step.name)
    parameters = ", ".join(f"'{key}' is {json.dumps(value, ensure_ascii=False)}" for key, value in step.args.items())
    return INSTRUCT_TEMPLATE.format(name=step.name, parameters=parameters)


def messages(item: TEvalItem, ability: str, config: TEvalTaskConfig) -> list[dict[str, Any]]:
    """The template messages of `item`'s prompt for `ability` (system turns included)."""
    if ability == "instruct":
        return [*config.system(ability), {"role": "user", "content": instruction(item.steps[item.instruct_step])}]
    if ability == "plan":
        return [*config.system(ability), {"role": "user", "content": item.query}]
    if ability in ("reason", "retrieve", "understand"):
        return [*config.system(ability, item.steps[item.focus].name), *_history(item, item.focus)]
    review = item.review
    result = ToolResult(value=review.value, status=review.status, error=review.error)
    return [*config.system(ability), *_history(item, review.step),
            *_call_turns(item.steps[review.step].thought, review.name, review.args, result)]


# ---- scorers -----------------------------------------------------------------------------------------------------


def args_em(gold_name: str, gold_args: Mapping[str, Any], name: str | None, args: Mapping[str, Any]) -> float:
    """T-Eval's `compute_args_em_metric`: (name match + exact matches of the gold arguments) / (n_args + 1)."""
    hits = float(name == gold_name) + sum(float(args.get(key, "") == value) for key, value in gold_args.items())
    return hits / (len(gold_args) + 1)


def _plugin_call(parsed: Parsed) -> Call | None:
    """The plugin call the model wrote, even one naming an unknown tool or breaking its schema (those are what the
    name and argument scores are for)."""
    call = parsed.call
    return call if call is not None and call.kind == "plugin" else None


def instruct_scores(parsed: Parsed, step: Step) -> dict[str, float]:
    call = _plugin_call(parsed)
    form = float(call is not None)
    em = args_em(step.name, step.args, call.name, call.arguments) if call is not None else 0.0
    return {"format": form, "args_em": em, "score": (form + em) / 2}


def parse_plan(text: str) -> list[dict[str, Any]]:
    """The steps of a JSON plan (from the first "["), sorted by id; [] when it is not a list of objects each with an
    integer "id", a "name" and "args" (T-Eval's `format_load`: one bad step voids the plan)."""
    start = text.find("[")
    if start < 0:
        return []
    try:
        plan, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return []
    if not isinstance(plan, list):
        return []
    steps = []
    for step in plan:
        if not (isinstance(step, dict) and {"id", "name", "args"} <= step.keys() and type(step["id"]) is int):
            return []
        steps.append({"id": step["id"], "name": str(step["name"]), "args": step["args"]})
    return sorted(steps, key=lambda step: step["id"])


def plan_scores(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Precision, recall and F1 of a predicted plan's tool names against the gold plan's (module docstring): a
    trailing FinishAction is dropped from each; an empty plan scores 0."""
    predicted, gold = _without_finish(predicted), _without_finish(gold)
    if not predicted or not gold:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # Longest chain of exact-name pairs increasing in both plans (LIS over the matching = LCS of the names).
    row = [0] * (len(gold) + 1)
    for name in predicted:
        previous = row[:]
        for j, gold_name in enumerate(gold, 1):
            row[j] = previous[j - 1] + 1 if name == gold_name else max(previous[j], row[j - 1])
    matched = row[-1]
    precision, recall = matched / len(predicted), matched / len(gold)
    f1 = 2 * precision * recall / (precision + recall) if matched else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _without_finish(names: Sequence[str]) -> list[str]:
    names = list(names)
    return names[:-1] if names and names[-1] == FINISH else names


_WORD = re.compile(r"\w+")
_SUBGOAL = re.compile(r"^[ \t*]*sub[- ]?goal[ \t*]*[:：][ \t*]*(.*?)[ \t*]*$", re.IGNORECASE | re.MULTILINE)


def token_f1(prediction: str, reference: str) -> float:
    """Unigram F1 of lower-cased word tokens (SQuAD's), 0 when either is empty."""
    predicted, gold = Counter(_WORD.findall(prediction.lower())), Counter(_WORD.findall(reference.lower()))
    common = sum((predicted & gold).values())
    if not common:
        return 0.0
    precision, recall = common / sum(predicted.values()), common / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


def split_subgoal(text: str) -> tuple[str, str | None]:
    """(the thought, the sub-goal) of a reason answer: the sub-goal is the last "Sub-goal: ..." line, the thought
    what comes before it; (the whole text, None) when there is no such line."""
    found = list(_SUBGOAL.finditer(text))
    if not found:
        return text.strip(), None
    return text[:found[-1].start()].strip(), found[-1].group(1)


def _normal(subgoal: str) -> str:
    return " ".join(subgoal.lower().split()).rstrip(".")


def reason_scores(content: str, step: Step) -> dict[str, float]:
    thought, subgoal = split_subgoal(content)
    f1 = token_f1(thought, step.thought)
    exact = float(subgoal is not None and _normal(subgoal) == _normal(step.subgoal))
    return {"thought_f1": f1, "subgoal_em": exact, "score": (f1 + exact) / 2}


def understand_score(args: Mapping[str, Any] | None, gold_args: Mapping[str, Any]) -> float:
    """T-Eval v2 ("more strict"): gold keys given with the same value (compared as str) / (n_args + 1e-5); with no
    gold arguments 1 iff none were given; no call (`args` None) 0."""
    if args is None:
        return 0.0
    if not gold_args:
        return float(not args)
    hits = sum(key in args and str(args[key]) == str(value) for key, value in gold_args.items())
    return hits / (len(gold_args) + 1e-5)


def review_choice(text: str) -> str | None:
    """T-Eval's str parse: the text after the first ":" (all of it without one), stripped; its first character if
    that is a letter A-E."""
    text = text[text.find(":") + 1:].strip()
    return text[0] if text and text[0] in "ABCDE" else None


def score(item: TEvalItem, ability: str, parsed: Parsed) -> dict[str, float]:
    """One answer's scores; "score" is what the ability's metric averages."""
    if ability == "instruct":
        return instruct_scores(parsed, item.steps[item.instruct_step])
    if ability == "plan":
        scores = plan_scores([step["name"] for step in parse_plan(parsed.content)], [s.name for s in item.steps])
        return {**scores, "score": scores["f1"]}
    if ability == "reason":
        return reason_scores(parsed.content, item.steps[item.focus])
    call = _plugin_call(parsed)
    if ability == "retrieve":
        return {"score": float(call is not None and call.name == item.steps[item.focus].name)}
    if ability == "understand":
        return {"score": understand_score(None if call is None else call.arguments, item.steps[item.focus].args)}
    return {"score": float(review_choice(parsed.content) == LETTERS[item.review.label])}


def gold(item: TEvalItem, ability: str) -> Any:
    """What `ability`'s answer to `item` is scored against (recorded beside the model's answer)."""
    step = item.steps[item.instruct_step if ability == "instruct" else item.focus]
    return {"instruct": {"name": step.name, "args": step.args}, "plan": [s.name for s in item.steps],
            "reason": {"thought": step.thought, "subgoal": step.subgoal}, "retrieve": step.name,
            "understand": step.args, "review": LETTERS[item.review.label]}[ability]


# ---- the inferencer ----------------------------------------------------------------------------------------------


def _generate(client: ModelClient, tokenizer, prompts: Sequence[Prompt], config: TEvalTaskConfig,
              progress: bool, name: str) -> list[Generation]:
    """Each prompt's turn, `config.batch` at a time; a prompt that leaves no room to answer in the client's context
    is not sent (an empty answer, finish "context_budget")."""
    decoding = dataclasses.replace(config.decoding(), stop_ids=stop_ids(tokenizer))
    limit = client.max_model_len
    out: list[Generation] = []
    for start in range(0, len(prompts), config.batch):
        chunk = prompts[start:start + config.batch]
        room = [decoding.max_new_tokens if limit is None else min(decoding.max_new_tokens, limit - len(p.ids))
                for p in chunk]
        sent = [i for i, tokens in enumerate(room) if tokens > 0]
        answers = dict(zip(sent, client.generate_many(
            [chunk[i] for i in sent], [dataclasses.replace(decoding, max_new_tokens=room[i]) for i in sent]),
            strict=True))
        out += [answers.get(i, Generation((), "", "context_budget")) for i in range(len(chunk))]
        if progress:
            print(f"{name}: {len(out)}/{len(prompts)} prompts", file=sys.stderr, flush=True)
    return out


def run_teval_task(model, tokenizer, task, *, client: ModelClient | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Runs `task` (an `eval.tasks.Task` with `inferencer="teval"` and a `TEvalTaskConfig`) and scores it: one metric
    per ability and `overall` (module docstring), their parts in `breakdown`, each item's answers in `details`.
    `client` replaces the model's engine (a test's `ScriptedClient`, a server)."""
    task.validate()
    config: TEvalTaskConfig = task.agent
    items = config.items()
    template = get_chat_template(TEMPLATE)
    tools = config.toolset()
    specs, definitions = tools.specs(), tuple(tools.openai_tools())
    prompts, keys = [], []
    for item in items:
        for ability in ABILITIES:
            turns = messages(item, ability, config)
            ids, _ = template.encode(turns, tokenizer, add_generation_prompt=True)
            prompts.append(Prompt(tuple(ids), tuple(turns), definitions))
            keys.append((item, ability))
    if client is None:
        client = engine_client(model, tokenizer, config, problems=len(prompts))
    generations = _generate(client, tokenizer, prompts, config, progress, task.name)
    details = {item.id: {"id": item.id, "chain": item.chain, "query": item.query, "steps": len(item.steps)}
               for item in items}
    parts: dict[str, list[dict[str, float]]] = {ability: [] for ability in ABILITIES}
    for (item, ability), generation in zip(keys, generations, strict=True):
        parsed = generation.parse(tokenizer, tools=specs, interpreter=False)
        scores = score(item, ability, parsed)
        parts[ability].append(scores)
        details[item.id][ability] = {**scores, "gold": gold(item, ability),
                                     "output": cap(generation.text, config.output_chars),
                                     "finish_reason": generation.finish_reason,
                                     "parse_error": None if parsed.error is None else parsed.error.code}
    metrics = {ability: _mean([s["score"] for s in parts[ability]]) for ability in ABILITIES}
    breakdown = {f"{ability}_{key}": _mean([s[key] for s in parts[ability]])
                 for ability in ABILITIES for key in parts[ability][0] if key != "score"}
    return {"task": task.name, "group": task.group, "prompt_hash": task.prompt_hash(), "mode": "teval",
            "rows": len(items), **metrics, "overall": _mean(list(metrics.values())), "breakdown": breakdown,
            "seed": config.seed, "details": list(details.values())}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
