"""The OpenAI wire format without HTTP: tools and tool calls through the real InternLM2 template, sampling and prompt
validation, and the log-prob objects. (Tool calls read back from generated ids: test_serve_tool_calls.py.)"""

import json
import math

import pytest
from pydantic import ValidationError

from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Tool,
    chat_logprobs,
    encode_prompts,
    legacy_logprobs,
    perplexity_entry,
    template_messages,
    tool_reply,
    tool_use,
)

TEMPLATE = get_chat_template("internlm2_chat")
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def messages(*dicts):
    return [ChatMessage.model_validate(d) for d in dicts]


def tools():
    return [Tool.model_validate({"type": "function", "function": WEATHER})]


def test_tools_render_as_a_plugin_system_turn_after_the_leading_system_turns(trained):
    converted = template_messages(messages({"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Weather in Paris?"}), tools())
    schemas = json.dumps([WEATHER], ensure_ascii=False)
    assert converted[1] == {"role": "system", "name": "plugin", "content": schemas}
    text = TEMPLATE.render_text(converted, add_generation_prompt=True)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n"
                    f"<|im_start|>system name=<|plugin|>\n{schemas}<|im_end|>\n"
                    "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    ids, _ = TEMPLATE.encode(converted, trained, add_generation_prompt=True)
    header = trained.encode("<|im_start|>system name=<|plugin|>\n")
    assert trained.token_id("<|plugin|>") in header
    assert any(ids[i:i + len(header)] == header for i in range(len(ids)))
    assert trained.decode(ids) == text


def test_tools_come_first_without_a_system_turn():
    converted = template_messages(messages({"role": "user", "content": "hi"}), tools())
    assert [(m["role"], m.get("name")) for m in converted] == [("system", "plugin"), ("user", None)]
    assert template_messages(messages({"role": "user", "content": "hi"}), None) == [{"role": "user",
                                                                                       "content": "hi"}]


def test_tool_call_and_result_round_trip_through_the_internlm2_format(trained):
    history = messages(
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'})
    converted = template_messages(history, None)
    assert converted[1] == {"role": "assistant", "content": "", "tool_call": {
        "type": "plugin", "name": "get_weather", "parameters": {"city": "Paris"}}}
    assert converted[2] == {"role": "environment", "name": "plugin", "content": '{"temp": 21}'}
    text = TEMPLATE.render_text(converted, add_generation_prompt=True)
    turn = ('<|im_start|>assistant\n<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": '
            '"Paris"}}<|action_end|>\n<|im_end|>\n<|im_start|>environment name=<|plugin|>\n{"temp": 21}<|im_end|>\n')
    assert turn in text
    ids, _ = TEMPLATE.encode(converted, trained, add_generation_prompt=True)
    # What the template writes for a call is what the parser reads back from the ids.
    prompt, _ = TEMPLATE.encode(converted[:1], trained, add_generation_prompt=True)
    call_ids, _ = TEMPLATE.encode(converted[:2], trained)
    generated = call_ids[len(prompt):]
    content, fields = tool_reply(generated, trained.decode(generated, skip_special_tokens=True), "stop",
                                 tool_use(tools()), trained)
    [call] = fields["tool_calls"]
    assert content == "" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert trained.decode(ids) == text


def test_message_forms():
    converted = template_messages(messages(
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}), None)
    assert converted == [{"role": "system", "content": "rules"}, {"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize("calls, param", [
    ([{"function": {"name": "f", "arguments": "{}"}}] * 2, "messages[0].tool_calls"),
    ([{"function": {"name": "f", "arguments": "{oops"}}], "messages[0].tool_calls[0].function.arguments"),
    ([{"function": {"name": "f", "arguments": "[1]"}}], "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_assistant_tool_calls_name_the_field(calls, param):
    with pytest.raises(APIError) as error:
        template_messages(messages({"role": "assistant", "content": "", "tool_calls": calls}), None)
    assert error.value.status == 400 and error.value.param == param and param in error.value.message


def test_sampling_configs():
    request = CompletionRequest(prompt="x", n=3, seed=7, top_k=-1, top_p=0.9)
    configs = request.sampling_configs()
    assert [c.seed for c in configs] == [7, 8, 9]
    assert {(c.temperature, c.top_k, c.top_p) for c in configs} == {(1.0, 0, 0.9)}
    assert CompletionRequest(prompt="x", temperature=0).sampling_configs()[0].temperature == 0


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("min_p", 2.0), ("top_k", -2),
                                          ("presence_penalty", 3.0), ("repetition_penalty", 0.0), ("seed", -1)])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(APIError) as error:
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **{field: value}).sampling_configs()
    assert error.value.status == 400 and error.value.param == field and error.value.message.startswith(field)


def test_request_field_checks():
    assert CompletionRequest(prompt="x", stop="\n").stop_strings() == ("\n",)
    with pytest.raises(APIError, match="stop"):
        CompletionRequest(prompt="x", stop=["a", ""]).stop_strings()
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert ChatCompletionRequest(**chat, logprobs=True, top_logprobs=3).top_n() == 3
    with pytest.raises(APIError) as error:
        ChatCompletionRequest(**chat, top_logprobs=3).top_n()
    assert error.value.param == "top_logprobs"
    assert ChatCompletionRequest(**chat, max_tokens=5, max_completion_tokens=9).max_new_tokens() == 9
    for bad, field in [({"tool_choice": "always"}, "tool_choice"), ({"n": 0}, "n"), ({"messages": []}, "messages"),
                       ({"messages": [{"role": "robot", "content": "x"}]}, "messages")]:
        with pytest.raises(ValidationError) as error:
            ChatCompletionRequest(**{**chat, **bad})
        assert error.value.errors()[0]["loc"][0] == field
    with pytest.raises(ValidationError) as error:
        CompletionRequest(prompt="x", logprobs=21)
    assert error.value.errors()[0]["loc"] == ("logprobs",)


def test_encode_prompts(trained):
    [(ids, text)] = encode_prompts("Hello <|im_start|>", trained, "prompt")
    assert text == "Hello <|im_start|>"
    assert ids == trained.encode("Hello <|im_start|>", add_bos=True, allow_special=False)
    assert trained.token_id("<|im_start|>") not in ids
    assert [ids for ids, _ in encode_prompts([5, 6], trained, "prompt")] == [[5, 6]]
    assert [ids for ids, _ in encode_prompts([[5], [6, 7]], trained, "prompt")] == [[5], [6, 7]]
    assert [text for _, text in encode_prompts(["a", "b"], trained, "prompt")] == ["a", "b"]
    for empty in ("", [], [[]], ["a", ""]):
        with pytest.raises(APIError, match="empty") as error:
            encode_prompts(empty, trained, "input")
        assert error.value.param == "input"
    with pytest.raises(APIError, match="outside the vocabulary"):
        encode_prompts([1, trained.vocab_size], trained, "prompt")


def test_legacy_logprobs_list_the_chosen_token_among_the_top(trained):
    ids = trained.encode("Hello world", add_bos=True)
    other = ids[1]
    logprobs = [None, -0.5, -2.0]
    tops = [None, {ids[1]: -0.5}, {other: -0.25}]  # the last token was not the most likely
    result = legacy_logprobs(trained, ids[:3], logprobs, tops, text_offset=4)
    tokens = [trained.decode([t]) for t in ids[:3]]
    assert result["tokens"] == tokens and result["token_logprobs"] == logprobs
    assert result["top_logprobs"][0] is None
    assert result["top_logprobs"][1] == {tokens[1]: -0.5}
    assert result["top_logprobs"][2] == {tokens[1]: -0.25, tokens[2]: -2.0}
    # lm-eval's greedy test: max(top) == the token's own log-prob
    greedy = [max(top.values()) == lp for top, lp in zip(result["top_logprobs"][1:], logprobs[1:], strict=True)]
    assert greedy == [True, False]
    assert result["text_offset"] == [4, 4 + len(tokens[0]), 4 + len(tokens[0]) + len(tokens[1])]
    assert legacy_logprobs(trained, [5], [-math.inf], [{}])["token_logprobs"] == [-9999.0]


def test_chat_logprobs(trained):
    ids = trained.encode("Hi", allow_special=False)[:1]
    result = chat_logprobs(trained, ids, [-0.1], [{ids[0]: -0.1, 7: -3.0, 5: -1.0}])
    [entry] = result["content"]
    token = trained.decode(ids)
    assert entry["token"] == token and entry["logprob"] == -0.1 and entry["bytes"] == list(token.encode())
    assert [t["logprob"] for t in entry["top_logprobs"]] == [-0.1, -1.0, -3.0]
    assert entry["top_logprobs"][1] == {"token": "<|action_start|>", "logprob": -1.0,
                                        "bytes": list(b"<|action_start|>")}


def test_perplexity_entry():
    entry = perplexity_entry(2, [None, -1.0, -3.0])
    assert entry == {"index": 2, "tokens": 3, "token_logprobs": [None, -1.0, -3.0], "nll": 2.0,
                     "perplexity": math.exp(2.0)}
