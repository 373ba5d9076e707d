"""The OpenAI wire format as pure functions, so that all of it is testable without a server.

Requests are pydantic models; `template_messages` turns OpenAI messages and tools into `ChatTemplate` messages (the
InternLM2 plugin protocol, spec §4: tools as a `system name=<|plugin|>` turn, calls as `<|action_start|><|plugin|>`
JSON, results as `environment name=<|plugin|>`), and `parse_tool_call` reads a call back out of generated text. The
rest builds response bodies: the legacy `logprobs` object of /v1/completions (the form lm-eval's `local-completions`
reads), the chat `logprobs` object, usage and the perplexity entries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from internlm2_jax.chat_prompts import MessageError, openai_messages, with_tools
from internlm2_jax.decode.sampling import SamplingConfig
from internlm2_jax.tokenizer import ACTION_END, ACTION_START, BOS, EOS, IM_END, IM_START, INTERPRETER, PLUGIN

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

MAX_N = 16
MAX_LOGPROBS = 20
TOOL_CALL_START = ACTION_START + PLUGIN
CONTROL_TOKENS = (IM_START, IM_END, ACTION_START, ACTION_END, PLUGIN, INTERPRETER, BOS, EOS)
# One pass over all names at once: removing one name can never join its neighbours into another.
_CONTROL = re.compile("|".join(re.escape(token) for token in CONTROL_TOKENS))
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

    def sampling_configs(self) -> list[SamplingConfig]:
        """One config per choice: choice i draws with seed + i, so n > 1 gives n different samples and a fixed seed
        reproduces all of them."""
        seed = secrets.randbits(62) if self.seed is None else self.seed
        given = {name: value for name in _SAMPLING_FIELDS if (value := getattr(self, name)) is not None}
        if given.get("top_k") == -1:
            given["top_k"] = 0  # vLLM's spelling of "off"
        # OpenAI's default temperature is 1; the engine's own default is greedy.
        configs = [SamplingConfig(**{"temperature": 1.0, **given, "seed": seed + i}) for i in range(self.n)]
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
    model_config = ConfigDict(extra="ignore")  # `name`, `tool_call_id`: nothing in the template to carry them

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None


class FunctionSpec(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = None  # forcing a call would need constrained decoding
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

    def active_tools(self) -> list[Tool] | None:
        """The tools the model is told about: none when absent or tool_choice is "none"."""
        return None if self.tool_choice == "none" else self.tools


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


def template_messages(messages: list[ChatMessage], tools: list[Tool] | None) -> list[dict[str, Any]]:
    """OpenAI messages and tools as `ChatTemplate` messages, through the converter training data uses
    (`chat_prompts`): a tool result becomes an `environment` turn named `plugin`, an assistant's call a plugin
    `tool_call`, and the tools an extra `system` turn named `plugin` after the leading system turns."""
    try:
        converted = openai_messages([message.model_dump(exclude_none=True) for message in messages])
        return with_tools(converted, [tool.model_dump(exclude_none=True) for tool in tools or []])
    except MessageError as e:
        raise APIError(400, str(e), param=e.field) from None


def strip_control_tokens(text: str) -> str:
    return _CONTROL.sub("", text)


def parse_tool_call(text: str) -> tuple[str, dict[str, Any] | None]:
    """(content, OpenAI tool call or None) of a reply generated with control tokens kept.

    The content is the text before `<|action_start|><|plugin|>` with control tokens removed. A call whose JSON is
    not {"name": str, "parameters": {...}} is no call: the whole text is then content, so nothing the model wrote
    is lost.
    """
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return strip_control_tokens(text), None
    body = text[start + len(TOOL_CALL_START):]
    end = body.find(ACTION_END)
    try:
        call = json.loads(strip_control_tokens(body if end < 0 else body[:end]))
    except json.JSONDecodeError:
        call = None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("parameters"),
                                                                                         dict)):
        return strip_control_tokens(text), None
    function = {"name": call["name"], "arguments": json.dumps(call["parameters"], ensure_ascii=False)}
    return strip_control_tokens(text[:start]), {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                                "function": function}


def streamable_content(text: str) -> str:
    """The content of a tools-enabled reply that can be streamed now: what precedes any `<|action_start|>`, without
    control tokens, and short of a trailing piece that more text could complete into a control token. Each result
    is a prefix of the next one and of `parse_tool_call`'s content, so deltas are plain suffixes."""
    start = text.find(ACTION_START)
    if start >= 0:
        text = text[:start]
    for size in range(min(len(text), max(map(len, CONTROL_TOKENS)) - 1), 0, -1):
        if any(token.startswith(text[-size:]) for token in CONTROL_TOKENS):
            text = text[:-size]
            break
    return strip_control_tokens(text)


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
