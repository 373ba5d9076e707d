"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching engine.

`create_app` serves /v1/completions, /v1/chat/completions, /v1/models, /v1/perplexity (ours: a text's per-token
log-likelihood and perplexity) and /health, and with `playground=True` the browser playground (`serve.playground`).
An HTTP request becomes one engine `Request` per (prompt, choice). Their events arrive on the engine's thread and are
handed to the event loop with `call_soon_threadsafe` (`_Submission`). Whatever ends an HTTP request (its answer, an
error, the client leaving), the engine requests still running are cancelled, so a dropped client never holds KV
pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from internlm2_jax.agents.protocol import stop_ids
from internlm2_jax.decode.requests import EngineFull, Event, Request, RequestRejected
from internlm2_jax.serve.playground import Playground
from internlm2_jax.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Envelope,
    PerplexityRequest,
    ToolDecoding,
    chat_logprobs,
    encode_prompts,
    legacy_logprobs,
    perplexity_entry,
    streamable_content,
    template_messages,
    tool_decoding,
    tool_reply,
    usage,
)
from internlm2_jax.tokenizer import EOS, IM_END

# Names pydantic puts into an error's location for the member of a union it tried; they are not request fields.
_TYPE_TAGS = {"str", "int", "float", "bool"}


class _Submission:
    """The engine requests behind one HTTP request, submitted together; their events meet on one asyncio queue."""

    def __init__(self, engine, requests: Sequence[Request]):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._index: dict[int, int] = {}  # engine request id -> choice index
        self._finished: set[int] = set()
        try:
            for index, request in enumerate(requests):
                self._index[engine.submit(request, self._on_event)] = index
        except BaseException as e:
            self.cancel_unfinished()  # all choices or none
            if isinstance(e, EngineFull):
                raise APIError(429, f"the server is at capacity ({e}); retry later", type="rate_limit_error",
                               code="engine_full") from None
            if isinstance(e, RequestRejected):
                raise APIError(400, str(e), param=e.field) from None
            raise

    def _on_event(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            pass  # the loop has closed (server shutdown) and nobody waits for this request; the engine must go on

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every request has finished. An error event raises APIError(500): a failed
        generation is never answered as an empty completion."""
        # Every id is known before the first event is read: submission runs without yielding to the loop.
        while len(self._finished) < len(self._index):
            event = await self._queue.get()
            if event.request_id in self._finished:
                continue  # e.g. the "abort" event that follows a cancel
            if event.finished or event.error is not None:
                self._finished.add(event.request_id)
            if event.error is not None:
                raise APIError(500, f"generation failed: {event.error}", type="server_error")
            yield self._index[event.request_id], event

    def cancel_unfinished(self) -> None:
        for request_id in self._index:
            if request_id not in self._finished:
                self._finished.add(request_id)
                self._engine.cancel(request_id)


@dataclasses.dataclass
class _Output:
    """One choice's events added up, for a non-streaming answer (same field names as `Event`)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None

    def add(self, event: Event) -> None:
        self.tokens += event.tokens
        self.logprobs += event.logprobs
        self.top_logprobs += event.top_logprobs
        self.text = event.text
        if event.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = event.prompt_logprobs, event.prompt_top_logprobs
        if event.finished:
            self.finish_reason = event.finish_reason


async def _collect(submission: _Submission, count: int, http_request: HTTPRequest) -> list[_Output]:
    """Every choice's output. Starlette cancels a streaming body when the client leaves, but never a plain handler,
    so a watcher on the connection stops the collection (and the generation) itself."""
    outputs = [_Output() for _ in range(count)]

    async def add_all() -> None:
        async for index, event in submission.events():
            outputs[index].add(event)

    async def client_gone() -> None:
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    collecting, watching = asyncio.create_task(add_all()), asyncio.create_task(client_gone())
    try:
        done, _ = await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        collecting.cancel()
        watching.cancel()
        submission.cancel_unfinished()  # one choice failed, the client left, or the handler was cancelled
    if collecting in done:
        collecting.result()  # an engine error event raises APIError(500) here
        return outputs
    watching.result()  # a failing connection raises here
    raise APIError(499, "the client closed the connection", type="client_closed")  # answered to nobody


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"  # the 200 status line is long sent: the error is an event
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events over a submission. The cancel lives here, not in the body generator: a generator that
    never started (the client left at once) or that is left suspended at a `yield` runs no `finally`."""

    def __init__(self, submission: _Submission, chunks: AsyncIterator[dict[str, Any]]):
        super().__init__(_sse(chunks), media_type="text/event-stream")
        self._submission = submission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._submission.cancel_unfinished()


class _Server:
    """The route handlers, over one engine, tokenizer and chat template."""

    def __init__(self, engine, tokenizer, model_name: str, chat_template):
        self.engine, self.tokenizer, self.model_name, self.chat_template = engine, tokenizer, model_name, chat_template
        self.chat_stop_ids = (tokenizer.token_id(EOS), tokenizer.token_id(IM_END))
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def fit(self, prompt_tokens: int, max_tokens: int | None, prompt_field: str) -> int:
        """`max_tokens`, or when None all the room the prompt leaves; a 400 if they exceed `max_model_len`."""
        limit = self.engine.max_model_len
        if max_tokens is None and prompt_tokens >= limit:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens, which leaves no room to generate within this "
                                f"model's maximum context length of {limit}", param=prompt_field)
        if max_tokens is None:
            return limit - prompt_tokens
        if prompt_tokens + max_tokens > limit:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                                f"{prompt_tokens + max_tokens} tokens exceed this model's maximum context length "
                                f"of {limit}", param=prompt_field if prompt_tokens >= limit else "max_tokens")
        return max_tokens

    def envelope(self, prefix: str, kind: str) -> Envelope:
        return Envelope(f"{prefix}-{uuid.uuid4().hex}", kind, self.model_name, int(time.time()))

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", **self.engine.stats()}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "internlm2-jax",
                                            "max_model_len": self.engine.max_model_len}]}

    # ---- /v1/completions --------------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, http_request: HTTPRequest):
        self.check_model(body.model)
        prompts = encode_prompts(body.prompt, self.tokenizer, "prompt")
        max_tokens = body.max_new_tokens()
        for ids, _ in prompts:
            self.fit(len(ids), max_tokens, "prompt")
        configs, stops = body.sampling_configs(), body.stop_strings()
        # With echo the prompt's log-probs come back too; max_tokens=0 is the engine's "prompt log-probs only".
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        if max_tokens == 0 and prompt_logprobs is None:
            prompt_logprobs = 0
        requests = [Request(tuple(ids), max_tokens, config, (self.tokenizer.eos_id,), stops, body.logprobs or 0,
                            prompt_logprobs) for ids, _ in prompts for config in configs]
        submission = _Submission(self.engine, requests)
        envelope = self.envelope("cmpl", "text_completion")
        if body.stream:
            return _EventStream(submission, self._completion_chunks(submission, envelope, body, prompts))
        outputs = await _collect(submission, len(requests), http_request)
        choices = []
        for index, output in enumerate(outputs):
            prompt_ids, prompt_text = prompts[index // body.n]
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(output, prompt_ids if body.echo else None, 0)
            choices.append({"index": index, "text": (prompt_text if body.echo else "") + output.text,
                            "logprobs": logprobs, "finish_reason": output.finish_reason})
        return envelope(choices, usage(sum(len(ids) for ids, _ in prompts), sum(len(o.tokens) for o in outputs)))

    def _completion_logprobs(self, source: Event | _Output, prompt_ids: list[int] | None,
                             text_offset: int) -> dict[str, list]:
        """The legacy logprobs of `source`'s tokens, preceded by the prompt's when `prompt_ids` is given (echo)."""
        ids, logprobs, top_logprobs = source.tokens, source.logprobs, source.top_logprobs
        if prompt_ids is not None:
            ids, logprobs = prompt_ids + ids, source.prompt_logprobs + logprobs
            top_logprobs = source.prompt_top_logprobs + top_logprobs
        return legacy_logprobs(self.tokenizer, ids, logprobs, top_logprobs, text_offset)

    async def _completion_chunks(self, submission: _Submission, envelope: Envelope, body: CompletionRequest,
                                 prompts: list[tuple[list[int], str]]) -> AsyncIterator[dict[str, Any]]:
        count = len(prompts) * body.n
        generated = [0] * count  # characters of the generated text sent so far
        offset = [0] * count  # characters sent so far, echoed prompt included (the logprobs' text_offset)
        echoed = [not body.echo] * count
        completion_tokens = 0
        async for index, event in submission.events():
            prompt_ids, prompt_text = prompts[index // body.n]
            echo_now, echoed[index] = not echoed[index], True
            text = (prompt_text if echo_now else "") + event.text[generated[index]:]
            generated[index] = len(event.text)
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(event, prompt_ids if echo_now else None, offset[index])
            offset[index] += len(text)
            completion_tokens += len(event.tokens)
            if text or event.finished or (logprobs and logprobs["tokens"]):
                yield envelope([{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": event.finish_reason if event.finished else None}])
        if body.include_usage:
            yield envelope([], usage(sum(len(ids) for ids, _ in prompts), completion_tokens))

    # ---- /v1/chat/completions ---------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, http_request: HTTPRequest):
        self.check_model(body.model)
        decoding = tool_decoding(body.tool_choice, body.tools, self.tokenizer)
        try:
            ids, _ = self.chat_template.encode(template_messages(body.messages, body.tools), self.tokenizer,
                                               add_generation_prompt=True)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        ids += decoding.prefill  # a forced call's start: part of the prompt, parsed with the reply
        max_tokens = self.fit(len(ids), body.max_new_tokens(), "messages")
        configs, stops, top_n = body.sampling_configs(decoding.banned_ids), body.stop_strings(), body.top_n()
        # With tools, decoding also stops at <|action_end|>: past it the model would invent the tool's answer.
        stop = self.chat_stop_ids if decoding.use is None else stop_ids(self.tokenizer)
        requests = [Request(tuple(ids), max_tokens, config, stop, stops, top_n) for config in configs]
        submission = _Submission(self.engine, requests)
        if body.stream:
            envelope = self.envelope("chatcmpl", "chat.completion.chunk")
            return _EventStream(submission, self._chat_chunks(submission, envelope, body, len(ids), decoding))
        outputs = await _collect(submission, len(requests), http_request)
        choices = []
        for index, output in enumerate(outputs):
            message: dict[str, Any] = {"role": "assistant", "content": output.text}
            finish_reason = output.finish_reason
            if decoding.use is not None:
                content, call = tool_reply([*decoding.prefill, *output.tokens], output.text, output.finish_reason,
                                           decoding.use, self.tokenizer)
                message["content"] = content.strip() or None
                message.update(call)
                if "tool_calls" in call:
                    finish_reason = "tool_calls"
            logprobs = None
            if body.logprobs:
                logprobs = chat_logprobs(self.tokenizer, output.tokens, output.logprobs, output.top_logprobs)
            choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason})
        envelope = self.envelope("chatcmpl", "chat.completion")
        return envelope(choices, usage(len(ids), sum(len(o.tokens) for o in outputs)))

    async def _chat_chunks(self, submission: _Submission, envelope: Envelope, body: ChatCompletionRequest,
                           prompt_tokens: int, decoding: ToolDecoding) -> AsyncIterator[dict[str, Any]]:
        def chunk(index: int, delta: dict[str, Any], logprobs=None, finish_reason=None) -> dict[str, Any]:
            return envelope([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        sent = [""] * body.n
        generated = [list(decoding.prefill) for _ in range(body.n)]  # a forced call's start, then the reply
        completion_tokens = 0
        async for index, event in submission.events():
            completion_tokens += len(event.tokens)
            generated[index] += event.tokens
            call = {}
            if decoding.use is None:
                content = event.text
            elif event.finished:
                content, call = tool_reply(generated[index], event.text, event.finish_reason, decoding.use,
                                           self.tokenizer)
            else:
                content = streamable_content(generated[index], event.text, self.tokenizer)
            delta, sent[index] = content[len(sent[index]):], content
            logprobs = None
            if body.logprobs and event.tokens:
                logprobs = chat_logprobs(self.tokenizer, event.tokens, event.logprobs, event.top_logprobs)
            if delta or logprobs:
                yield chunk(index, {"content": delta}, logprobs)
            if "tool_calls" in call:  # the call is sent whole, in one chunk (the SDK accumulates)
                call = {"tool_calls": [{"index": 0, **call["tool_calls"][0]}]}
            if call:
                yield chunk(index, call)
            if event.finished:
                yield chunk(index, {}, finish_reason="tool_calls" if "tool_calls" in call else event.finish_reason)
        if body.include_usage:
            yield envelope([], usage(prompt_tokens, completion_tokens))

    # ---- /v1/perplexity ---------------------------------------------------------------------------------------

    async def perplexity(self, body: PerplexityRequest, http_request: HTTPRequest) -> dict[str, Any]:
        self.check_model(body.model)
        inputs = encode_prompts(body.input, self.tokenizer, "input")
        for ids, _ in inputs:
            if len(ids) < 2:
                raise APIError(400, "input: perplexity needs at least 2 tokens (nothing predicts the first)",
                               param="input")
            self.fit(len(ids), 0, "input")
        submission = _Submission(self.engine, [Request(tuple(ids), 0, prompt_logprobs=0) for ids, _ in inputs])
        outputs = await _collect(submission, len(inputs), http_request)
        return {"object": "list", "model": self.model_name,
                "data": [perplexity_entry(index, output.prompt_logprobs) for index, output in enumerate(outputs)],
                "usage": usage(sum(len(ids) for ids, _ in inputs), 0)}


# ---- errors and authentication ----------------------------------------------------------------------------------


def _field_path(location: Sequence[str | int]) -> str | None:
    """`messages[0].content` from pydantic's ("body", "messages", 0, "content", "str"): the path stops at the first
    union-member tag ("str", "list[int]"), which names a type the value failed, not a field."""
    path = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
        else:
            break
    return path or None


async def _api_error(_, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _validation_error(_, error: RequestValidationError) -> JSONResponse:
    # OpenAI answers 400, not FastAPI's 422, and names the field; the first error is the one reported.
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return await _api_error(_, APIError(400, f"the request body is not valid JSON: {first['msg']}"))
    param = _field_path(tuple(first["loc"]))
    return await _api_error(_, APIError(400, f"{param or 'request body'}: {first['msg']}", param=param))


async def _http_error(_, error: StarletteHTTPException) -> JSONResponse:
    return await _api_error(_, APIError(error.status_code, str(error.detail)))


def _require_api_key(api_key: str):
    async def check(authorization: str | None = Header(None)) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    return check


def create_app(engine, tokenizer, *, model_name: str, chat_template, api_key: str | None = None,
               playground: bool = False) -> FastAPI:
    """The server's FastAPI app over `engine` (submit / cancel / max_model_len / stats, see `decode.requests`).

    `tokenizer` is an `internlm2_jax.tokenizer.Tokenizer`, `chat_template` a `ChatTemplate`. With `api_key`, every
    /v1 route wants `Authorization: Bearer <api_key>`; /health never does (load balancers probe it). `playground`
    adds the browser playground (`serve.playground`): its page at `/` and its /playground routes, which run tools
    (sandboxed Python included) for the page, behind the same key.
    """
    server = _Server(engine, tokenizer, model_name, chat_template)
    page = Playground(chat_template, tokenizer, model_name, engine.max_model_len) if playground else None
    app = FastAPI(title=f"internlm2-jax: {model_name}", lifespan=page.lifespan if page else None)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.get("/health")(server.health)
    authenticated = [Depends(_require_api_key(api_key))] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=authenticated)
    v1.get("/models")(server.models)
    v1.post("/completions")(server.completions)
    v1.post("/chat/completions")(server.chat)
    v1.post("/perplexity")(server.perplexity)
    app.include_router(v1)
    if page is not None:
        page.add_routes(app, authenticated)
    return app
