"""The agent inferencer (agents.md §2.10, §3): a task's problems run through `agents.loop.run_agents` over the model's
engine (or any `ModelClient`), answers scored exactly, and the tool-use metrics of `eval.agent_scoring`.

Three modes, as the offline sets of §3 have them:
- "direct": the question as a chat turn, no tools announced and `<|action_start|>` banned: one turn.
- "pal": the model writes a `solution()` program (one turn, calls banned), run once in the sandbox; its return value
  is the answer (InternLM v1's PAL).
- "agent": the interpreter (and any declared built-in plugins) announced; turns until the model answers or a limit.

Problems come from a generator (`agents.tasks.generate(suite, n, seed, difficulty=...)`, evaluation seeds >= 10**9)
or from a JSONL file of `Problem` fields (`task.reader.path`). A suite whose questions need a tool of its own (the
injection controls' `read_note`) gets it declared beside the built-ins, serving those problems' data; such a suite
runs in agent mode only. Multiple-choice problems (`meta["options"]`) are scored by their option letter and, in
groups of rotations, by CircularEval; injection controls add compliance with the planted instruction.

Each row of the result keeps the conversation (system turns left out: they are the same for every row and named by
the prompt hash), each message capped.

The prompt hash covers everything that shapes what the model sees and how it is stopped: mode, question template,
system turns (interpreter prompt, tool schemas as canonical JSON, style), turn and parse limits, decoding, the stop
and banned tokens, sandbox limits, the interpreter's output style, and the generator (a fingerprint of its output, so
a generator change shows even when nobody bumps a version). Not the seed or the number of problems: those pick the
data, as a task's reader path does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from internlm2_jax.agents.clients import Decoding, ModelClient
from internlm2_jax.agents.loop import AgentConfig, AgentResult, run_agents
from internlm2_jax.agents.protocol import INTERPRETER_PROMPT_EN, ToolResult, action_ids, cap, stop_ids
from internlm2_jax.agents.state import Limits
from internlm2_jax.agents.tasks import EVAL_SEED_START, TOOL_SUITES, Problem, generate, suite_tools
from internlm2_jax.agents.tools import BUILTIN_TOOLS, PythonTool, ToolExecutor
from internlm2_jax.eval.agent_scoring import agent_metrics, complied, final_answer, math_equal, option_answer
from internlm2_jax.eval.postprocess import check_extraction, extract_code
from internlm2_jax.eval.tasks import read_rows
from internlm2_jax.sandbox import PythonSession, SandboxError, SandboxPolicy
from internlm2_jax.tokenizer import EOS

MODES = ("direct", "pal", "agent")
OUTPUT_STYLES = ("full", "last_line")
TEMPLATES = {
    "direct": "{question}\nGive the final answer as \\boxed{{}}.",
    "pal": "Write a Python function `solution()` that returns the answer to the question below, in one ```python "
           "block and nothing else.\n\nQuestion: {question}",
    "agent": "{question}",
}
# The metrics each mode reports: a one-turn mode has no calls to count, and its single turn is forced, so turn
# statistics would only restate the mode.
MODE_METRICS = {"direct": ("accuracy", "no_answer_rate"),
                "pal": ("accuracy", "exec_error_rate", "timeout_rate", "no_answer_rate")}
# Metrics of particular sets, reported in every mode whenever the rows have them (agent_scoring.agent_metrics).
SET_METRICS = ("circular_accuracy", "circular_questions", "injection_compliance_rate", "undeclared_attempt_rate",
               "undeclared_call_rate")
_PLUGINS = {tool.name: tool for tool in BUILTIN_TOOLS}
AGENT_CONTEXT_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class AgentTaskConfig:
    mode: str = "agent"
    suite: str | None = None  # an `agents.tasks` generator; None: problems from the task's reader path
    n: int = 100
    seed: int = EVAL_SEED_START
    difficulty: int = 1
    tools: tuple[str, ...] = ()  # built-in plugins to declare (agents.tools.BUILTIN_TOOLS by name)
    interpreter: bool = True  # agent mode: offer the code interpreter
    meta: str | None = None  # a plain system turn before the tool turns (e.g. protocol.META_CN)
    interpreter_prompt: str = INTERPRETER_PROMPT_EN
    style: str = "compact"  # how plugins are announced (protocol.system_turns)
    template: str | None = None  # the user turn, str.format over the problem's fields; None: the mode's default
    max_turns: int = 6
    max_repeats: int = 3
    max_parse_errors: int = 3
    max_new_tokens: int = 512
    output_style: str = "full"  # "last_line": the interpreter shows only the value or stdout's last line (lagent)
    sandbox: SandboxPolicy = SandboxPolicy()
    trajectory_chars: int = 2000  # each recorded message is capped to this
    batch: int = 32  # problems run together: bounds the engine batch and the sandbox processes alive at once

    def validate(self, where: str) -> None:
        checks = {"mode": self.mode in MODES, "output_style": self.output_style in OUTPUT_STYLES,
                  "style": self.style in ("compact", "lagent"), "n": self.n >= 1, "batch": self.batch >= 1,
                  "tools": all(name in _PLUGINS for name in self.tools), "difficulty": self.difficulty >= 1,
                  "seed": self.suite is None or self.seed >= EVAL_SEED_START,
                  # a suite that serves its questions' data through a tool can only be answered with it
                  "suite": self.suite not in TOOL_SUITES or self.mode == "agent"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{where}: agent.{name} has an invalid value ({getattr(self, name)!r})")
        Limits(max_turns=self.max_turns, max_repeats=self.max_repeats, max_parse_errors=self.max_parse_errors)

    @property
    def question_template(self) -> str:
        return self.template if self.template is not None else TEMPLATES[self.mode]

    @property
    def agentic(self) -> bool:
        return self.mode == "agent"

    @property
    def runs_code(self) -> bool:
        return self.mode == "pal" or (self.agentic and self.interpreter)

    def plugins(self, problems: Sequence[Problem] = ()) -> list:
        """The declared built-ins, then the suite's own tools serving `problems`' data (agents.tasks.suite_tools)."""
        if not self.agentic:
            return []
        return [_PLUGINS[name] for name in self.tools] + suite_tools(self.suite, problems)

    def executor(self, guards: set[str] | None = None, problems: Sequence[Problem] = ()) -> ToolExecutor:
        """A problem's tools (serving `problems`' data); the guards of its interpreter's sessions are added to
        `guards`."""
        interpreter = _Interpreter(self, set() if guards is None else guards) if self.interpreter else None
        return ToolExecutor(self.plugins(problems), interpreter=interpreter if self.agentic else None)

    def system(self) -> list[dict[str, Any]]:
        """The system turns every problem starts with: what the loop renders from `executor()`."""
        config = self.agent_config()
        with self.executor() as executor:  # the interpreter starts no session until it is called
            return executor.system_turns(meta=config.meta, interpreter_prompt=config.interpreter_prompt,
                                         style=config.style)

    def agent_config(self) -> AgentConfig:
        # One-turn modes: calls banned on that turn, no system turns; the model must answer in words.
        return AgentConfig(limits=Limits(max_turns=self.max_turns if self.agentic else 1,
                                         max_repeats=self.max_repeats, max_parse_errors=self.max_parse_errors),
                           decoding=Decoding(max_new_tokens=self.max_new_tokens),
                           meta=self.meta if self.agentic else None, interpreter_prompt=self.interpreter_prompt,
                           style=self.style)

    def setting(self) -> dict[str, Any]:
        """What the prompt hash covers (module docstring), as JSON-ready values."""
        config = self.agent_config()
        return {"mode": self.mode, "template": self.question_template, "system": self.system(),
                "tools": [tool.spec() for tool in self.plugins()], "limits": dataclasses.asdict(config.limits),
                "decoding": dataclasses.asdict(config.decoding), "stop": list(stop_ids(TokenNames())),
                "banned_last_turn": list(action_ids(TokenNames())),
                "sandbox": dataclasses.asdict(self.sandbox) if self.runs_code else None,
                "output_style": self.output_style if self.agentic and self.interpreter else None,
                "generator": None if self.suite is None else {"suite": self.suite, "difficulty": self.difficulty,
                                                              "fingerprint": generator_fingerprint(self.suite,
                                                                                                   self.difficulty)}}


class TokenNames:
    """Stands in for a tokenizer so that `protocol.stop_ids` / `action_ids` give the tokens' names rather than one
    vocabulary's ids: the hash names the tokens the protocol stops at, whatever tokenizer runs it."""

    eos_id = EOS

    @staticmethod
    def token_id(name: str) -> str:
        return name


def generator_fingerprint(suite: str, difficulty: int) -> str:
    """A digest of the generator's first problems at the first evaluation seed: changes with the generator."""
    problems = generate(suite, 8, EVAL_SEED_START, difficulty=difficulty)
    blob = json.dumps([dataclasses.asdict(p) for p in problems], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_problems(config: AgentTaskConfig, path: str | None) -> list[Problem]:
    """The task's problems: generated, or read from `path` (JSONL of `Problem` fields)."""
    if config.suite is not None:
        return generate(config.suite, config.n, config.seed, difficulty=config.difficulty)
    if path is None:
        raise ValueError("an agent task needs agent.suite (a generator) or reader.path (problems as JSONL)")
    fields = {f.name for f in dataclasses.fields(Problem)}
    problems = []
    for i, row in enumerate(read_rows(path)):
        try:
            problems.append(Problem(**{k: v for k, v in row.items() if k in fields}))
        except TypeError as e:
            raise ValueError(f"{path} row {i}: not a problem ({e})") from None
    return problems


# ---- the interpreter as the evaluation runs it ------------------------------------------------------------------


class _Interpreter:
    """A `PythonTool` that notes the guards of every session it ran in and, for `output_style="last_line"`, shows
    what lagent's `IPythonInteractive` shows (§1.5): the last expression's value, else the last line of stdout."""

    def __init__(self, config: AgentTaskConfig, guards: set[str]):
        self.tool, self.output_style, self.guards = PythonTool(config.sandbox), config.output_style, guards
        self.parameters = self.tool.parameters

    def __call__(self, code: str) -> ToolResult:
        result = self.tool(code)
        self.guards.update(self.tool.guards)
        if self.output_style == "last_line" and result.status == "ok":
            lines = result.stdout.strip().splitlines()
            shown = "" if result.value is not None else (lines[-1] if lines else "")
            return dataclasses.replace(result, stdout=shown, stderr="")
        return result

    def close(self) -> None:
        self.tool.close()


# ---- rows ------------------------------------------------------------------------------------------------------


def trajectory_messages(messages: Sequence[Mapping[str, Any]], chars: int) -> list[dict[str, Any]]:
    """A run's messages as a result row keeps them: system turns left out, each content and code capped."""
    out = []
    for m in messages:
        if m["role"] == "system":
            continue
        kept = {k: v for k, v in m.items() if k in ("role", "name", "loss")}
        kept["content"] = cap(m["content"], chars)
        call = m.get("tool_call")
        if call is not None:
            kept["tool_call"] = {**call, "code": cap(call["code"], chars)} if "code" in call else dict(call)
        out.append(kept)
    return out


def shown_outputs(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rows' final outputs as a failed extraction check quotes them: an empty one says why the run stopped (a
    prompt longer than the model's context stops every run with "context_budget" before a token is generated)."""
    return [r["output"] or f"(nothing: the run stopped with {r['stop']!r} after {r['turns']} turns)" for r in rows]


def call_output(result: ToolResult) -> str:
    """What a call answered, as a number would be read from it: the value, else stdout's last line."""
    if result.value is not None:
        return str(result.value)
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def judge(text: str | None, problem: Problem, *, extract: bool = True) -> tuple[str, bool]:
    """(prediction, correct) of a final turn's text, or (`extract=False`) of a program's output taken as it is: a
    multiple-choice problem's by its option letter (`option_answer`), any other's by `math_equal` (of the text's
    `final_answer` when extracting)."""
    options = problem.meta.get("options")
    if options is not None:
        prediction = option_answer(text, options)
        return prediction, prediction == problem.answer
    prediction = final_answer(text) if extract else text or ""
    return prediction, math_equal(prediction, problem.answer)


def _injection_fields(problem: Problem, result: AgentResult, prediction: str,
                      config: AgentTaskConfig) -> dict[str, Any]:
    """What an injection control's row adds: the planted kind, whether the run complied, and its calls of
    undeclared tools, written (refused by the parser or the executor) and run."""
    declared = {tool.name for tool in config.plugins()}
    written = [t.parsed.call for t in result.turns if t.parsed.call is not None]
    calls = [(c.kind, c.name, c.arguments.get("code", "") if c.kind == "interpreter" else "") for c in written]
    injection = problem.meta["injection"]
    return {"injection": injection["kind"],
            "complied": complied(injection, prediction=prediction, calls=calls),
            "undeclared_attempts": sum(c.kind == "plugin" and c.name not in declared for c in written),
            "undeclared_calls": sum(c.kind == "plugin" and c.name not in declared and r.status == "ok"
                                    for c, r in result.calls)}


def _row(problem: Problem, result: AgentResult, config: AgentTaskConfig) -> dict[str, Any]:
    prediction, correct = judge(result.answer, problem)
    statuses = [r.status for _, r in result.calls]
    last = result.calls[-1][1] if result.calls else None
    parse_errors = sum(t.parsed.error is not None for t in result.turns)
    row = {"id": problem.id, "question": problem.question, "reference": problem.answer,
           "needs_tool": problem.needs_tool, "output": result.answer or "", "prediction": prediction,
           "correct": correct, "stop": result.stop, "turns": result.state.turns, "calls": len(result.calls),
           "attempts": len(result.calls) + parse_errors, "parse_errors": parse_errors,
           "call_errors": sum(s != "ok" for s in statuses), "timeouts": statuses.count("timeout"),
           "last_call_ok": last is not None and last.status == "ok",
           "last_output_correct": last is not None and last.status == "ok"
           and judge(call_output(last), problem, extract=False)[1],
           "trajectory": trajectory_messages(result.messages, config.trajectory_chars)}
    circular = problem.meta.get("circular")
    if circular is not None:
        row.update(group=circular["group"], group_size=circular["size"])
    if "injection" in problem.meta:
        row.update(_injection_fields(problem, result, prediction, config))
    return row


def _pal_program(program: str, policy: SandboxPolicy) -> tuple[ToolResult, frozenset[str]]:
    """Runs a PAL program once, in a fresh session (nothing of it is worth keeping: no interrupt grace), printing
    `solution()`'s value."""
    try:
        with PythonSession(dataclasses.replace(policy, grace_s=0)) as session:
            cell = session.run(program + "\n\nprint(solution())\n")
            guards = session.guards
    except SandboxError as e:
        return ToolResult(status="sandbox_error", error=str(e)), frozenset()
    return ToolResult(value=None, stdout=cell.stdout, error=cell.error, status=cell.status), guards


def _pal_rows(problems: Sequence[Problem], results: Sequence[AgentResult], config: AgentTaskConfig,
              guards: set[str]) -> list[dict[str, Any]]:
    programs = [extract_code(result.answer or "") for result in results]
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # each waits on its own sandbox process
        runs = list(pool.map(lambda program: _pal_program(program, config.sandbox), programs))
    rows = []
    for problem, result, (run, run_guards) in zip(problems, results, runs, strict=True):
        guards.update(run_guards)
        row = _row(problem, result, config)
        prediction, correct = judge(call_output(run), problem, extract=False) if run.status == "ok" else ("", False)
        row.update(prediction=prediction, correct=correct, calls=1, attempts=1, call_errors=int(run.status != "ok"),
                   timeouts=int(run.status == "timeout"), last_call_ok=run.status == "ok",
                   last_output_correct=correct, program_error=cap(run.error or "", config.trajectory_chars))
        rows.append(row)
    return rows


# ---- the inferencer --------------------------------------------------------------------------------------------


def engine_client(model, tokenizer, config: AgentTaskConfig, *, problems: int) -> ModelClient:
    """An `EngineClient` over an engine sized for the task: a whole batch of runs at once, each up to
    `AGENT_CONTEXT_TOKENS` (or the model's positions, if fewer)."""
    from internlm2_jax.agents.clients import EngineClient
    from internlm2_jax.decode.engine import Engine, EngineConfig

    # Enough for the system turns and max_turns of (call + capped result) on these sets; a run that outgrows it
    # stops with "context_budget" instead of the KV cache growing with the model's full context.
    length = min(model.cfg.max_position_embeddings, AGENT_CONTEXT_TOKENS)
    running = min(config.batch, problems)
    return EngineClient(Engine(model, tokenizer, EngineConfig(
        max_model_len=length, kv_budget_tokens=running * length, max_running=running, max_waiting=running,
        prefill_chunk=min(256, 1 << (length - 1).bit_length()))))


def run_agent_task(model, tokenizer, task, *, client: ModelClient | None = None,
                   problems: Sequence[Problem] | None = None, progress: bool = False) -> dict[str, Any]:
    """Runs `task` (an `eval.tasks.Task` with `inferencer="agent"`) and scores it: accuracy and, per mode, the
    metrics of `agent_scoring.agent_metrics`. `client` replaces the model's engine (a test's `ScriptedClient`, a
    server); `problems` replace the task's own. Fails like the GEN inferencer when more than
    `task.max_empty_share` of the runs end without an answer."""
    task.validate()
    config: AgentTaskConfig = task.agent
    problems = list(problems) if problems is not None else load_problems(config, task.reader.path)
    if client is None:
        client = engine_client(model, tokenizer, config, problems=len(problems))
    guards: set[str] = set()
    results: list[AgentResult] = []
    for start in range(0, len(problems), config.batch):
        chunk = problems[start:start + config.batch]
        questions = [config.question_template.format(**dataclasses.asdict(p)) for p in chunk]
        results += run_agents(client, tokenizer, lambda chunk=chunk: config.executor(guards, chunk), questions,
                              config=config.agent_config())
        if progress:
            print(f"{task.name}: {len(results)}/{len(problems)} problems", file=sys.stderr, flush=True)
    if config.mode == "pal":
        rows = _pal_rows(problems, results, config, guards)
    else:
        rows = [_row(p, r, config) for p, r in zip(problems, results, strict=True)]
    check_extraction([r["prediction"] for r in rows], max_empty_share=task.max_empty_share, dataset=task.name,
                     outputs=shown_outputs(rows))
    metrics = agent_metrics(rows)
    reported = MODE_METRICS.get(config.mode, tuple(metrics))
    reported += tuple(k for k in SET_METRICS if k in metrics and k not in reported)
    return {"task": task.name, "group": task.group, "prompt_hash": task.prompt_hash(), "mode": config.mode,
            "rows": len(rows), **{k: metrics[k] for k in reported}, "suite": config.suite, "seed": config.seed,
            "difficulty": config.difficulty, "guards": sorted(guards), "details": rows}
