"""The OpenAI wire format as pure functions, so that all of it is testable without a server.

Requests are pydantic models; `template_messages` turns OpenAI messages and tools into `ChatTemplate` messages (the
InternLM2 protocol, agents.md §1: function tools as a `system name=<|plugin|>` turn, our `{"type": "code_interpreter"}`
extension as a `system name=<|interpreter|>` turn, calls as actions, results as `environment` turns routed by
`tool_call_id`), and `tool_reply` reads a call back out of the generated token ids (`agents.protocol.parse_ids`):
an interpreter call comes back as a `python` function call with `{"code": ...}` arguments, and a call that cannot
be taken as our `tool_call_error` extension field (`type`, `message`, `raw`) instead of being passed off as content.
`tool_decoding` turns `tool_choice` into decoding (agents.md §2.8): "none" bans `<|action_start|>`, "required" and a
named tool open the assistant turn with the call's start (its ids are parsed with the reply), so no constrained
decoding is needed.
The rest builds response bodies: the legacy `logprobs` object of /v1/completions (the form lm-eval's
`local-completions` reads), the chat `logprobs` object, usage and the perplexity entries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from internlm2_jax.agents.protocol import (
    INTERPRETER_PROMPT_EN,
    INTERPRETER_TOOL_NAME,
    Call,
    action_ids,
    parse_ids,
    system_turns,
)
from internlm2_jax.chat_prompts import MessageError, openai_messages
from internlm2_jax.decode.sampling import SamplingConfig
from internlm2_jax.tokenizer import ACTION_START, INTERPRETER, PLUGIN

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

MAX_N = 16
MAX_LOGPROBS = 20
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty")


class APIError(Exception):
    """A request answered with OpenAI's error body; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- requests ---------------------------------------------------------------------------------------------------


class _Request(BaseModel):
    # Clients send fields we have no use for (`user`, `metadata`, ...); refusing them would break stock clients.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the served model


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(_Request):
    """Sampling and stopping, shared by both generation endpoints. None means "not given" (clients send nulls)."""

    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling_configs(self, banned_ids: tuple[int, ...] = ()) -> list[SamplingConfig]:
        """One config per choice: choice i draws with seed + i, so n > 1 gives n different samples and a fixed seed
        reproduces all of them. `banned_ids`: ids no choice may generate (set by the server, not the client)."""
        seed = secrets.randbits(62) if self.seed is None else self.seed
        given = {name: value for name in _SAMPLING_FIELDS if (value := getattr(self, name)) is not None}
        if given.get("top_k") == -1:
            given["top_k"] = 0  # vLLM's spelling of "off"
        # OpenAI's default temperature is 1; the engine's own default is greedy.
        configs = [SamplingConfig(**{"temperature": 1.0, **given, "seed": seed + i, "banned_ids": banned_ids})
                   for i in range(self.n)]
        for config in configs:
            try:
                config.validate()
            except ValueError as e:
                raise APIError(400, str(e), param=str(e).split(":")[0]) from None
        return configs

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if "" in stops:
            raise APIError(400, "stop: an empty stop string would end every reply before it starts", param="stop")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: only the prompt's log-probs (with echo)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def max_new_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name`: nothing in the template to carry it

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None  # which call a tool result answers: it picks the environment (plugin/interpreter)


# OpenAI's rule for function names; it also keeps a name free of quotes and spaces inside the call's JSON head that
# `tool_decoding` pre-fills.
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionSpec(BaseModel):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # None: no parameters

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        """A JSON Schema of an object (calls carry `"parameters": {...}`); `type` may be left out, as by clients that
        send `{}` for a function without parameters."""
        if schema is None:
            return None
        if schema.get("type", "object") != "object":
            raise ValueError(f'must be a JSON Schema of type "object", got type {schema["type"]!r}')
        if not isinstance(schema.get("properties", {}), dict):
            raise ValueError("`properties` must be an object mapping argument names to their schemas")
        required = schema.get("required", [])
        if not (isinstance(required, list) and all(isinstance(name, str) for name in required)):
            raise ValueError("`required` must be a list of argument names")
        return schema


class Tool(BaseModel):
    """A function tool, or our extension `{"type": "code_interpreter"}`: InternLM2's stateful Python interpreter."""

    type: Literal["function", "code_interpreter"]
    function: FunctionSpec | None = None

    @model_validator(mode="after")
    def _function_iff_function(self) -> Tool:
        if (self.function is None) == (self.type == "function"):
            raise ValueError("a function tool needs `function`; a code_interpreter tool has none")
        return self


class ToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: the reply must call that tool."""

    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None  # see `tool_decoding`
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens; wins when both
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def top_n(self) -> int:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else 0


class PerplexityRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]


def encode_prompts(prompt: str | list, tokenizer: Tokenizer, field: str) -> list[tuple[list[int], str]]:
    """Each prompt's (ids, text). Strings are encoded with BOS as plain text, so a typed `<|im_start|>` stays text;
    token ids are taken as given (lm-eval sends its own tokenization) and decoded for `echo`."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or any(len(item) == 0 for item in prompt):
        raise APIError(400, f"{field}: empty prompt", param=field)
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append((tokenizer.encode(item, add_bos=True, allow_special=False), item))
            continue
        outside = [t for t in item if not 0 <= t < tokenizer.vocab_size]
        if outside:
            raise APIError(400, f"{field}: token id {outside[0]} is outside the vocabulary [0, "
                                f"{tokenizer.vocab_size})", param=field)
        prompts.append((list(item), tokenizer.decode(item)))
    return prompts


# ---- chat messages and tool calls -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """What one request lets the model call: function tools by name (-> parameters schema) and the interpreter."""

    functions: dict[str, Mapping[str, Any] | None]
    interpreter: bool


def tool_use(tools: list[Tool] | None) -> ToolUse | None:
    """None without tools; a 400 naming the field when two functions share a name, or when a function tool would be
    mistaken for the interpreter's `python` calls."""
    if not tools:
        return None
    functions: dict[str, Mapping[str, Any] | None] = {}
    for index, tool in enumerate(tools):
        if tool.type != "function":
            continue
        if tool.function.name in functions:
            raise APIError(400, f"tools[{index}].function.name: a second tool named {tool.function.name!r}; tool "
                                "names must be unique", param=f"tools[{index}].function.name")
        functions[tool.function.name] = tool.function.parameters
    interpreter = any(tool.type == "code_interpreter" for tool in tools)
    if interpreter and INTERPRETER_TOOL_NAME in functions:
        raise APIError(400, f"tools: a function named {INTERPRETER_TOOL_NAME!r} cannot be told apart from the "
                            f"code_interpreter's calls; rename it", param="tools")
    return ToolUse(functions, interpreter)


@dataclasses.dataclass(frozen=True)
class ToolDecoding:
    """How one chat request decodes with respect to tools."""

    use: ToolUse | None  # what the reply is parsed against; None: the reply is plain text
    prefill: tuple[int, ...] = ()  # ids that open the assistant turn: a forced call's start, parsed with the reply
    banned_ids: tuple[int, ...] = ()  # ids that may not be generated


def tool_decoding(tool_choice: str | NamedToolChoice | None, tools: list[Tool] | None,
                  tokenizer: Tokenizer) -> ToolDecoding:
    """What `tool_choice` asks for (OpenAI's semantics), a 400 naming the field when it cannot be served.

    "auto" (the default): the model may call a tool. "none": the tools stay in the prompt but `<|action_start|>` is
    banned, so no call can begin (hiding the tools alone would not stop a model trained to call). "required": the
    assistant turn opens with `<|action_start|>` and, when only one kind of call is possible, its kind token and
    newline. A named tool: the call's start up to `"parameters":`, so the model only writes the arguments.
    """
    use = tool_use(tools)
    if tool_choice in (None, "auto"):
        return ToolDecoding(use)
    if tool_choice == "none":
        return ToolDecoding(None, banned_ids=action_ids(tokenizer))
    wanted = "required" if tool_choice == "required" else f"a call to {tool_choice.function.name!r}"
    if use is None:
        raise APIError(400, f"tool_choice: {wanted} needs `tools`, and none are given", param="tool_choice")
    if tool_choice == "required":
        kinds = [kind for kind, on in ((PLUGIN, bool(use.functions)), (INTERPRETER, use.interpreter)) if on]
        return ToolDecoding(use, _call_head(tokenizer, kinds[0] if len(kinds) == 1 else None))
    name = tool_choice.function.name
    if use.interpreter and name == INTERPRETER_TOOL_NAME:
        return ToolDecoding(use, _call_head(tokenizer, INTERPRETER))
    if name not in use.functions:
        declared = ", ".join(use.functions) or "none (only the code_interpreter)"
        raise APIError(400, f"tool_choice.function.name: {name!r} is not among the tools; declared functions: "
                            f"{declared}", param="tool_choice.function.name")
    # The template renders a call as `json.dumps({"name": ..., "parameters": ...})` encoded as plain text. The head
    # stops before the space after "parameters":, because the tokenizer starts a piece at a space: the template's
    # ids have ` {` there, a head ending in ` ` would end in a lone space token that a model never saw before `{`.
    return ToolDecoding(use, _call_head(tokenizer, PLUGIN, '{"name": ' + json.dumps(name) + ', "parameters":'))


def _call_head(tokenizer: Tokenizer, kind: str | None, json_head: str = "") -> tuple[int, ...]:
    """`<|action_start|>`, then with `kind` its id and the body's start ("\\n" + `json_head`) as plain text."""
    ids = [tokenizer.token_id(ACTION_START)]
    if kind is not None:
        ids += [tokenizer.token_id(kind), *tokenizer.encode("\n" + json_head, allow_special=False)]
    return tuple(ids)


def template_messages(messages: list[ChatMessage], tools: list[Tool] | None) -> list[dict[str, Any]]:
    """OpenAI messages and tools as `ChatTemplate` messages, through the converter training data uses
    (`chat_prompts`) and the protocol's system turns (interpreter, then the function schemas) after the leading
    system turns. With the interpreter on, an assistant's `python` call is an interpreter call; a tool result is an
    `environment` turn named after the kind of the call its `tool_call_id` names (without one: the latest call)."""
    use = tool_use(tools)
    dumped = [message.model_dump(exclude_none=True) for message in messages]
    try:
        converted = openai_messages(dumped, interpreter_tool=INTERPRETER_TOOL_NAME if use and use.interpreter
                                    else None)
        turns = system_turns(interpreter_prompt=INTERPRETER_PROMPT_EN if use and use.interpreter else None,
                             tools=[tool.function.model_dump(exclude_none=True) for tool in tools or []
                                    if tool.type == "function"])
    except MessageError as e:
        raise APIError(400, str(e), param=e.field) from None
    lead = next((i for i, message in enumerate(converted) if message["role"] != "system"), len(converted))
    return [*converted[:lead], *turns, *converted[lead:]]


def openai_tool_call(call: Call) -> dict[str, Any]:
    """A parsed call as an OpenAI tool call (the interpreter's as a `python` call with `{"code": ...}`)."""
    function = {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def tool_reply(ids: list[int], text: str, finish_reason: str | None, use: ToolUse,
               tokenizer: Tokenizer) -> tuple[str, dict[str, Any]]:
    """(content, the message's `tool_calls` or `tool_call_error` field, or {}) of a reply with tools: parsed from
    the generated ids; `text` is the engine's text (control tokens skipped), which a stop string may have cut."""
    parsed = parse_ids(ids, tokenizer, finish_reason=finish_reason, tools=use.functions,
                       interpreter=use.interpreter)
    if len(text) < len(parsed.content):  # a stop string ended the reply before any call
        return text, {}
    if parsed.error is not None:
        error = parsed.error
        return parsed.content, {"tool_call_error": {"type": error.code, "message": error.message, "raw": error.raw}}
    if parsed.call is not None:
        return parsed.content, {"tool_calls": [openai_tool_call(parsed.call)]}
    return parsed.content, {}


def streamable_content(ids: list[int], text: str, tokenizer: Tokenizer) -> str:
    """The content of a tools-enabled reply that can be streamed now: the engine's text (which holds back what a
    stop string could still cut) up to the first `<|action_start|>` id. A call is sent whole at the end."""
    action_start = tokenizer.token_id(ACTION_START)
    if action_start not in ids:
        return text
    return text[:len(tokenizer.decode(ids[:ids.index(action_start)], skip_special_tokens=True))]


# ---- responses --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The fields every response and stream chunk of one HTTP request share."""

    id: str
    object: str
    model: str
    created: int

    def __call__(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -inf; vLLM floors at the same value


def legacy_logprobs(tokenizer: Tokenizer, ids: list[int], logprobs: list[float | None],
                    top_logprobs: list[dict[int, float] | None], text_offset: int = 0) -> dict[str, list]:
    """The /v1/completions `logprobs` object. None marks the first prompt token (nothing predicts it).

    Each top dict also holds the chosen token (OpenAI: "up to logprobs+1 elements"), so `max(top.values())` equals
    the token's own log-prob exactly when it was the most likely one: lm-eval's `is_greedy` test.
    """
    tokens = [tokenizer.decode([token_id]) for token_id in ids]
    tops: list[dict[str, float] | None] = []
    for token, logprob, top in zip(tokens, logprobs, top_logprobs, strict=True):
        if top is None:
            tops.append(None)
            continue
        entry: dict[str, float] = {}
        # Ids that decode alike share a key: keep the larger log-prob, which is what `max` is asked about.
        for token_id, value in [*top.items(), (None, logprob)]:
            key = token if token_id is None else tokenizer.decode([token_id])
            entry[key] = max(entry.get(key, -math.inf), _finite(value))
        tops.append(entry)
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": [None if lp is None else _finite(lp) for lp in logprobs],
            "top_logprobs": tops, "text_offset": offsets}


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(tokenizer: Tokenizer, ids: list[int], logprobs: list[float],
                  top_logprobs: list[dict[int, float]]) -> dict[str, list]:
    """The /v1/chat/completions `logprobs` object: per token its string, log-prob, UTF-8 bytes and top-n."""
    content = []
    for token_id, logprob, top in zip(ids, logprobs, top_logprobs, strict=True):
        ranked = sorted(top.items(), key=lambda item: -item[1])
        content.append({**_chat_token(tokenizer.decode([token_id]), logprob),
                        "top_logprobs": [_chat_token(tokenizer.decode([i]), value) for i, value in ranked]})
    return {"content": content}


def perplexity_entry(index: int, token_logprobs: list[float | None]) -> dict[str, Any]:
    """Mean negative log-likelihood over the predicted tokens (all but the first) and its exponential."""
    predicted = token_logprobs[1:]
    nll = -sum(predicted) / len(predicted)
    return {"index": index, "tokens": len(token_logprobs), "token_logprobs": token_logprobs, "nll": nll,
            "perplexity": math.exp(nll)}
