"""Acceptance 3 of issue 22 (agents.md §4.5 E1, with three tools): the `openai` SDK drives an agent loop through
`python -m internlm2_jax.serve` in a subprocess. The client declares the calculator, search_docs and the interpreter
(our `{"type": "code_interpreter"}` extension, whose calls come back as `python` function calls), runs each call
with a client-side `ToolExecutor` and answers it with a `tool` message naming its `tool_call_id`, streaming and not;
the two transcripts must be the same message for message.

The model is the tiny one taught the whole conversation (three calls, then the answer) by overfitting, in the
template the server renders, with the results the same tools give here, so greedy decoding walks the loop exactly
when the server renders every turn, routes every result and parses every call as the conversation was taught. The
browser playground's test (tests/test_serve_playground.py) serves the same model: the page declares the same tools.
"""

import json
from pathlib import Path

import openai
import pytest
from flax import nnx

from internlm2_jax.agents.protocol import INTERPRETER_TOOL_NAME, Call, result_turn
from internlm2_jax.agents.tools import PythonTool, ToolExecutor, search_docs
from internlm2_jax.agents.tools.calculator import calculator
from internlm2_jax.config import preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.serve.protocol import ChatMessage, Tool, template_messages
from serve_testing import running_server
from test_serve_openai import memorize

QUESTION = "What is 12*34? Where are the gzip docs? Check it in Python."
# What the model is taught to ask for, in order, then the answer it ends with.
CALLS = [("calculator", {"expression": "12*34"}), ("search_docs", {"query": "gzip", "k": 1}),
         (INTERPRETER_TOOL_NAME, {"code": "print(12 * 34)"})]
ANSWER = "12*34 = 408: the calculator and Python agree, and the gzip module documents it."
MAX_TOKENS = 96  # per turn, as the playground page asks by default
MAX_MODEL_LEN = 1536  # the taught conversation is 1,261 tokens
# Compiled on first use: warming up every program for this context length would take minutes on a CPU.
SERVER_FLAGS = ("--max-model-len", MAX_MODEL_LEN, "--kv-budget-tokens", 2 * MAX_MODEL_LEN, "--max-running", 2,
                "--prefill-chunk", 256, "--no-warmup", "--log-level", "warning")


def executor() -> ToolExecutor:
    """The client's tools: what the playground runs for its page, in the same order (the model saw this order)."""
    return ToolExecutor([calculator, search_docs], interpreter=PythonTool())


def openai_tools(tools: ToolExecutor) -> list[dict]:
    return [*tools.openai_tools(), {"type": "code_interpreter"}]


def protocol_call(tool_call: dict) -> Call:
    """An OpenAI tool call as the protocol's call: `python` is the interpreter's."""
    function = tool_call["function"]
    kind = "interpreter" if function["name"] == INTERPRETER_TOOL_NAME else "plugin"
    return Call(kind, function["name"], json.loads(function["arguments"]), function["arguments"])


def tool_message(tools: ToolExecutor, call_id: str, call: Call) -> dict:
    """The `tool` message answering `call`: its result in the form the model is shown (`protocol.result_turn`)."""
    return {"role": "tool", "tool_call_id": call_id, "content": result_turn(call, tools(call))["content"]}


def taught_conversation(tools: ToolExecutor) -> list[dict]:
    """The OpenAI transcript the model learns: each call answered by what the tool really returns here."""
    messages = [{"role": "user", "content": QUESTION}]
    for index, (name, arguments) in enumerate(CALLS):
        call_id = f"call_{index}"
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        messages.append({"role": "assistant", "tool_calls": [call]})
        messages.append(tool_message(tools, call_id, protocol_call(call)))
    return [*messages, {"role": "assistant", "content": ANSWER}]


def taught_model_dir(root: Path, tokenizer) -> Path:
    """The tiny model that learnt `taught_conversation` with `tokenizer`, saved with it under `root` once: this
    module and the playground's serve the same directory when they share a temporary root."""
    target = root / "three_tools"
    if target.is_dir():
        return target
    with executor() as tools:
        conversation = taught_conversation(tools)
        declared = openai_tools(tools)
    messages = template_messages([ChatMessage(**m) for m in conversation], [Tool(**t) for t in declared])
    model = InternLM2ForCausalLM(preset("tiny", vocab_size=tokenizer.vocab_size,
                                        max_position_embeddings=MAX_MODEL_LEN), rngs=nnx.Rngs(3))
    memorize(model, tokenizer, messages, steps=400)
    staging = root / "three_tools.partial"  # renamed when whole: an interrupted save is never taken for a model
    save_pretrained(model, staging, layout="internlm2", tokenizer=tokenizer)
    staging.rename(target)
    return target


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained):
    return taught_model_dir(tmp_path_factory.getbasetemp(), trained)


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("sdk_server") / "server.log"
    with running_server(model_dir, log, *SERVER_FLAGS) as (base, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def assistant_turn(client, messages: list[dict], tools: list[dict], *, stream: bool) -> tuple[dict, str]:
    """(the assistant message as a dict, finish_reason); streamed deltas are added up the way the SDK's users do."""
    request = dict(model="three_tools", messages=messages, tools=tools, max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        return choice.message.model_dump(exclude_none=True), choice.finish_reason
    message: dict = {"role": "assistant"}
    content, finish_reason, chunks = "", None, 0
    for chunk in client.chat.completions.create(**request, stream=True):
        chunks += 1
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:  # the server sends each call whole, in one chunk
            message.setdefault("tool_calls", []).append(
                {"id": call.id, "type": call.type, "function": call.function.model_dump(exclude_none=True)})
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    assert chunks >= 3, "a streamed turn is at least a role chunk, a delta and the finish"
    if content:
        message["content"] = content
    return message, finish_reason


def agent_loop(client, *, stream: bool, max_turns: int = 6) -> tuple[list[dict], list[str]]:
    """The client's loop: ask, run the call with the client-side executor, send the result back by its call id."""
    with executor() as tools:
        declared = openai_tools(tools)
        messages = [{"role": "user", "content": QUESTION}]
        reasons = []
        for _ in range(max_turns):
            message, finish_reason = assistant_turn(client, messages, declared, stream=stream)
            messages.append(message)
            reasons.append(finish_reason)
            if finish_reason != "tool_calls":
                return messages, reasons
            (tool_call,) = message["tool_calls"]
            messages.append(tool_message(tools, tool_call["id"], protocol_call(tool_call)))
    pytest.fail(f"no answer after {max_turns} turns: {json.dumps(messages)[-2000:]}")


def without_ids(messages: list[dict]) -> list[dict]:
    """The transcript with the per-response call ids left out, after checking that each result names its call."""
    stripped, last_id = [], None
    for message in messages:
        message = json.loads(json.dumps(message))
        for call in message.get("tool_calls", []):
            last_id = call.pop("id")
        if message["role"] == "tool":
            assert message.pop("tool_call_id") == last_id
        stripped.append(message)
    return stripped


@pytest.mark.slow
def test_openai_sdk_runs_the_three_tool_loop_streaming_and_not(client, model_dir, trained):
    plain, plain_reasons = agent_loop(client, stream=False)
    streamed, streamed_reasons = agent_loop(client, stream=True)
    assert plain_reasons == streamed_reasons == ["tool_calls"] * 3 + ["stop"]
    calls = [(m["tool_calls"][0]["function"]["name"], json.loads(m["tool_calls"][0]["function"]["arguments"]))
             for m in plain if m.get("tool_calls")]
    assert calls == CALLS
    results = [m["content"] for m in plain if m["role"] == "tool"]
    assert results[0] == "408" and json.loads(results[1])[0]["title"] == "gzip" and results[2] == "408"
    assert plain[-1]["content"] == ANSWER
    assert without_ids(plain) == without_ids(streamed)
    with executor() as tools:
        assert without_ids(plain) == without_ids(taught_conversation(tools))
