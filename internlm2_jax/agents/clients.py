"""Model clients for the agent loop (agents.md §2.4): one interface over the in-process engine, our server, any
OpenAI-compatible chat server, and a scripted stand-in for tests.

The loop renders each prompt itself (`Prompt`: the template's ids and the messages they came from) and asks a client
for the assistant turn that follows, with the ids that stop it (`protocol.stop_ids`) and the ids it may not generate
(`protocol.action_ids` on the last turn). A client answers with a `Generation`: the generated **token ids** where the
backend can give them, so that `protocol.parse_ids` tells a real call from a user's typed marker text; a text-only
backend (`ChatClient`) gives text with the control tokens written out, parsed by `protocol.parse_text` and flagged
"text_level_parse".

- `EngineClient`: ids in, exact ids back; bans through `SamplingConfig.banned_ids`.
- `CompletionsClient` (our /v1/completions): ids in; control ids exact, text re-encoded; cannot ban, so the loop
  asks for the answer in words (`state.FORCE_ANSWER`).
- `ChatClient` (any OpenAI server): messages and tools in, text back (calls rebuilt from `tool_calls`); the last
  turn is asked with `tool_choice="none"`.
- `ScriptedClient` (tests): the script encoded with control tokens; bans are checked and every request recorded.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from internlm2_jax.agents.protocol import (INTERPRETER_TOOL_NAME, Parsed, ParseError, ToolSpecs, parse_ids,
                                          parse_text)
from internlm2_jax.tokenizer import ACTION_END, ACTION_START, INTERPRETER, PLUGIN

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # the conversation rendered by the chat template, generation prompt included
    messages: tuple[Mapping[str, Any], ...]  # the template messages rendered (system turns included)
    tools: tuple[Mapping[str, Any], ...] = ()  # OpenAI tool definitions (chat servers render them themselves)
    interpreter: bool = False  # the code interpreter is offered


@dataclasses.dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 512  # per turn (InternLM's MATH script: 512)
    temperature: float = 0.0  # greedy, as InternLM's agent evaluations decode
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # set by the loop: protocol.stop_ids
    banned_ids: tuple[int, ...] = ()  # set by the loop on the last turn: protocol.action_ids


@dataclasses.dataclass(frozen=True)
class Generation:
    """An assistant turn, whole or so far (`finish_reason` None while streaming)."""

    ids: tuple[int, ...] | None  # generated ids, a stop id included; None from a text-only backend
    text: str  # the text with control tokens written out (for a text-only backend: all there is)
    finish_reason: str | None = None  # "stop", "length", "tool_calls" (chat servers), "abort"
    parsed: Parsed | None = None  # set by a backend that parsed the turn itself (a chat server's call error)

    def parse(self, tokenizer: Tokenizer, *, tools: ToolSpecs | None, interpreter: bool) -> Parsed:
        if self.parsed is not None:
            return self.parsed
        if self.ids is None:
            return parse_text(self.text, finish_reason=self.finish_reason, tools=tools, interpreter=interpreter)
        return parse_ids(self.ids, tokenizer, finish_reason=self.finish_reason, tools=tools, interpreter=interpreter)


class ClientError(RuntimeError):
    """A backend refused or failed a request (the message carries its answer)."""


class ModelClient:
    """What the loop needs of a backend. Subclasses give `stream`; `generate` and `generate_many` follow from it
    (the engine overrides `generate_many` to batch)."""

    can_ban: bool = False  # honours `Decoding.banned_ids` (else the loop asks for the answer in words)
    max_model_len: int | None = None  # prompt + generation limit, the default context budget (None: unknown)

    def stream(self, prompt: Prompt, decoding: Decoding) -> Iterator[Generation]:
        """Snapshots of the turn as it grows; the last one has `finish_reason`. Closing the iterator early
        cancels the request."""
        raise NotImplementedError

    def generate(self, prompt: Prompt, decoding: Decoding) -> Generation:
        last = None
        for snapshot in self.stream(prompt, decoding):
            last = snapshot
        if last is None or last.finish_reason is None:
            raise ClientError(f"{type(self).__name__}: the reply ended without a finish reason")
        return last

    def generate_many(self, prompts: Sequence[Prompt], decodings: Sequence[Decoding]) -> list[Generation]:
        return [self.generate(prompt, decoding) for prompt, decoding in zip(prompts, decodings, strict=True)]


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """(`ids` up to and including the first stop id, whether one was found)."""
    stops = set(stop_ids)
    end = next((i + 1 for i, token in enumerate(ids) if token in stops), None)
    return (tuple(ids), False) if end is None else (tuple(ids[:end]), True)


# ---- the in-process engine --------------------------------------------------------------------------------------


class EngineClient(ModelClient):
    """The continuous-batching `decode.Engine`, driven on the caller's thread as `Engine.generate` drives it (so not
    an engine `start()`ed for a server: reach that one with `CompletionsClient`). `generate_many` submits all
    prompts at once, which is how `run_agents` batches every active agent's next turn."""

    can_ban = True

    def __init__(self, engine):
        self.engine = engine
        self.max_model_len = engine.max_model_len

    def _request(self, prompt: Prompt, decoding: Decoding):
        from internlm2_jax.decode.requests import Request  # JAX is imported only by those who use the engine
        from internlm2_jax.decode.sampling import SamplingConfig

        sampling = SamplingConfig(temperature=decoding.temperature, top_p=decoding.top_p, seed=decoding.seed,
                                  banned_ids=tuple(decoding.banned_ids))
        return Request(tuple(prompt.ids), decoding.max_new_tokens, sampling, stop_ids=tuple(decoding.stop_ids),
                       skip_special_tokens=False)

    def generate_many(self, prompts: Sequence[Prompt], decodings: Sequence[Decoding]) -> list[Generation]:
        requests = [self._request(p, d) for p, d in zip(prompts, decodings, strict=True)]
        return [Generation(tuple(c.tokens), c.text or "", c.finish_reason) for c in self.engine.generate(requests)]

    def stream(self, prompt: Prompt, decoding: Decoding) -> Iterator[Generation]:
        events = []
        request_id = self.engine.submit(self._request(prompt, decoding), events.append)
        ids: list[int] = []
        finished = False
        try:
            while not finished:
                if not events:
                    self.engine.step()
                    continue
                taken, events[:] = list(events), []
                for event in taken:
                    if event.error is not None:
                        finished = True
                        raise ClientError(f"the engine failed the request: {event.error}")
                    ids += event.tokens
                    finished = event.finished
                yield Generation(tuple(ids), taken[-1].text, taken[-1].finish_reason if finished else None)
        finally:
            if not finished:  # the caller stopped listening: free the request's pages now, not at max_new_tokens
                self.engine.cancel(request_id)
                while not any(event.finished or event.error for event in events):
                    self.engine.step()


# ---- our server: /v1/completions with token-id prompts ----------------------------------------------------------


class _Http:
    def __init__(self, base_url: str, *, api_key: str | None, timeout_s: float):
        self.base_url, self.api_key, self.timeout_s = base_url.rstrip("/"), api_key, timeout_s

    def open(self, path: str, body: Mapping[str, Any] | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise ClientError(f"{path}: HTTP {e.code}: {e.read().decode('utf-8', 'replace')[:2000]}") from None

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        with self.open(path, body) as response:
            return json.load(response)

    def events(self, path: str, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON objects of a server-sent event stream; closing the iterator closes the connection (our server
        then cancels the request)."""
        with self.open(path, body) as response:
            for line in response:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield json.loads(data)


class CompletionsClient(ModelClient):
    """Our server's `/v1/completions` with the prompt as token ids (a text prompt would be encoded with
    `allow_special=False`: its control tokens would be plain text), streamed with `logprobs=0`.

    The endpoint returns text with control tokens skipped, so the ids are rebuilt from the stream: each chunk carries
    one token's string (a control token's is its name, which no plain piece decodes to) and its text delta; text
    runs are re-encoded as plain text. A call is parsed exactly as from the engine's ids; only the ids of the text
    may differ from those generated. The endpoint stops only at EOS, so this client stops at the loop's stop ids by
    closing the stream (the server cancels the request), and it cannot ban ids."""

    def __init__(self, base_url: str, tokenizer: Tokenizer, *, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 600.0):
        self.http = _Http(base_url, api_key=api_key, timeout_s=timeout_s)
        self.tokenizer, self.model = tokenizer, model
        self.controls = tokenizer.special_tokens
        with self.http.open("/models") as response:  # ours reports max_model_len: the default context budget
            models = json.load(response).get("data") or []
        self.max_model_len = models[0].get("max_model_len") if models else None

    def stream(self, prompt: Prompt, decoding: Decoding) -> Iterator[Generation]:
        body = {"prompt": list(prompt.ids), "max_tokens": decoding.max_new_tokens, "temperature": decoding.temperature,
                "top_p": decoding.top_p, "seed": decoding.seed, "logprobs": 0, "stream": True}
        if self.model is not None:
            body["model"] = self.model
        settled: list[int] = []  # ids up to the last control token
        run = ""  # text since then
        events = self.http.events("/completions", body)
        try:
            for chunk in events:
                if not chunk.get("choices"):
                    continue  # a usage chunk
                choice = chunk["choices"][0]
                run += choice.get("text") or ""
                for token in (choice.get("logprobs") or {}).get("tokens") or ():
                    if token in self.controls:  # a chunk holds one token, so its text came before the control
                        settled += [*self.tokenizer.encode(run, allow_special=False), self.controls[token]]
                        run = ""
                ids, stopped = cut_at_stop(settled, decoding.stop_ids)
                reason = "stop" if stopped else choice.get("finish_reason")
                if not stopped:
                    ids += tuple(self.tokenizer.encode(run, allow_special=False))
                yield Generation(ids, self.tokenizer.decode(ids), reason)
                if reason is not None:
                    return
        finally:
            events.close()


# ---- any OpenAI-compatible chat server --------------------------------------------------------------------------


class ChatClient(ModelClient):
    """`/v1/chat/completions` of any OpenAI-compatible server (ours, LMDeploy, vLLM): the conversation as OpenAI
    messages with the tools, the reply's content and `tool_calls` turned back into InternLM2's call text and parsed
    with `parse_text` (so flagged "text_level_parse": a typed marker in the content would read as a call). The
    server renders the prompt, so `Prompt.ids` only estimate its length (the context budget). The code interpreter
    is offered as a function named "python" (`interpreter_tool="function"`, any server) or as our server's
    `{"type": "code_interpreter"}`. The last turn is asked with `tool_choice="none"`."""

    can_ban = True

    def __init__(self, base_url: str, *, model: str, api_key: str | None = None, timeout_s: float = 600.0,
                 interpreter_tool: str = "function", max_model_len: int | None = None):
        if interpreter_tool not in ("function", "code_interpreter"):
            raise ValueError(f"interpreter_tool is {interpreter_tool!r}; expected 'function' or 'code_interpreter'")
        self.http = _Http(base_url, api_key=api_key, timeout_s=timeout_s)
        self.model, self.interpreter_tool, self.max_model_len = model, interpreter_tool, max_model_len

    def stream(self, prompt: Prompt, decoding: Decoding) -> Iterator[Generation]:
        tools = [dict(tool) for tool in prompt.tools]
        if prompt.interpreter:
            tools.append({"type": "code_interpreter"} if self.interpreter_tool == "code_interpreter" else {
                "type": "function", "function": {"name": INTERPRETER_TOOL_NAME, "description": "Run Python code "
                                                 "in a stateful Jupyter-like session.", "parameters": _CODE_SCHEMA}})
        body: dict[str, Any] = {"model": self.model, "messages": to_openai_messages(prompt.messages),
                                "max_tokens": decoding.max_new_tokens, "temperature": decoding.temperature,
                                "top_p": decoding.top_p, "seed": decoding.seed}
        if tools:
            body["tools"] = tools
            if decoding.banned_ids:
                body["tool_choice"] = "none"
        choice = self.http.post("/chat/completions", body)["choices"][0]
        message, reason = choice["message"], choice["finish_reason"]
        error = message.get("tool_call_error")
        if error is not None:  # our server's: a call it could not take, reported as it parsed it
            content = message.get("content") or ""
            parsed = Parsed(content, None, ParseError(error["type"], error["message"], error.get("raw", "")),
                            ("text_level_parse",))
            yield Generation(None, content + error.get("raw", ""), reason, parsed)
            return
        yield Generation(None, _call_text(message, interpreter=prompt.interpreter), reason)


_CODE_SCHEMA = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}


def to_openai_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Template messages as OpenAI chat messages: the system turns that announce tools are left out (the server
    renders `tools` itself), a call becomes `tool_calls` and its result a `tool` message with the call's id. An
    environment turn that answers no call (a parse error's) becomes a user message, which any server accepts."""
    converted: list[dict[str, Any]] = []
    call_id = None
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system" and message.get("name") in ("plugin", "interpreter"):
            continue
        if role == "environment":
            converted.append({"role": "tool", "tool_call_id": call_id, "content": content} if call_id else
                             {"role": "user", "content": content})
            call_id = None
            continue
        turn: dict[str, Any] = {"role": role, "content": content}
        call = message.get("tool_call")
        if call is not None:
            call_id = f"call_{index}"
            name, arguments = ((INTERPRETER_TOOL_NAME, {"code": call["code"]}) if call["type"] == "interpreter"
                               else (call["name"], call["parameters"]))
            turn["tool_calls"] = [{"id": call_id, "type": "function",
                                   "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]
        converted.append(turn)
    return converted


def _call_text(message: Mapping[str, Any], *, interpreter: bool) -> str:
    """A chat reply as InternLM2's assistant text: the content, then the call in its control-token form."""
    content = message.get("content") or ""
    calls = message.get("tool_calls") or []
    if not calls:
        return content
    function = calls[0].get("function") or {}  # one call per turn: the protocol has no parallel calls
    name, arguments = function.get("name", ""), function.get("arguments", "{}")
    try:
        decoded = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        decoded = None
    if interpreter and name == INTERPRETER_TOOL_NAME and isinstance(decoded, dict) and "code" in decoded:
        return f"{content}{ACTION_START}{INTERPRETER}\n```python\n{decoded['code']}\n```{ACTION_END}"
    # Arguments that are not JSON are passed on as written, so the parser reports them as invalid JSON.
    parameters = json.dumps(decoded, ensure_ascii=False) if decoded is not None else arguments
    return f'{content}{ACTION_START}{PLUGIN}\n{{"name": {json.dumps(name)}, "parameters": {parameters}}}{ACTION_END}'


# ---- tests ------------------------------------------------------------------------------------------------------


class ScriptedClient(ModelClient):
    """Replays outputs written as text with control tokens (`"Let me check.<|action_start|><|plugin|>\\n{...}
    <|action_end|>"`), encoded with the real tokenizer (`allow_special=True`), so the loop parses them exactly as
    it parses the engine's ids. `outputs` is a list (taken in order) or a function of the prompt (the same answer
    for the same prompt, whatever the batching). Every prompt and decoding asked for is recorded; an output that
    contains a banned id is refused (a real engine could not have generated it). An item may be `(text,
    finish_reason)`; otherwise the output ends at its first stop id ("stop"), at max_new_tokens ("length"), or at
    its end ("stop"). `delay_s` makes each turn take that long (timing tests)."""

    can_ban = True

    def __init__(self, tokenizer: Tokenizer, outputs: Sequence[str | tuple[str, str]] | Callable[[Prompt], str], *,
                 max_model_len: int | None = None, delay_s: float = 0.0):
        self.tokenizer, self.outputs, self.max_model_len, self.delay_s = tokenizer, outputs, max_model_len, delay_s
        self.prompts: list[Prompt] = []
        self.decodings: list[Decoding] = []

    def _next(self, prompt: Prompt) -> tuple[str, str | None]:
        if callable(self.outputs):
            return self.outputs(prompt), None
        if len(self.prompts) > len(self.outputs):
            raise ClientError(f"the script has {len(self.outputs)} outputs and a turn more was asked for")
        item = self.outputs[len(self.prompts) - 1]
        return (item, None) if isinstance(item, str) else item

    def stream(self, prompt: Prompt, decoding: Decoding) -> Iterator[Generation]:
        self.prompts.append(prompt)
        self.decodings.append(decoding)
        text, reason = self._next(prompt)
        ids = self.tokenizer.encode(text, allow_special=True)
        banned = sorted(set(ids) & set(decoding.banned_ids))
        if banned:
            raise ClientError(f"scripted output {text!r} contains banned ids {banned}")
        ids, stopped = cut_at_stop(ids, decoding.stop_ids)
        if stopped:
            reason = "stop"
        if len(ids) > decoding.max_new_tokens:
            ids, reason = ids[:decoding.max_new_tokens], "length"
        time.sleep(self.delay_s)
        for end in range(1, len(ids) + 1):  # one token at a time, as the engine streams
            done = end == len(ids)
            yield Generation(ids[:end], self.tokenizer.decode(ids[:end]), (reason or "stop") if done else None)
        if not ids:
            yield Generation((), "", reason or "stop")
