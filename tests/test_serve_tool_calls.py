"""Tool calls through the server, read from the generated ids (agents.md §2.8, §4.1 A5, §4.5 E2/E5): decoding stops
at `<|action_end|>`, a typed marker is content, an interpreter call is a `python` tool call, a call that cannot be
taken is reported as `tool_call_error`, and tool results are routed to their environment by `tool_call_id`.
tool_choice (E3/E4/E6): "none" bans the call's start even for a model that calls, "required" and a named tool
pre-fill the call's start as the template tokenizes it, and bad choices or tool definitions are 400s naming the field.
"""

import json

import pytest

from internlm2_jax.agents.protocol import INTERPRETER_PROMPT_EN
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.config import preset
from internlm2_jax.decode.engine import Engine, EngineConfig
from internlm2_jax.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    Tool,
    streamable_content,
    template_messages,
    tool_decoding,
    tool_reply,
    tool_use,
    usage,
)
from test_banned_ids import bigram_model
from test_serve_app import USER, WEATHER, FakeEngine, assert_error, client_for, events

TEMPLATE = get_chat_template("internlm2_chat")
INTERPRETER = {"type": "code_interpreter"}
CALL = 'Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|>'
PYTHON = "Computing.<|action_start|><|interpreter|>\n```python\nprint(123 * 456)\n```<|action_end|>"
# What a model that does not stop at <|action_end|> goes on to write: the tool's answer, invented.
RUN_ON = ('\n<|im_end|>\n<|im_start|>environment name=<|plugin|>\n{"temp": "invented"}<|im_end|>\n'
          "<|im_start|>assistant\nInvented!")


def chat(trained, reply_text, *, stream=False, **body):
    """(engine, response body or stream chunks) of one chat request answered by `reply_text` (control tokens by
    name become control ids, as a model generates them)."""
    engine = FakeEngine(trained, trained.encode(reply_text))
    response = client_for(engine, trained).post("/v1/chat/completions",
                                                json={"messages": USER, "stream": stream, **body})
    return engine, events(response) if stream else response.json()


def test_e2_decoding_stops_at_action_end(trained):
    engine, body = chat(trained, CALL + RUN_ON, tools=[WEATHER])
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and "nvented" not in json.dumps(body)
    assert choice["message"]["content"] == "Let me check."
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert body["usage"]["completion_tokens"] == len(trained.encode(CALL))
    assert trained.token_id("<|action_end|>") in engine.requests[0].stop_ids

    _, chunks = chat(trained, CALL + RUN_ON, stream=True, tools=[WEATHER])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check." and "nvented" not in json.dumps(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_e2_an_echoed_typed_marker_is_content(trained):
    typed = "You typed: " + CALL
    reply = trained.encode(typed, allow_special=False) + [trained.token_id("<|im_end|>")]
    engine = FakeEngine(trained, reply)
    body = client_for(engine, trained).post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]})
    [choice] = body.json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": typed} and choice["finish_reason"] == "stop"


def test_e5_interpreter_calls_are_python_tool_calls(trained):
    engine, body = chat(trained, PYTHON + RUN_ON, tools=[INTERPRETER, WEATHER])
    [choice] = body["choices"]
    [call] = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Computing."
    assert call["function"]["name"] == "python"
    assert json.loads(call["function"]["arguments"]) == {"code": "print(123 * 456)"}
    prompt = trained.decode(engine.requests[0].prompt_ids)
    assert f"<|im_start|>system name=<|interpreter|>\n{INTERPRETER_PROMPT_EN}<|im_end|>\n" in prompt
    assert prompt.index("name=<|interpreter|>") < prompt.index("name=<|plugin|>")

    # Its result goes back to the interpreter's environment.
    history = [*USER, {"role": "assistant", "content": "Computing.", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"], "content": "56088"}]
    engine = FakeEngine(trained, trained.encode("56088.<|im_end|>"))
    client_for(engine, trained).post("/v1/chat/completions", json={"messages": history, "tools": [INTERPRETER]})
    prompt = trained.decode(engine.requests[0].prompt_ids)
    assert ("Computing.<|action_start|><|interpreter|>\n```python\nprint(123 * 456)\n```<|action_end|>\n<|im_end|>\n"
            "<|im_start|>environment name=<|interpreter|>\n56088<|im_end|>\n") in prompt


def test_an_interpreter_call_without_the_interpreter_is_an_error(trained):
    _, body = chat(trained, PYTHON, tools=[WEATHER])
    [choice] = body["choices"]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    assert choice["message"]["tool_call_error"]["type"] == "unknown_tool"


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_that_cannot_be_taken_is_reported_not_passed_off_as_content(trained, stream):
    bad = "Let me check.<|action_start|><|plugin|>\n{'name': 'get_weather'}<|action_end|>"
    _, answer = chat(trained, bad, stream=stream, tools=[WEATHER])
    if stream:
        deltas = [c["choices"][0]["delta"] for c in answer]
        content = "".join(d.get("content") or "" for d in deltas)
        [error] = [d["tool_call_error"] for d in deltas if "tool_call_error" in d]
        finish_reason = answer[-1]["choices"][0]["finish_reason"]
        assert not any("tool_calls" in d for d in deltas)
    else:
        [choice] = answer["choices"]
        content, error, finish_reason = choice["message"]["content"], choice["message"]["tool_call_error"], \
            choice["finish_reason"]
        assert "tool_calls" not in choice["message"]
    assert content == "Let me check." and finish_reason == "stop"
    assert error["type"] == "invalid_json" and "column" in error["message"]
    assert error["raw"] == "\n{'name': 'get_weather'}"


def test_a_stop_string_before_the_call_ends_the_reply(trained):
    # The engine cuts its text at a stop string but reports every generated id (decode.streaming).
    ids = trained.encode(CALL)
    use = tool_use([Tool.model_validate(WEATHER)])
    assert tool_reply(ids, "Let me", "stop", use, trained) == ("Let me", {})
    content, fields = tool_reply(ids, trained.decode(ids, skip_special_tokens=True), "stop", use, trained)
    assert content == "Let me check." and "tool_calls" in fields


def test_streamable_content_grows_by_suffixes_up_to_the_call(trained):
    ids = trained.encode("Hi <|im_start|> typed. " + CALL)  # a control id that is not a call stays out of the text
    final, _ = tool_reply(ids, trained.decode(ids, skip_special_tokens=True), "stop",
                          tool_use([Tool.model_validate(WEATHER)]), trained)
    assert final == "Hi  typed. Let me check."
    previous = ""
    for end in range(len(ids) + 1):
        visible = streamable_content(ids[:end], trained.decode(ids[:end], skip_special_tokens=True), trained)
        assert visible.startswith(previous) and final.startswith(visible)
        previous = visible
    assert previous == final


# ---- A5: OpenAI messages <-> template messages -------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Paris, and 123*456?"},
    {"role": "assistant", "content": "Computing.", "tool_calls": [
        {"id": "call_py", "type": "function", "function": {"name": "python",
                                                          "arguments": '{"code": "print(123 * 456)"}'}}]},
    {"role": "tool", "tool_call_id": "call_py", "content": "56088"},
    {"role": "assistant", "content": "Now the weather.", "tool_calls": [
        {"id": "call_w", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_w", "content": '{"temp": 21}'},
]


def parse_messages(history):
    return [ChatMessage.model_validate(m) for m in history]


def test_a5_openai_messages_round_trip_through_ids(trained):
    tools = [Tool.model_validate(INTERPRETER), Tool.model_validate(WEATHER)]
    converted = template_messages(parse_messages(HISTORY), tools)
    assert [(m["role"], m.get("name")) for m in converted] == [
        ("system", "interpreter"), ("system", "plugin"), ("user", None), ("assistant", None),
        ("environment", "interpreter"), ("assistant", None), ("environment", "plugin")]
    assert converted[3]["tool_call"] == {"type": "interpreter", "code": "print(123 * 456)"}
    use = tool_use(tools)
    for index in (3, 5):  # each assistant turn, rendered to ids and parsed back
        prompt, _ = TEMPLATE.encode(converted[:index], trained, add_generation_prompt=True)
        whole, _ = TEMPLATE.encode(converted[:index + 1], trained)
        generated = whole[len(prompt):]
        content, fields = tool_reply(generated, trained.decode(generated, skip_special_tokens=True), "stop", use,
                                     trained)
        original = HISTORY[index - 2]
        [call], [expected] = fields["tool_calls"], original["tool_calls"]
        assert content == original["content"] and call["function"]["name"] == expected["function"]["name"]
        assert json.loads(call["function"]["arguments"]) == json.loads(expected["function"]["arguments"])


def test_tool_results_without_ids_follow_the_latest_call(trained):
    history = [{**m, "tool_call_id": None} if m["role"] == "tool" else m for m in HISTORY]
    converted = template_messages(parse_messages(history), [Tool.model_validate(INTERPRETER)])
    assert [m.get("name") for m in converted if m["role"] == "environment"] == ["interpreter", "plugin"]
    # Without the interpreter a `python` call is an ordinary function call.
    converted = template_messages(parse_messages(HISTORY), None)
    assert converted[1]["tool_call"]["type"] == "plugin"
    assert [m.get("name") for m in converted if m["role"] == "environment"] == ["plugin", "plugin"]


@pytest.mark.parametrize("history, tools, param", [
    ([*HISTORY[:2], {"role": "tool", "tool_call_id": "call_nope", "content": "1"}], [INTERPRETER],
     "messages[2].tool_call_id"),
    ([USER[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "python", "arguments": '{"src": "1"}'}}]}],
     [INTERPRETER], "messages[1].tool_calls[0].function.arguments"),
    (USER, [INTERPRETER, {"type": "function", "function": {"name": "python"}}], "tools"),
])
def test_bad_tool_histories_name_the_field(history, tools, param):
    with pytest.raises(APIError) as error:
        template_messages(parse_messages(history), [Tool.model_validate(t) for t in tools])
    assert error.value.status == 400 and error.value.param == param


def test_a_code_interpreter_tool_has_no_function(trained):
    response = client_for(FakeEngine(trained), trained).post("/v1/chat/completions", json={
        "messages": USER, "tools": [{"type": "code_interpreter", "function": WEATHER["function"]}]})
    assert_error(response, 400, "tools[0]")


# ---- tool_choice (agents.md §2.8, §4.5 E3/E4/E6) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def caller(trained):
    """A server over a real engine whose (bigram) model was made to call: after any token it prefers
    `<|action_start|>`, then `<|plugin|>`, then `<|action_end|>`; its next best reply is one word and `<|im_end|>`."""
    word = trained.encode("Sure", allow_special=False)[0]
    action_start, plugin, action_end, im_end = (trained.token_id(name) for name in (
        "<|action_start|>", "<|plugin|>", "<|action_end|>", "<|im_end|>"))
    model = bigram_model(preset("tiny", vocab_size=trained.vocab_size, max_position_embeddings=512),
                         {action_start: {plugin: 10}, plugin: {action_end: 10}, word: {im_end: 10}},
                         {action_start: 10, word: 9})
    engine = Engine(model, trained, EngineConfig(max_model_len=256, kv_budget_tokens=1024, page_size=16,
                                                 max_running=2, max_prefill_rows=1, prefill_chunk=256))
    engine.start()
    yield client_for(engine, trained), trained.decode([word])
    engine.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_e3_tool_choice_none_means_no_call_even_from_a_model_that_calls(caller, stream):
    client, word = caller
    request = {"messages": USER, "tools": [WEATHER], "temperature": 0, "max_tokens": 8}
    # Left to itself the model starts a call (an empty one, reported as an error).
    [tried] = client.post("/v1/chat/completions", json=request).json()["choices"]
    assert tried["message"]["tool_call_error"]["type"] == "not_a_call"
    response = client.post("/v1/chat/completions", json={**request, "tool_choice": "none", "stream": stream})
    if stream:
        chunks = events(response)
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        finish_reason = chunks[-1]["choices"][0]["finish_reason"]
        assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
    else:
        [choice] = response.json()["choices"]
        content, finish_reason = choice["message"]["content"], choice["finish_reason"]
        assert set(choice["message"]) == {"role", "content"}
    assert content == word and finish_reason == "stop"


def forced_call(trained, tools, choice, call):
    """(pre-fill, answer, streamed call) of a request whose tool_choice pre-fills the call's start, from a scripted
    engine that writes the rest of the template's rendering of `call` (the pre-fill must be a token prefix of it:
    a model learnt calls from that rendering)."""
    body = {"messages": USER, "tools": tools, "tool_choice": choice}
    request = ChatCompletionRequest.model_validate(body)
    head = tool_decoding(request.tool_choice, request.tools, trained).prefill
    messages = template_messages(request.messages, request.tools)
    prompt, _ = TEMPLATE.encode(messages, trained, add_generation_prompt=True)
    whole, _ = TEMPLATE.encode([*messages, {"role": "assistant", "content": "", "tool_call": call}], trained)
    assert tuple(whole[len(prompt):len(prompt) + len(head)]) == head, "the pre-fill is not how the template tokenizes"
    engine = FakeEngine(trained, whole[len(prompt) + len(head):])
    client = client_for(engine, trained)
    answer = client.post("/v1/chat/completions", json=body).json()
    assert engine.requests[0].prompt_ids == (*prompt, *head)
    # The pre-fill is prompt, not completion: the model did not write it. (Decoding stopped at <|action_end|>.)
    written = whole.index(trained.token_id("<|action_end|>"), len(prompt)) + 1 - len(prompt) - len(head)
    assert answer["usage"] == usage(len(prompt) + len(head), written)
    chunks = events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    [streamed] = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    return head, answer, streamed


PARIS = {"type": "plugin", "name": "get_weather", "parameters": {"city": "Paris"}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}}}}}


@pytest.mark.parametrize("tools, choice, call, head", [
    # E4: a named tool: the call's start up to "parameters": is pre-filled, the model writes the arguments.
    ([SEARCH, WEATHER], {"type": "function", "function": {"name": "get_weather"}}, PARIS,
     '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters":'),
    # required: with functions only a plugin call is opened; with the interpreter only, an interpreter call;
    # with both, just <|action_start|> (the model picks the kind).
    ([SEARCH, WEATHER], "required", PARIS, "<|action_start|><|plugin|>\n"),
    ([INTERPRETER], "required", {"type": "interpreter", "code": "print(2)"}, "<|action_start|><|interpreter|>\n"),
    ([INTERPRETER, WEATHER], "required", PARIS, "<|action_start|>"),
    ([INTERPRETER, WEATHER], {"type": "function", "function": {"name": "python"}},
     {"type": "interpreter", "code": "print(2)"}, "<|action_start|><|interpreter|>\n"),
])
def test_e4_required_and_named_tool_choice_force_a_parsed_call(trained, tools, choice, call, head):
    prefill, answer, streamed = forced_call(trained, tools, choice, call)
    assert trained.decode(prefill) == head
    [reply] = answer["choices"]
    [tool_call] = reply["message"]["tool_calls"]
    expected = ("get_weather", {"city": "Paris"}) if call["type"] == "plugin" else ("python", {"code": "print(2)"})
    for function in (tool_call["function"], streamed["function"]):
        assert (function["name"], json.loads(function["arguments"])) == expected
    assert reply["finish_reason"] == "tool_calls" and reply["message"]["content"] is None


def test_the_named_pre_fill_is_how_the_released_tokenizer_tokenizes_a_call():
    """The pre-fill stops before the space after "parameters": (a tokenizer piece starts at a space)."""
    from tokenizer_testing import released_tokenizer

    tokenizer = released_tokenizer()
    request = ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    prefill = tool_decoding(request.tool_choice, request.tools, tokenizer).prefill
    ids, _ = TEMPLATE.encode([{"role": "assistant", "content": "", "tool_call": PARIS}], tokenizer)
    start = ids.index(tokenizer.token_id("<|action_start|>"))
    assert tuple(ids[start:start + len(prefill)]) == prefill


@pytest.mark.parametrize("body, param, fragment", [
    ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "needs `tools`"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name", "get_weather"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "python"}}},
     "tool_choice.function.name", "'python'"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", None),
    # E6: bad tool definitions
    ({"tools": [{"type": "function", "function": {"name": "weather.get"}}]}, "tools[0].function.name", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name", "pattern"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "get_weather"}}]}, "tools[1].function.name",
     "unique"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", '"object"'),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}]},
     "tools[0].function.parameters", "properties"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}]},
     "tools[0].function.parameters", "required"),
])
def test_bad_tool_choices_and_tool_definitions_are_400_naming_the_field(trained, body, param, fragment):
    engine = FakeEngine(trained, [5])
    response = client_for(engine, trained).post("/v1/chat/completions", json={"messages": USER, **body})
    assert_error(response, 400, param, *([fragment] if fragment else []))
    assert engine.requests == []
