"""An agent run as an immutable value and the pure transitions between its values (agents.md §2.3).

`AgentState` holds the conversation in the chat template's message form (system turns, the question, then the
model's turns and the environment's answers), how many model turns and calls were used, the call waiting for its
result, and, once the run is over, why it stopped. The drivers (`agents.loop`) do the impure parts (rendering,
generating, running tools, timing) and move the state on with these functions only:

    state = start(question, system=executor.system_turns(), limits=Limits(max_turns=4))
    state = check_budget(state, prompt_tokens, max_new_tokens)   # may stop: "context_budget"
    state = step(state, parsed)                                   # the model's turn: an answer, a call or an error
    state = add_results(state, state.pending, executor(state.pending))

What lagent did and this does instead (§1.6): a call that cannot be parsed is not retried silently; the model's turn
stays in the history (marked `loss: False`, so SFT records never teach it) followed by an environment turn with
the error, and it counts as a turn and against the parse-error budget. The last permitted turn is meant to be
generated with calls banned; a call made in it anyway (a client that cannot ban) is recorded but not run, and the run
stops with "max_turns" and no answer rather than returning the tool's output as if it were one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from internlm2_jax.agents.protocol import RESULT_LIMIT_CHARS, Call, Parsed, ToolResult, result_turn

StopReason = Literal["answered", "max_turns", "repeated_call", "context_budget", "parse_errors"]
# Parse errors only the plugin (JSON) path raises, and the one only the interpreter path raises; the others
# (truncated_call, unknown_action_kind, too_large) may come from either and are answered in the plugin's JSON form.
_INTERPRETER_ERRORS = frozenset({"empty_code"})
# What lagent's ReAct tells a model on its last turn; used when a client cannot ban `<|action_start|>`.
FORCE_ANSWER = "You should directly give results based on history information."


@dataclasses.dataclass(frozen=True)
class Limits:
    max_turns: int = 6  # model generations per question (lagent: 3, 4, 6 or 7)
    max_repeats: int = 3  # the same call (name and arguments) this many times in a row stops the run
    max_parse_errors: int = 3  # calls that could not be parsed, over the whole run
    context_tokens: int | None = None  # prompt + max_new_tokens must fit in this; None: no limit
    max_result_chars: int = RESULT_LIMIT_CHARS  # each environment turn is capped to this (protocol.cap)

    def __post_init__(self):
        for name in ("max_turns", "max_repeats", "max_parse_errors", "max_result_chars"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"Limits.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ValueError(f"Limits.context_tokens must be positive or None, got {self.context_tokens!r}")


@dataclasses.dataclass(frozen=True)
class AgentState:
    """One point of a run. The message dicts are never modified here: every transition builds new ones."""

    messages: tuple[Mapping[str, Any], ...]  # template messages, system turns included
    limits: Limits = Limits()
    turns: int = 0  # model generations so far
    calls: tuple[Call, ...] = ()  # calls that were (or are about to be) run, in order
    results: tuple[ToolResult, ...] = ()  # their results, one per call once it has run
    parse_errors: int = 0
    pending: Call | None = None  # a call waiting for `add_results`
    answer: str | None = None  # the final answer, once the model gave one
    stop: StopReason | None = None

    @property
    def done(self) -> bool:
        return self.stop is not None

    @property
    def last_turn(self) -> bool:
        """The next generation is the last one the turn budget allows, so no call may be made in it."""
        return self.turns + 1 >= self.limits.max_turns


def start(question: str | Sequence[Mapping[str, Any]], *, system: Sequence[Mapping[str, Any]] = (),
          limits: Limits = Limits()) -> AgentState:
    """A run of `question` (a user message's text, or template messages to continue) after the `system` turns."""
    history = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
    return AgentState((*system, *history), limits)


def check_budget(state: AgentState, prompt_tokens: int, max_new_tokens: int) -> AgentState:
    """Stops the run ("context_budget") when the next prompt and its generation would not fit the context."""
    budget = state.limits.context_tokens
    if state.done or budget is None or prompt_tokens + max_new_tokens <= budget:
        return state
    return dataclasses.replace(state, stop="context_budget")


def force_answer(state: AgentState) -> AgentState:
    """A system turn asking for the answer now: the last turn's instruction for clients that cannot ban calls."""
    return dataclasses.replace(state, messages=(*state.messages, {"role": "system", "content": FORCE_ANSWER}))


def step(state: AgentState, parsed: Parsed) -> AgentState:
    """The model's turn: a final answer, a call to run (`pending`), or a parse error fed back as an environment
    turn. The run stops on an answer, at the turn budget, at the parse-error budget, or at a repeated call."""
    _check_can_generate(state)
    turns = state.turns + 1
    out_of_turns = turns >= state.limits.max_turns
    if parsed.error is not None:
        error = parsed.error
        kind = parsed.call.kind if parsed.call else "interpreter" if error.code in _INTERPRETER_ERRORS else "plugin"
        # The template has no form for a malformed call, so its body is kept as text after the content (the model
        # sees what it wrote); a call that parsed but was refused keeps its proper form.
        shown = _assistant_turn(parsed.content, parsed.call, loss=False) if parsed.call else {
            "role": "assistant", "content": parsed.content + error.raw, "loss": False}
        feedback = result_turn(parsed.call or Call(kind, "", {}, error.raw),
                               ToolResult(status=error.code, error=error.message),
                               limit_chars=state.limits.max_result_chars)
        parse_errors = state.parse_errors + 1
        stop = ("parse_errors" if parse_errors >= state.limits.max_parse_errors
                else "max_turns" if out_of_turns else None)
        return dataclasses.replace(state, messages=(*state.messages, shown, feedback), turns=turns,
                                   parse_errors=parse_errors, stop=stop)
    if parsed.call is None:
        # On the last turn calls were banned, so the answer was forced: the reason says the budget ended the run.
        return dataclasses.replace(state, messages=(*state.messages, {"role": "assistant", "content": parsed.content}),
                                   turns=turns, answer=parsed.content, stop="max_turns" if out_of_turns else "answered")
    moved = dataclasses.replace(state, messages=(*state.messages, _assistant_turn(parsed.content, parsed.call)),
                                turns=turns)
    if out_of_turns:
        return dataclasses.replace(moved, stop="max_turns")
    if _repeats(state.calls, parsed.call) + 1 >= state.limits.max_repeats:
        return dataclasses.replace(moved, stop="repeated_call")
    return dataclasses.replace(moved, calls=(*state.calls, parsed.call), pending=parsed.call)


def add_results(state: AgentState, call: Call, result: ToolResult) -> AgentState:
    """The pending `call`'s result as the environment turn that answers it."""
    if state.pending is None or state.pending != call:
        raise ValueError(f"add_results: {call.name!r} is not the pending call ({state.pending!r})")
    turn = result_turn(call, result, limit_chars=state.limits.max_result_chars)
    return dataclasses.replace(state, messages=(*state.messages, turn), results=(*state.results, result), pending=None)


def _check_can_generate(state: AgentState) -> None:
    if state.done:
        raise ValueError(f"the run has stopped ({state.stop}); no further turn can be taken")
    if state.pending is not None:
        raise ValueError(f"the call {state.pending.name!r} is waiting for its result (add_results first)")


def _assistant_turn(content: str, call: Call, *, loss: bool = True) -> dict[str, Any]:
    if call.kind == "interpreter":
        tool_call = {"type": "interpreter", "code": call.arguments["code"]}
    else:
        tool_call = {"type": "plugin", "name": call.name, "parameters": call.arguments}
    turn = {"role": "assistant", "content": content, "tool_call": tool_call}
    return turn if loss else {**turn, "loss": False}


def _canonical(call: Call) -> tuple[str, str, str]:
    return call.kind, call.name, json.dumps(call.arguments, sort_keys=True, ensure_ascii=False, default=repr)


def _repeats(calls: tuple[Call, ...], call: Call) -> int:
    """How many of the latest calls in a row are `call` (same kind, name and arguments; not the raw text)."""
    same = _canonical(call)
    count = 0
    for earlier in reversed(calls):
        if _canonical(earlier) != same:
            break
        count += 1
    return count
