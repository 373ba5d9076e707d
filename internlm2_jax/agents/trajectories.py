"""Agent runs as SFT records (agents.md §2.9), and trajectory datasets written by oracle policies through the real
loop.

A finished run is a record in the project's native message schema, which `data.conversations` reads:
`{"messages": [...], "tools": [...], "meta": {...}}`: the run's messages without the plugin system turn (the record's
`tools` re-insert it through `chat_prompts.with_tools` exactly as the agent rendered it), the interpreter's system
turn as an ordinary `{"role": "system", "name": "interpreter"}` message. Assistant turns are trained except those the
loop marked `loss: false` (a malformed or refused call) and, by default, those whose call failed when it ran (a
planted bug): a model should learn to recover from a traceback, not to write the bug.

`oracle_records` drives `run_agent` with a `ScriptedClient` whose outputs are an `OraclePolicy`'s turns and a real
`PythonTool` session, so the environment turns are the sandbox's real outputs and the records render as inference
renders; a run whose answer differs from the problem's is left out (and counted).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from internlm2_jax.agents.clients import ScriptedClient
from internlm2_jax.agents.loop import AgentConfig, AgentResult, run_agent
from internlm2_jax.agents.tasks import Problem, suite_tools
from internlm2_jax.agents.tasks.oracle import THOUGHTS, OraclePolicy, choose_episode, extract_answer
from internlm2_jax.agents.tools import PythonTool, ToolExecutor
from internlm2_jax.agents.tools.calculator import calculator

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

# The keys of a message that the record keeps (the native schema: `openai_message` accepts exactly these and OpenAI's).
_MESSAGE_KEYS = ("role", "name", "content", "tool_call", "loss")


def to_record(result: AgentResult, *, tools: Sequence[Mapping[str, Any]] = (), meta: Mapping[str, Any] | None = None,
              train_failed_calls: bool = False) -> dict[str, Any]:
    """The SFT record of a finished run. `tools`: the OpenAI tool definitions the run announced (its executor's
    `openai_tools()`), stored as the record's `tools`; the plugin system turn they rendered is left out."""
    failed = iter([turn.result is not None and (turn.result.status != "ok" or turn.result.error is not None)
                   for turn in result.turns])
    messages = []
    for message in result.messages:
        if message["role"] == "system" and message.get("name") == "plugin":
            continue
        kept = {key: message[key] for key in _MESSAGE_KEYS if key in message}
        if message["role"] == "assistant" and next(failed) and not train_failed_calls:
            kept["loss"] = False
        messages.append(kept)
    record: dict[str, Any] = {"messages": messages}
    if tools:
        record["tools"] = [dict(tool) for tool in tools]
    record["meta"] = {"stop": result.stop, "turns": len(result.turns), "calls": len(result.calls),
                      **(meta or {})}
    return record


def record_key(record: Mapping[str, Any]) -> str:
    """A hash of what a record trains on (messages and tools; not `meta`): equal records have equal keys."""
    canonical = json.dumps([record["messages"], record.get("tools")], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def dedup(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records in order with repeats (same messages and tools) left out."""
    seen: set[str] = set()
    kept = []
    for record in records:
        key = record_key(record)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def write_records(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Writes the records, deduplicated, as JSONL (one record a line, UTF-8) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in dedup(records):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def oracle_records(problems: Sequence[Problem], tokenizer: Tokenizer, *, config: AgentConfig | None = None,
                   interpreter: bool = True, recovery_rate: float = 0.1, calculator_rate: float = 0.0,
                   thoughts: Sequence[str] = THOUGHTS, seed: int = 0,
                   stats: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One SFT record per problem, from its oracle run through `run_agent` with the real sandboxed interpreter.

    `interpreter=False`: the interpreter is not announced and every episode answers directly (the no-tool
    baseline's data). About `recovery_rate` of the tool problems get the error-recovery episode, and
    `calculator_rate` of those with an expression a calculator plugin episode; with `calculator_rate` > 0 every
    record announces the calculator (its `tools`). `thoughts`: the sentences a tool episode may open with. Runs
    whose answer is not the problem's are dropped; `stats` (if given) counts episodes, and "rejected"."""
    config = config or AgentConfig()
    rng = random.Random(seed)
    stats = stats if stats is not None else {}
    records = []
    # One interpreter session for all problems, reset between them: a fresh namespace without a process per run.
    # Its cell counter runs on (tracebacks name "<cell-N>"), so a record depends on the problems before it: the
    # dataset is deterministic for the same arguments, not each record on its own.
    plugins = [calculator] if calculator_rate > 0 else []
    # A suite whose questions need a tool of their own (injection's notes) declares it, serving these problems.
    plugins += [tool for suite in dict.fromkeys(p.suite for p in problems) for tool in suite_tools(suite, problems)]
    with ToolExecutor(plugins, interpreter=PythonTool() if interpreter else None) as executor:
        for problem in problems:
            episode = (choose_episode(problem, rng, recovery_rate=recovery_rate, calculator_rate=calculator_rate)
                       if interpreter else "no_tool")
            client = ScriptedClient(tokenizer, OraclePolicy(problem, episode, seed=seed, thoughts=thoughts))
            if executor.interpreter is not None:
                executor.interpreter.reset()
            result = run_agent(client, tokenizer, executor, problem.question, config=config)
            answer = extract_answer(result.answer)
            if answer != problem.answer:
                stats["rejected"] = stats.get("rejected", 0) + 1
                continue
            stats[episode] = stats.get(episode, 0) + 1
            meta = {"id": problem.id, "suite": problem.suite, "answer": problem.answer, "episode": episode,
                    "interpreter": interpreter}
            records.append(to_record(result, tools=executor.openai_tools(), meta=meta))
    return records
