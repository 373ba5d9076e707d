"""The HTTP server end to end over a scripted engine: every route, streaming, tool calls, the lm-eval log-prob shape,
the error statuses, and that a client leaving (or a failed sibling choice) cancels its engine requests."""

import asyncio
import itertools
import json
import math
import threading

import openai
import pytest
from fastapi.testclient import TestClient

from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.decode.requests import EngineFull, Event, RequestRejected
from internlm2_jax.serve.app import create_app

TEMPLATE = get_chat_template("internlm2_chat")
MAX_MODEL_LEN = 512
ALT = 8  # the runner-up token in every scripted top-n: never one of the scripted replies' tokens
CALL = ('Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        '<|action_end|>\n')
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def token_logprob(step):
    return -(step + 1) / 4


def prompt_logprobs(ids):
    return [None] + [-index / 10 for index in range(1, len(ids))]


class FakeEngine:
    """The engine's contract with scripted output: each request is answered on its own thread, one event per token of
    `reply` (or of `reply` repeated until cancelled, with `forever`), each token the most likely with log-prob
    `token_logprob(step)`; prompt log-probs from `prompt_logprobs`. `error` answers the requests in `error_ids`
    (default all) with an error event; `full` / `reject` make `submit` raise."""

    max_model_len = MAX_MODEL_LEN

    def __init__(self, tokenizer, reply=(), *, forever=False, error=None, error_ids=None, full=False, reject=None):
        self.tokenizer, self.reply, self.forever = tokenizer, list(reply), forever
        self.error, self.error_ids, self.full, self.reject = error, error_ids, full, reject
        self.requests, self.cancelled = [], []
        self._stops = {}
        self._lock = threading.Lock()

    def submit(self, request, on_event):
        if self.full:
            raise EngineFull("8 requests waiting")
        if self.reject:
            raise self.reject
        with self._lock:
            request_id = len(self.requests)
            self.requests.append(request)
            self._stops[request_id] = threading.Event()
        threading.Thread(target=self._answer, args=(request_id, request, on_event), daemon=True).start()
        return request_id

    def cancel(self, request_id):
        self.cancelled.append(request_id)
        self._stops[request_id].set()

    def stats(self):
        return {"requests": len(self.requests), "cancelled": len(self.cancelled)}

    def _answer(self, request_id, request, on_event):
        first = {}
        if request.prompt_logprobs is not None:
            ids, logprobs = request.prompt_ids, prompt_logprobs(request.prompt_ids)
            tops = [None] + [dict(list({ids[i]: logprobs[i], ALT: logprobs[i] - 1}.items())[:request.prompt_logprobs])
                             for i in range(1, len(ids))]
            first = {"prompt_logprobs": logprobs, "prompt_top_logprobs": tops}
        if self.error is not None and (self.error_ids is None or request_id in self.error_ids):
            on_event(Event(request_id, [], [], [], "", finished=True, error=self.error))
            return
        if request.max_new_tokens == 0:
            on_event(Event(request_id, [], [], [], "", finished=True, finish_reason="length", **first))
            return
        generated, text = [], ""
        script = itertools.cycle(self.reply) if self.forever else self.reply
        for step, token in enumerate(script):
            if self._stops[request_id].wait(0.002 if self.forever else 0):
                on_event(Event(request_id, [], [], [], text, finished=True, finish_reason="abort"))
                return
            generated.append(token)
            stopped = token in request.stop_ids
            length = len(generated) == request.max_new_tokens
            finished = stopped or length or (not self.forever and step == len(self.reply) - 1)
            text = self.tokenizer.decode([t for t in generated if t not in request.stop_ids],
                                         skip_special_tokens=request.skip_special_tokens)
            logprob = token_logprob(step)
            top = dict(list({token: logprob, ALT: logprob - 1}.items())[:request.top_n])
            reason = ("length" if length and not stopped else "stop") if finished else None
            on_event(Event(request_id, [token], [logprob], [top], text, finished, reason,
                           **(first if step == 0 else {})))
            if finished:
                return


def client_for(engine, tokenizer, **options):
    return TestClient(create_app(engine, tokenizer, model_name="tiny", chat_template=TEMPLATE, **options))


def events(response):
    """The JSON objects of a server-sent-events body, which must end with [DONE]."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    return [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]


def assert_error(response, status, param=None, *fragments):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"]
    return error


@pytest.fixture(scope="module")
def hello(trained):
    return trained.encode("Hello world", allow_special=False) + [trained.eos_id]


@pytest.fixture(scope="module")
def chatter(trained):
    """No stop id: with `forever`, a reply that goes on until it is cancelled."""
    return trained.encode("Hello world", allow_special=False)


def test_health_and_models(trained):
    client = client_for(FakeEngine(trained), trained, api_key="sk-test")
    assert client.get("/health").json() == {"status": "ok", "requests": 0, "cancelled": 0}
    [model] = client.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).json()["data"]
    assert model["id"] == "tiny" and model["object"] == "model" and model["owned_by"] == "internlm2-jax"
    assert model["max_model_len"] == MAX_MODEL_LEN


def test_completion_of_a_string_prompt(trained, hello):
    engine = FakeEngine(trained, hello)
    body = client_for(engine, trained).post("/v1/completions", json={
        "model": "tiny", "prompt": "Say hi", "max_tokens": 8, "seed": 3, "stop": "\n", "user": "u1"}).json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "text": "Hello world", "logprobs": None, "finish_reason": "stop"}]
    prompt = trained.encode("Say hi", add_bos=True, allow_special=False)
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(hello),
                             "total_tokens": len(prompt) + len(hello)}
    [request] = engine.requests
    assert request.prompt_ids == tuple(prompt) and request.max_new_tokens == 8
    assert request.stop_ids == (trained.eos_id,) and request.stop_strings == ("\n",)
    assert (request.sampling.temperature, request.sampling.seed) == (1.0, 3)
    assert (request.top_n, request.prompt_logprobs, request.skip_special_tokens) == (0, None, True)


def test_token_and_list_prompts_with_n(trained, hello):
    engine = FakeEngine(trained, hello)
    client = client_for(engine, trained)
    body = client.post("/v1/completions", json={"prompt": [[5, 6, 7], [10, 11]], "n": 2, "max_tokens": 2,
                                                "seed": 10, "temperature": 0}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert {c["text"] for c in body["choices"]} == {trained.decode(hello[:2])}
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    assert [r.prompt_ids for r in engine.requests] == [(5, 6, 7), (5, 6, 7), (10, 11), (10, 11)]
    assert [r.sampling.seed for r in engine.requests] == [10, 11, 10, 11]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    body = client.post("/v1/completions", json={"prompt": ["a", "b"], "echo": True}).json()
    assert [c["text"] for c in body["choices"]] == ["aHello world", "bHello world"]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_in_the_shape_lm_eval_reads(trained, hello, max_tokens):
    engine = FakeEngine(trained, hello)
    prompt = trained.encode("The quick brown fox", add_bos=True)
    ctxlen = 3
    body = client_for(engine, trained).post("/v1/completions", json={
        "model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
        "temperature": 0}).json()
    [choice] = body["choices"]
    assert choice["text"] == trained.decode(prompt) + trained.decode(hello[:max_tokens], skip_special_tokens=True)
    assert choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [trained.decode([t]) for t in prompt + hello[:max_tokens]]
    assert logprobs["token_logprobs"] == prompt_logprobs(prompt) + [token_logprob(0)] * max_tokens
    assert logprobs["top_logprobs"][0] is None and len(logprobs["top_logprobs"]) == len(prompt) + max_tokens
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    [request] = engine.requests
    assert (request.prompt_logprobs, request.top_n, request.max_new_tokens) == (1, 1, max_tokens)
    if max_tokens == 1:  # lm-eval: the continuation is token_logprobs[ctxlen:-1], greedy if each is its top's max
        continuation = logprobs["token_logprobs"][ctxlen:-1]
        assert continuation == prompt_logprobs(prompt)[ctxlen:]
        tops = logprobs["top_logprobs"][ctxlen:-1]
        assert all(lp == max(top.values()) for lp, top in zip(continuation, tops, strict=True))


def test_completion_stream(trained, hello):
    engine = FakeEngine(trained, hello)
    client = client_for(engine, trained)
    chunks = events(client.post("/v1/completions", json={
        "prompt": "Say hi", "stream": True, "logprobs": 0, "stream_options": {"include_usage": True}}))
    *choices, last = chunks
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in choices) == "Hello world"
    assert [c["choices"][0]["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["stop"]
    assert sum((c["choices"][0]["logprobs"]["token_logprobs"] for c in choices), []) == [
        token_logprob(step) for step in range(len(hello))]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(hello)
    chunks = events(client.post("/v1/completions", json={"prompt": "Say hi", "stream": True, "echo": True}))
    assert chunks[0]["choices"][0]["text"].startswith("Say hi")
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Say hiHello world"


def test_chat_completion(trained):
    reply = trained.encode("Hi there", allow_special=False) + [trained.token_id("<|im_end|>")]
    engine = FakeEngine(trained, reply)
    body = client_for(engine, trained).post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, *USER], "logprobs": True,
        "top_logprobs": 2}).json()
    [choice] = body["choices"]
    assert body["object"] == "chat.completion"
    assert choice["message"] == {"role": "assistant", "content": "Hi there"} and choice["finish_reason"] == "stop"
    prompt, _ = TEMPLATE.encode([{"role": "system", "content": "Be brief."}, *USER], trained,
                                add_generation_prompt=True)
    [request] = engine.requests
    assert request.prompt_ids == tuple(prompt) and request.max_new_tokens == MAX_MODEL_LEN - len(prompt)
    assert request.stop_ids == (trained.eos_id, trained.token_id("<|im_end|>"))
    assert (request.top_n, request.skip_special_tokens) == (2, True)
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [trained.decode([t]) for t in reply]
    assert [len(c["top_logprobs"]) for c in content] == [2] * len(reply)
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(reply),
                             "total_tokens": len(prompt) + len(reply)}


def test_chat_stream(trained):
    reply = trained.encode("Hi there", allow_special=False) + [trained.token_id("<|im_end|>")]
    chunks = events(client_for(FakeEngine(trained, reply), trained).post("/v1/chat/completions", json={
        "messages": USER, "stream": True, "stream_options": {"include_usage": True}}))
    *choices, last = chunks
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert choices[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in choices) == "Hi there"
    assert choices[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(reply)


def test_tool_call_end_to_end(trained):
    reply = trained.encode(CALL) + [trained.token_id("<|im_end|>")]
    engine = FakeEngine(trained, reply)
    client = client_for(engine, trained)
    body = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]}).json()
    [choice] = body["choices"]
    [call] = choice["message"]["tool_calls"]
    assert choice["message"]["content"] == "Let me check." and choice["finish_reason"] == "tool_calls"
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    request = engine.requests[0]
    assert request.stop_ids == (trained.eos_id, trained.token_id("<|im_end|>"), trained.token_id("<|action_end|>"))
    assert "<|im_start|>system name=<|plugin|>\n" in trained.decode(request.prompt_ids)

    chunks = events(client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER],
                                                               "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    [tool_calls] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert tool_calls[0]["index"] == 0 and tool_calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    # tool_choice="none" keeps the tools in the prompt and bans the call's start (test_serve_tool_calls.py, E3).
    body = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER], "tool_choice": "none"})
    assert engine.requests[-1].stop_ids == (trained.eos_id, trained.token_id("<|im_end|>"))
    assert engine.requests[-1].sampling.banned_ids == (trained.token_id("<|action_start|>"),)


def test_the_openai_sdk_reads_our_answers(trained, hello):
    reply = trained.encode(CALL) + [trained.token_id("<|im_end|>")]
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-test", max_retries=0,
                        http_client=client_for(FakeEngine(trained, reply), trained, api_key="sk-test"))
    completion = sdk.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER])
    assert completion.choices[0].message.tool_calls[0].function.name == "get_weather"
    stream = sdk.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], stream=True)
    assert [c.choices[0].finish_reason for c in stream][-1] == "tool_calls"
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="none", max_retries=0,
                        http_client=client_for(FakeEngine(trained, hello), trained))
    completion = sdk.completions.create(model="tiny", prompt="Say hi", logprobs=1)
    assert completion.choices[0].text == "Hello world"
    assert completion.choices[0].logprobs.token_logprobs[0] == token_logprob(0)
    assert sdk.models.list().data[0].id == "tiny"


def test_perplexity(trained):
    engine = FakeEngine(trained)
    client = client_for(engine, trained)
    ids = trained.encode("The quick brown fox", add_bos=True)
    body = client.post("/v1/perplexity", json={"model": "tiny", "input": [ids, [5, 6]]}).json()
    first, second = body["data"]
    assert client.post("/v1/perplexity", json={"input": "The quick brown fox"}).json()["data"] == [first]
    nll = -sum(prompt_logprobs(ids)[1:]) / (len(ids) - 1)
    assert first["tokens"] == len(ids) and first["token_logprobs"] == prompt_logprobs(ids)
    assert first["nll"] == pytest.approx(nll) and first["perplexity"] == pytest.approx(math.exp(nll))
    assert second["index"] == 1 and second["nll"] == pytest.approx(0.1)
    assert body["usage"] == {"prompt_tokens": len(ids) + 2, "completion_tokens": 0, "total_tokens": len(ids) + 2}
    assert {(r.max_new_tokens, r.prompt_logprobs) for r in engine.requests} == {(0, 0)}
    assert_error(client.post("/v1/perplexity", json={"input": [7]}), 400, "input", "at least 2 tokens")


@pytest.mark.parametrize("path, body, param, fragment", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ("/v1/completions", {"prompt": 5}, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "20"),
    ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1] * 10, "max_tokens": 510}, "max_tokens", "512"),
    ("/v1/completions", {"prompt": [1] * 513, "max_tokens": 0}, "prompt", "513"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 600}]}, "messages", "512"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 600}], "max_tokens": 5}, "messages",
     "max_tokens is 5"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "tool_choice", "needs `tools`"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 0}, "top_p", "top_p"),
])
def test_bad_requests_are_400_naming_the_field(trained, path, body, param, fragment):
    engine = FakeEngine(trained, [5])
    error = assert_error(client_for(engine, trained).post(path, json=body), 400, param, fragment)
    assert error["type"] == "invalid_request_error" and engine.requests == []


def test_length_message_gives_both_numbers(trained):
    response = client_for(FakeEngine(trained), trained).post("/v1/completions",
                                                              json={"prompt": [1] * 10, "max_tokens": 510})
    assert_error(response, 400, "max_tokens", "10 tokens", "max_tokens is 510", "520 tokens", "of 512")


def test_malformed_json_is_400(trained):
    response = client_for(FakeEngine(trained), trained).post(
        "/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(response, 400, None, "not valid JSON")


def test_api_key(trained, hello):
    client = client_for(FakeEngine(trained, hello), trained, api_key="sk-test")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
        assert_error(client.post("/v1/completions", json={"prompt": "x"}, headers=headers), 401)
        assert client.get("/v1/models", headers=headers).status_code == 401
    assert client.post("/v1/completions", json={"prompt": "x"},
                       headers={"Authorization": "Bearer sk-test"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_unknown_model_is_404(trained):
    error = assert_error(client_for(FakeEngine(trained), trained).post(
        "/v1/chat/completions", json={"model": "gpt-4", "messages": USER}), 404, "model", "gpt-4")
    assert error["code"] == "model_not_found"


def test_a_full_or_refusing_engine(trained):
    engine = FakeEngine(trained, full=True)
    assert_error(client_for(engine, trained).post("/v1/completions", json={"prompt": "x"}), 429)
    assert engine.requests == []
    engine = FakeEngine(trained, reject=RequestRejected("top_n", "at most 5"))
    assert_error(client_for(engine, trained).post("/v1/completions", json={"prompt": "x"}), 400, "top_n", "5")


def test_an_engine_error_is_a_500_never_an_empty_completion(trained):
    client = client_for(FakeEngine(trained, error="device lost"), trained)
    error = assert_error(client.post("/v1/completions", json={"prompt": "x"}), 500, None, "device lost")
    assert error["type"] == "server_error"
    assert_error(client.post("/v1/chat/completions", json={"messages": USER}), 500, None, "device lost")
    chunks = events(client.post("/v1/chat/completions", json={"messages": USER, "stream": True}))
    assert "device lost" in chunks[-1]["error"]["message"]
    assert not any(c.get("choices") and c["choices"][0]["delta"].get("content") for c in chunks)


def test_a_failed_choice_cancels_its_siblings(trained, chatter):
    engine = FakeEngine(trained, chatter, forever=True, error="out of pages", error_ids={1})
    response = client_for(engine, trained).post("/v1/completions", json={"prompt": "x", "n": 3, "max_tokens": 40})
    assert_error(response, 500, None, "out of pages")
    assert sorted(engine.cancelled) == [0, 2]


def _scope(path):
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("test", 1),
            "server": ("testserver", 80)}


def _client(body, gone):
    """An ASGI `receive` (uvicorn's, as the app sees it): the request body, then a disconnect once `gone` is set."""
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


def test_leaving_a_stream_early_cancels_its_requests(trained, chatter):
    engine = FakeEngine(trained, chatter, forever=True)
    app = create_app(engine, trained, model_name="tiny", chat_template=TEMPLATE)
    bodies = []

    async def main():
        gone = asyncio.Event()

        async def send(message):
            bodies.append(message.get("body"))
            if sum(map(bool, bodies)) == 3:  # the two role chunks and a first content chunk
                gone.set()

        body = {"messages": USER, "stream": True, "n": 2}
        await asyncio.wait_for(app(_scope("/v1/chat/completions"), _client(body, gone), send), timeout=10)

    asyncio.run(main())
    assert b'"content": "' in bodies[-1]
    assert sorted(engine.cancelled) == [0, 1]


def test_a_cancelled_handler_cancels_its_requests(trained, chatter):
    engine = FakeEngine(trained, chatter, forever=True)
    app = create_app(engine, trained, model_name="tiny", chat_template=TEMPLATE)

    async def main():
        async def send(message):
            raise AssertionError(f"nothing is answered before the cancel: {message}")

        body = {"prompt": "x", "max_tokens": 40}
        task = asyncio.create_task(app(_scope("/v1/completions"), _client(body, asyncio.Event()), send))
        while not engine.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), timeout=10))
    assert engine.cancelled == [0]


def test_leaving_before_a_plain_answer_cancels_its_requests(trained, chatter):
    engine = FakeEngine(trained, chatter, forever=True)
    app = create_app(engine, trained, model_name="tiny", chat_template=TEMPLATE)
    sent = []

    async def main():
        gone = asyncio.Event()

        async def send(message):
            sent.append(message)

        serving = asyncio.create_task(app(_scope("/v1/chat/completions"), _client({"messages": USER, "n": 2}, gone),
                                          send))
        while len(engine.requests) < 2:
            await asyncio.sleep(0.01)
        gone.set()
        await asyncio.wait_for(serving, timeout=10)

    asyncio.run(main())
    assert sorted(engine.cancelled) == [0, 1] and sent[0]["status"] == 499
