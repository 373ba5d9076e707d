"""The agent loop (agents.md §2.3, §2.7): render the conversation, generate the assistant turn, parse its call from
the ids, run it, feed the result back, until the model answers or a limit stops the run.

    with ToolExecutor(BUILTIN_TOOLS, interpreter=PythonTool()) as tools:
        result = run_agent(EngineClient(engine), tokenizer, tools, "What is 123 * 456?", max_turns=4)
    result.answer, result.stop, result.messages          # the trajectory is an SFT record's messages

- `run_agent`: one question. `run_agents`: many, in rounds: every active agent's next turn is asked for in one
  `client.generate_many` call (for the engine: one batch), then their calls run side by side in threads (the
  interpreter works in child processes; plugins are bounded or run in their own processes).
- `stream_agent`: one question as events; per turn `TextDelta`s of the content (never a control token or a call's
  body; joined, they are the turn's content), then `CallReady` (the call, generated whole) and `CallResult` when
  the turn made one, then `TurnEnd`; `Done` with the result last.

The last permitted turn is generated with `<|action_start|>` banned, so the model has to answer (lagent returned
nothing when its turns ran out, §1.6); a client that cannot ban gets lagent's instruction as a system turn instead.
Each turn's prompt is checked against the context budget (the client's `max_model_len` unless `Limits` says)
before it is sent.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from internlm2_jax.agents.clients import Decoding, Generation, ModelClient, Prompt
from internlm2_jax.agents.protocol import (INTERPRETER_PROMPT_EN, Call, Parsed, ToolResult, action_ids, parse_text,
                                          stop_ids)
from internlm2_jax.agents.tools import ToolExecutor
from internlm2_jax.agents.state import (AgentState, Limits, StopReason, add_results, check_budget, force_answer,
                                        start, step)
from internlm2_jax.chat_template import ChatTemplate, get_chat_template
from internlm2_jax.tokenizer import ACTION_START

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

MAX_TOOL_THREADS = 8  # calls of one round run side by side, at most this many at a time


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    limits: Limits = Limits()
    decoding: Decoding = Decoding()  # stop and banned ids are the loop's; the rest is passed on
    meta: str | None = None  # a plain system prompt before the tool turns (e.g. protocol.META_CN)
    interpreter_prompt: str = INTERPRETER_PROMPT_EN  # announces the interpreter when the executor has one
    style: Literal["compact", "lagent"] = "compact"  # how the tools are announced (protocol.system_turns)
    template: str = "internlm2_chat"


@dataclasses.dataclass(frozen=True)
class TurnRecord:
    prompt_tokens: int
    generation: Generation
    parsed: Parsed
    calls_banned: bool  # generated with `<|action_start|>` banned (the last permitted turn)
    generate_s: float  # the generation's wall time (in `run_agents`: its round's, shared by the batch)
    tool_s: float = 0.0  # the call's wall time, when one ran
    result: ToolResult | None = None


@dataclasses.dataclass(frozen=True)
class AgentResult:
    answer: str | None  # None when the run stopped without one
    stop: StopReason
    messages: tuple[Mapping[str, Any], ...]  # the whole trajectory in template form (an SFT record's messages)
    calls: tuple[tuple[Call, ToolResult], ...]  # the calls that ran, with their results
    turns: tuple[TurnRecord, ...]
    state: AgentState


# ---- streaming events -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextDelta:
    turn: int
    text: str  # more of the turn's content: never a control token, never a call's body


@dataclasses.dataclass(frozen=True)
class CallReady:
    turn: int
    call: Call


@dataclasses.dataclass(frozen=True)
class CallResult:
    turn: int
    call: Call
    result: ToolResult


@dataclasses.dataclass(frozen=True)
class TurnEnd:
    turn: int
    record: TurnRecord


@dataclasses.dataclass(frozen=True)
class Done:
    result: AgentResult


Event = TextDelta | CallReady | CallResult | TurnEnd | Done


# ---- one run ----------------------------------------------------------------------------------------------------


class _Run:
    """One question's run: the state plus what the drivers share (rendering a turn's request, taking its
    generation, running its call)."""

    def __init__(self, client: ModelClient, tokenizer: Tokenizer, tools: ToolExecutor,
                 question: str | Sequence[Mapping[str, Any]], config: AgentConfig):
        self.client, self.tokenizer, self.tools, self.config = client, tokenizer, tools, config
        self.template: ChatTemplate = get_chat_template(config.template)
        limits = config.limits
        if limits.context_tokens is None and client.max_model_len is not None:
            limits = dataclasses.replace(limits, context_tokens=client.max_model_len)
        system = tools.system_turns(meta=config.meta, interpreter_prompt=config.interpreter_prompt,
                                    style=config.style)
        self.state = start(question, system=system, limits=limits)
        self.specs, self.interpreter = tools.specs(), tools.interpreter is not None
        self.records: list[TurnRecord] = []

    def request(self) -> tuple[Prompt, Decoding] | None:
        """The next turn to generate, or None when the run is over (perhaps now: its prompt would not fit)."""
        if self.state.done:
            return None
        banned: tuple[int, ...] = ()
        if self.state.last_turn:
            if self.client.can_ban:
                banned = action_ids(self.tokenizer)
            else:  # asked once: the run ends with this turn
                self.state = force_answer(self.state)
        ids, _ = self.template.encode(self.state.messages, self.tokenizer, add_generation_prompt=True)
        decoding = dataclasses.replace(self.config.decoding, stop_ids=stop_ids(self.tokenizer), banned_ids=banned)
        self.state = check_budget(self.state, len(ids), decoding.max_new_tokens)
        if self.state.done:
            return None
        prompt = Prompt(tuple(ids), self.state.messages, tuple(self.tools.openai_tools()), self.interpreter)
        return prompt, decoding

    def take(self, prompt: Prompt, decoding: Decoding, generation: Generation, seconds: float) -> Call | None:
        """Moves the state on by the generated turn; returns the call to run, if any."""
        parsed = generation.parse(self.tokenizer, tools=self.specs, interpreter=self.interpreter)
        self.state = step(self.state, parsed)
        self.records.append(TurnRecord(len(prompt.ids), generation, parsed, bool(decoding.banned_ids), seconds))
        return self.state.pending

    def execute(self) -> tuple[Call, ToolResult]:
        """Runs the pending call (the executor turns whatever the tool does into a result; it never raises)."""
        call, started = self.state.pending, time.perf_counter()
        result = self.tools(call)
        self.state = add_results(self.state, call, result)
        self.records[-1] = dataclasses.replace(self.records[-1], tool_s=time.perf_counter() - started, result=result)
        return call, result

    def result(self) -> AgentResult:
        state = self.state
        return AgentResult(state.answer, state.stop, state.messages, tuple(zip(state.calls, state.results,
                                                                              strict=True)),
                           tuple(self.records), state)


def _config(config: AgentConfig | None, max_turns: int | None) -> AgentConfig:
    config = config or AgentConfig()
    if max_turns is not None:
        config = dataclasses.replace(config, limits=dataclasses.replace(config.limits, max_turns=max_turns))
    return config


# ---- drivers ----------------------------------------------------------------------------------------------------


def run_agent(client: ModelClient, tokenizer: Tokenizer, tools: ToolExecutor,
              question: str | Sequence[Mapping[str, Any]], *, max_turns: int | None = None,
              config: AgentConfig | None = None) -> AgentResult:
    """Runs one question to its end. `tools` is the caller's (it keeps its interpreter session and closes it)."""
    return run_agents(client, tokenizer, tools, [question], max_turns=max_turns, config=config)[0]


def run_agents(client: ModelClient, tokenizer: Tokenizer, tools: ToolExecutor | Callable[[], ToolExecutor],
               questions: Sequence[str | Sequence[Mapping[str, Any]]], *, max_turns: int | None = None,
               config: AgentConfig | None = None) -> list[AgentResult]:
    """Runs many questions together, in rounds (see the module docstring); the results are in question order and
    equal one-by-one runs' (the engine's outputs do not depend on what they are batched with).

    `tools`: an executor shared by every run (only without an interpreter: a session holds one conversation's
    variables), or a function making one executor per question; those are closed here."""
    config = _config(config, max_turns)
    if isinstance(tools, ToolExecutor):
        if tools.interpreter is not None and len(questions) > 1:
            raise ValueError("run_agents: an executor with an interpreter would share one session between the "
                             "questions; pass a function that makes an executor per question")
        executors, owned = [tools] * len(questions), False
    else:
        executors, owned = [], True
    try:
        if owned:
            executors += [tools() for _ in questions]
        runs = [_Run(client, tokenizer, executor, question, config)
                for executor, question in zip(executors, questions, strict=True)]
        with ThreadPoolExecutor(MAX_TOOL_THREADS) as pool:
            while True:
                asks = [(run, ask) for run in runs if (ask := run.request()) is not None]
                if not asks:
                    break
                started = time.perf_counter()
                generations = client.generate_many([prompt for _, (prompt, _) in asks],
                                                   [decoding for _, (_, decoding) in asks])
                seconds = time.perf_counter() - started
                for (run, (prompt, decoding)), generation in zip(asks, generations, strict=True):
                    run.take(prompt, decoding, generation, seconds)
                list(pool.map(_Run.execute, [run for run, _ in asks if run.state.pending is not None]))
        return [run.result() for run in runs]
    finally:
        if owned:
            for executor in executors:
                executor.close()


def stream_agent(client: ModelClient, tokenizer: Tokenizer, tools: ToolExecutor,
                 question: str | Sequence[Mapping[str, Any]], *, max_turns: int | None = None,
                 config: AgentConfig | None = None) -> Iterator[Event]:
    """`run_agent` as events (module docstring); the last is `Done` with the same result `run_agent` returns.
    Closing the iterator early cancels the generation under way."""
    run = _Run(client, tokenizer, tools, question, _config(config, max_turns))
    while (ask := run.request()) is not None:
        prompt, decoding = ask
        turn, sent, started = run.state.turns + 1, "", time.perf_counter()
        generation = None
        for generation in client.stream(prompt, decoding):
            shown = visible_content(generation, tokenizer)
            if len(shown) > len(sent) and shown.startswith(sent):
                yield TextDelta(turn, shown[len(sent):])
                sent = shown
        call = run.take(prompt, decoding, generation, time.perf_counter() - started)
        content = run.records[-1].parsed.content
        if len(content) > len(sent) and content.startswith(sent):  # what was held back until the turn ended
            yield TextDelta(turn, content[len(sent):])
        if call is not None:
            yield CallReady(turn, call)
            yield CallResult(turn, *run.execute())
        yield TurnEnd(turn, run.records[-1])
    yield Done(run.result())


def visible_content(generation: Generation, tokenizer: Tokenizer) -> str:
    """The part of a turn so far that is surely content: the text before `<|action_start|>`, control tokens left
    out, without a trailing half-decoded character. A text-only backend's turn is shown once it has ended (its
    text could end in the first characters of a control token's name)."""
    if generation.ids is None:
        return parse_text(generation.text).content if generation.finish_reason is not None else ""
    ids = generation.ids
    action_start = tokenizer.token_id(ACTION_START)
    if action_start in ids:
        ids = ids[:ids.index(action_start)]
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
