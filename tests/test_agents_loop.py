"""The agent loop (agents.md §4.3, C1–C12): scripted model outputs (text with control tokens, encoded to ids by the
released tokenizer, so the loop parses them as it parses the engine's) over fake tools; the real sandboxed
interpreter keeping state across two calls; streaming events; batched runs equal to one-by-one runs; and the real
engine on a tiny model (a bigram model made to call) through `EngineClient`."""

import json

import pytest

from internlm2_jax.agents.clients import ClientError, Decoding, Generation, ScriptedClient, to_openai_messages
from internlm2_jax.agents.loop import (AgentConfig, CallReady, CallResult, Done, TextDelta, TurnEnd, run_agent,
                                       run_agents, stream_agent, visible_content)
from internlm2_jax.agents.protocol import ToolResult, action_ids, stop_ids
from internlm2_jax.agents.state import FORCE_ANSWER, Limits
from internlm2_jax.agents.tools import PythonTool, ToolError, ToolExecutor, tool
from internlm2_jax.chat_template import get_chat_template

TEMPLATE = get_chat_template("internlm2_chat")
RUNS = []  # arguments every `add` call was run with


@tool
def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: The first.
        b: The second.
    """
    RUNS.append((a, b))
    return a + b


@tool
def broken(text: str) -> str:
    """Always fails.

    Args:
        text: Anything.
    """
    raise ToolError(f"cannot handle {text!r}")


@tool
def shout(text: str) -> str:
    """Repeats the text a thousand times.

    Args:
        text: What to repeat.
    """
    return text * 1000


def plugin(name, **parameters):
    return f'<|action_start|><|plugin|>\n{json.dumps({"name": name, "parameters": parameters})}<|action_end|>'


def python(code):
    return f"<|action_start|><|interpreter|>\n```python\n{code}\n```<|action_end|>"


@pytest.fixture
def tools():
    RUNS.clear()
    return ToolExecutor([add, broken, shout])


def roles(result):
    return [(m["role"], m.get("name")) for m in result.messages if m["role"] != "system"]


# ---- C1, a call then an answer, prefix stability (A4) -------------------------------------------------------------


def test_c1_a_text_answer_ends_the_run(released, tools):
    client = ScriptedClient(released, ["The answer is 4.<|im_end|>"])
    result = run_agent(client, released, tools, "What is 2 + 2?")
    assert (result.answer, result.stop, result.calls, len(result.turns)) == ("The answer is 4.", "answered", (), 1)
    assert client.decodings[0].stop_ids == stop_ids(released) and client.decodings[0].banned_ids == ()


def test_a_call_then_an_answer(released, tools):
    client = ScriptedClient(released, [f"Let me add.{plugin('add', a=2, b=3)}", "It is 5.<|im_end|>"])
    result = run_agent(client, released, tools, "What is 2 + 3?")
    assert (result.answer, result.stop, RUNS) == ("It is 5.", "answered", [(2, 3)])
    [(call, outcome)] = result.calls
    assert (call.name, call.arguments, outcome) == ("add", {"a": 2, "b": 3}, ToolResult(5))
    assert result.messages[-3:] == (
        {"role": "assistant", "content": "Let me add.",
         "tool_call": {"type": "plugin", "name": "add", "parameters": {"a": 2, "b": 3}}},
        {"role": "environment", "name": "plugin", "content": "5"},
        {"role": "assistant", "content": "It is 5."})
    # The tools are announced once, by the executor's system turn; each prompt extends the previous one (A4).
    assert [m.get("name") for m in result.messages if m["role"] == "system"] == ["plugin"]
    first, second = (prompt.ids for prompt in client.prompts)
    assert second[:len(first)] == first
    # The trajectory renders to exactly the prompts the model saw.
    ids, _ = TEMPLATE.encode(result.messages[:-1], released, add_generation_prompt=True)
    assert tuple(ids) == second
    assert [record.prompt_tokens for record in result.turns] == [len(first), len(second)]
    assert result.turns[0].result == ToolResult(5) and result.turns[1].result is None


# ---- C3–C6: errors are fed back and the loop goes on -------------------------------------------------------------


def test_c3_a_parse_error_is_fed_back_and_the_model_recovers(released, tools):
    bad = '<|action_start|><|plugin|>\n{"name": "add", "parameters": {"a": 2,}}<|action_end|>'
    client = ScriptedClient(released, [f"Adding.{bad}", plugin("add", a=2, b=2), "4.<|im_end|>"])
    result = run_agent(client, released, tools, "2 + 2?")
    assert (result.answer, result.stop, result.state.parse_errors, len(result.turns)) == ("4.", "answered", 1, 3)
    shown, feedback = result.messages[-5:-3]
    # The bad turn stays (its body as text, never trained on); the error is an environment turn in the plugin's form.
    assert shown == {"role": "assistant", "content": 'Adding.\n{"name": "add", "parameters": {"a": 2,}}',
                     "loss": False}
    error = json.loads(feedback["content"])["error"]
    assert feedback["name"] == "plugin" and error["type"] == "invalid_json" and "column" in error["message"]
    assert RUNS == [(2, 2)]
    assert error["message"] in released.decode(client.prompts[1].ids)  # the model saw it


def test_the_parse_error_budget_stops_the_run(released, tools):
    client = ScriptedClient(released, ["<|action_start|><|plugin|>\nnot json<|action_end|>"] * 2)
    result = run_agent(client, released, tools, "Hi", config=AgentConfig(limits=Limits(max_parse_errors=2)))
    assert (result.answer, result.stop, result.state.parse_errors) == (None, "parse_errors", 2)
    assert [json.loads(m["content"])["error"]["type"] for m in result.messages if m["role"] == "environment"] == [
        "not_a_call", "not_a_call"]


@pytest.mark.parametrize("output, status, fragment", [
    (plugin("subtract", a=1, b=2), "unknown_tool", "declared tools: add, broken, shout"),  # C4
    (plugin("add", a=1), "invalid_arguments", "argument 'b' is required"),
    (plugin("broken", text="x"), "tool_error", "broken: cannot handle 'x'"),  # C5
    (python("1 + 1"), "unknown_tool", "the code interpreter is not enabled"),
])
def test_c4_c5_tool_errors_are_results_and_the_loop_goes_on(released, tools, output, status, fragment):
    client = ScriptedClient(released, [output, "Sorry.<|im_end|>"])
    result = run_agent(client, released, tools, "Go")
    assert (result.answer, result.stop) == ("Sorry.", "answered")
    [environment] = [m for m in result.messages if m["role"] == "environment"]
    if environment["name"] == "plugin":
        error = json.loads(environment["content"])["error"]
        assert error["type"] == status and fragment in error["message"]
    else:
        assert fragment in environment["content"]


def test_c7_the_same_call_three_times_in_a_row_stops_the_run(released, tools):
    call = plugin("add", a=1, b=1)
    client = ScriptedClient(released, [call, plugin("add", b=1, a=1), call, "never asked"])
    result = run_agent(client, released, tools, "1 + 1?")
    assert (result.stop, result.answer, len(result.calls), RUNS) == ("repeated_call", None, 2, [(1, 1), (1, 1)])
    assert result.messages[-1]["role"] == "assistant"  # the third call is in the trajectory but was not run
    # A different call in between resets the count.
    RUNS.clear()
    other = plugin("add", a=2, b=2)
    client = ScriptedClient(released, [call, call, other, call, call, "Done.<|im_end|>"])
    assert run_agent(client, released, tools, "1 + 1?", max_turns=8).stop == "answered"


# ---- C2: the last turn bans calls; C8 context budget; C9 truncation ----------------------------------------------


def test_c2_the_last_turn_bans_action_start_so_the_model_answers(released, tools):
    client = ScriptedClient(released, [plugin("add", a=1, b=2), "It is 3.<|im_end|>"])
    result = run_agent(client, released, tools, "1 + 2?", max_turns=2)
    assert (result.answer, result.stop) == ("It is 3.", "max_turns")  # an answer, unlike lagent v0.2's none
    assert [d.banned_ids for d in client.decodings] == [(), action_ids(released)]
    assert [record.calls_banned for record in result.turns] == [False, True]
    # The scripted client, like the engine, cannot produce a banned id.
    with pytest.raises(ClientError, match="banned ids"):
        run_agent(ScriptedClient(released, [plugin("add", a=1, b=2)]), released, tools, "1 + 2?", max_turns=1)


def test_a_client_that_cannot_ban_is_asked_in_words_and_a_last_call_is_not_run(released, tools):
    client = ScriptedClient(released, [plugin("add", a=1, b=2), plugin("add", a=5, b=5)])
    client.can_ban = False
    result = run_agent(client, released, tools, "1 + 2?", max_turns=2)
    assert (result.answer, result.stop, RUNS) == (None, "max_turns", [(1, 2)])
    assert client.prompts[1].messages[-1] == {"role": "system", "content": FORCE_ANSWER}
    assert client.decodings[1].banned_ids == ()


def test_c8_a_prompt_over_the_context_budget_is_not_sent(released, tools):
    decoding = Decoding(max_new_tokens=64)
    system = ToolExecutor([add, broken, shout]).system_turns()
    first, _ = TEMPLATE.encode([*system, {"role": "user", "content": "1 + 2?"}], released, add_generation_prompt=True)
    client = ScriptedClient(released, [plugin("add", a=1, b=2), "3.<|im_end|>"], max_model_len=len(first) + 64)
    result = run_agent(client, released, tools, "1 + 2?", config=AgentConfig(decoding=decoding))
    assert (result.stop, result.answer, len(client.prompts), RUNS) == ("context_budget", None, 1, [(1, 2)])
    # An explicit budget wins over the client's.
    client = ScriptedClient(released, ["3.<|im_end|>"], max_model_len=10**6)
    result = run_agent(client, released, tools, "1 + 2?",
                       config=AgentConfig(decoding=decoding, limits=Limits(context_tokens=len(first) + 63)))
    assert (result.stop, client.prompts) == ("context_budget", [])


def test_c9_long_results_are_cut_with_a_marker(released, tools):
    client = ScriptedClient(released, [plugin("shout", text="ab"), "Loud.<|im_end|>"])
    result = run_agent(client, released, tools, "Shout", config=AgentConfig(limits=Limits(max_result_chars=100)))
    [environment] = [m for m in result.messages if m["role"] == "environment"]
    assert "characters omitted" in environment["content"] and len(environment["content"]) < 200
    assert result.calls[0][1].value == "ab" * 1000  # the full result stays in the record


def test_a_length_cut_call_is_a_truncated_call_error(released, tools):
    client = ScriptedClient(released, [plugin("add", a=1, b=2), "3.<|im_end|>"])
    result = run_agent(client, released, tools, "1 + 2?", config=AgentConfig(decoding=Decoding(max_new_tokens=8)))
    assert result.turns[0].generation.finish_reason == "length"
    assert result.turns[0].parsed.error.code == "truncated_call" and RUNS == []


# ---- the interpreter: a real sandboxed session keeps state across calls ------------------------------------------


def test_the_interpreter_keeps_state_across_two_calls(released):
    client = ScriptedClient(released, ["Compute." + python("x = 6 * 7\nprint(x)"), python("x + 1"),
                                       "The answer is 43.<|im_end|>"])
    with ToolExecutor([add], interpreter=PythonTool(timeout_s=10)) as executor:
        result = run_agent(client, released, executor, "What is 6 * 7 + 1?")
    first, second = (outcome for _, outcome in result.calls)
    if first.status == "sandbox_error":
        pytest.skip(f"the sandbox cannot start on this host: {first.error}")
    assert (first.stdout, second.value, result.answer) == ("42\n", "43", "The answer is 43.")
    assert [m["content"] for m in result.messages if m["role"] == "environment"] == ["42", "43"]
    assert [m.get("name") for m in result.messages if m["role"] == "system"] == ["interpreter", "plugin"]
    assert roles(result)[1:] == [("assistant", None), ("environment", "interpreter"), ("assistant", None),
                                 ("environment", "interpreter"), ("assistant", None)]


# ---- C10: streaming ----------------------------------------------------------------------------------------------


def test_c10_stream_events_in_order_and_deltas_are_the_content(released, tools):
    outputs = [f"Let me add them.{plugin('add', a=2, b=3)}", "The sum is 5.<|im_end|>"]
    events = list(stream_agent(ScriptedClient(released, outputs), released, tools, "2 + 3?"))
    kinds = [type(event).__name__ for event in events]
    first, second = (sum(isinstance(e, TextDelta) and e.turn == turn for e in events) for turn in (1, 2))
    assert kinds == ["TextDelta"] * first + ["CallReady", "CallResult", "TurnEnd"] + ["TextDelta"] * second + [
        "TurnEnd", "Done"]
    for turn in (1, 2):
        deltas = [e.text for e in events if isinstance(e, TextDelta) and e.turn == turn]
        [end] = [e for e in events if isinstance(e, TurnEnd) and e.turn == turn]
        assert "".join(deltas) == end.record.parsed.content and len(deltas) > 1
        assert not any("<|" in delta or "parameters" in delta for delta in deltas)
    [ready] = [e for e in events if isinstance(e, CallReady)]
    [ran] = [e for e in events if isinstance(e, CallResult)]
    assert ready.call == ran.call and ran.result == ToolResult(5)
    assert isinstance(events[-1], Done)
    done = events[-1].result
    same = run_agent(ScriptedClient(released, outputs), released, ToolExecutor([add]), "2 + 3?")
    assert (done.answer, done.stop) == (same.answer, same.stop)
    assert done.messages[-3:] == same.messages[-3:]


def test_visible_content_stops_at_the_call_and_holds_back_half_characters(released):
    ids = tuple(released.encode("Hello 世界<|action_start|><|plugin|>\n{", allow_special=True))
    assert visible_content(Generation(ids, ""), released) == "Hello 世界"
    partial = tuple(released.encode("𝔘", allow_special=False))  # byte-fallback pieces
    assert len(partial) > 2
    assert "\ufffd" not in visible_content(Generation(partial[:-1], ""), released)
    text = 'Hi<|action_start|><|plugin|>\n{"name": "a", "parameters": {}}<|action_end|>'
    assert visible_content(Generation(None, text), released) == ""  # text backends: shown when the turn ends
    assert visible_content(Generation(None, text, "stop"), released) == "Hi"


# ---- C11: batched runs equal single runs -------------------------------------------------------------------------


def policy(prompt):
    """Calls `add` for "a + b?" questions, then answers with the result; answers "No." to anything else."""
    last = prompt.messages[-1]
    if last["role"] == "environment":
        return f"It is {last['content']}.<|im_end|>"
    if "+" not in last["content"]:
        return "No.<|im_end|>"
    a, b = (int(part) for part in last["content"].rstrip("?").split("+"))
    return f"Adding.{plugin('add', a=a, b=b)}"


def test_c11_batched_runs_equal_single_runs(released, tools):
    questions = ["1 + 2?", "hello", "30 + 12?", "7 + 0?"]
    batched = run_agents(ScriptedClient(released, policy), released, tools, questions)
    single = [run_agent(ScriptedClient(released, policy), released, tools, q) for q in questions]
    assert [r.answer for r in batched] == ["It is 3.", "No.", "It is 42.", "It is 7."]
    assert [(r.messages, r.stop) for r in batched] == [(r.messages, r.stop) for r in single]


def test_run_agents_makes_and_closes_an_executor_per_question(released):
    made = []

    def executor():
        made.append(ToolExecutor([add], interpreter=PythonTool()))
        return made[-1]

    with pytest.raises(ValueError, match="share one session"):
        run_agents(ScriptedClient(released, policy), released, ToolExecutor(interpreter=PythonTool()), ["a", "b"])
    results = run_agents(ScriptedClient(released, policy), released, executor, ["1 + 1?", "2 + 2?"])
    assert [r.answer for r in results] == ["It is 2.", "It is 4."] and len(made) == 2
    assert all(e.interpreter._session is None for e in made)  # never started (no code ran), and closed


@pytest.mark.parametrize("message, expected", [
    ({"content": "Hi.", "tool_calls": None}, ("Hi.", None, None)),
    ({"content": None, "tool_calls": [{"id": "c", "type": "function",
                                       "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
     ("", ("add", {"a": 1, "b": 2}), None)),
    ({"content": "Run.", "tool_calls": [{"function": {"name": "python", "arguments": '{"code": "1 + 1"}'}}]},
     ("Run.", ("python", {"code": "1 + 1"}), None)),
    ({"content": "", "tool_calls": [{"function": {"name": "add", "arguments": '{"a": 1,'}}]},
     ("", None, "invalid_json")),
    ({"content": "", "tool_call_error": {"type": "empty_code", "message": "no code", "raw": "\n```python\n```"}},
     ("", None, "empty_code")),
])
def test_chat_client_replies_become_parsed_turns(released, message, expected):
    from internlm2_jax.agents.clients import ChatClient

    sent = []
    client = ChatClient("http://unused", model="m")
    client.http.post = lambda path, body: sent.append(body) or {"choices": [{"message": message,
                                                                             "finish_reason": "stop"}]}
    with ToolExecutor([add], interpreter=EchoInterpreter()) as executor:
        result = run_agent(client, released, executor, "Go", max_turns=2)
    parsed = result.turns[0].parsed
    call = parsed.call and (parsed.call.name, parsed.call.arguments)
    assert (parsed.content, call, parsed.error and parsed.error.code) == expected
    assert "text_level_parse" in parsed.warnings
    assert [tool["function"]["name"] for tool in sent[0]["tools"]] == ["add", "python"]
    assert [body.get("tool_choice") for body in sent] == [None, "none"][:len(sent)]
    assert sent[0]["messages"] == [{"role": "user", "content": "Go"}]  # the tools travel as `tools`


def test_chat_messages_carry_calls_and_results_by_id():
    messages = [{"role": "system", "name": "plugin", "content": "[]"}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "", "tool_call": {"type": "plugin", "name": "add",
                                                                   "parameters": {"a": 2, "b": 3}}},
                {"role": "environment", "name": "plugin", "content": "5"},
                {"role": "assistant", "content": "bad", "loss": False},
                {"role": "environment", "name": "plugin", "content": '{"error": {}}'}]
    assert to_openai_messages(messages) == [
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "5"},
        {"role": "assistant", "content": "bad"},
        {"role": "user", "content": '{"error": {}}'}]


# ---- the real engine (tiny bigram model) -------------------------------------------------------------------------


class EchoInterpreter:
    """Stands in for PythonTool (no sandbox needed): answers every cell with its code."""

    parameters = PythonTool.parameters

    def __call__(self, code):
        return ToolResult(value=f"ran {code!r}")

    def close(self):
        pass


@pytest.fixture(scope="module")
def caller(released):
    """A tiny model that always makes an interpreter call whose code is one token, `x`: after any token it prefers
    `<|action_start|>`, then `<|interpreter|>`, `x`, `<|action_end|>`; with `<|action_start|>` banned it says
    "Sure" and `<|im_end|>`."""
    from internlm2_jax.config import preset
    from test_banned_ids import bigram_model

    code = released.encode("x", allow_special=False)[-1]
    word = released.encode("Sure", allow_special=False)[-1]
    start, interpreter, end, im_end = (released.token_id(name) for name in (
        "<|action_start|>", "<|interpreter|>", "<|action_end|>", "<|im_end|>"))
    return bigram_model(preset("tiny", vocab_size=released.vocab_size, max_position_embeddings=512),
                        {start: {interpreter: 10}, interpreter: {code: 10}, code: {end: 10}, word: {im_end: 10}},
                        {start: 10, word: 9})


@pytest.fixture(scope="module")
def engine(released, caller):
    from internlm2_jax.decode.engine import Engine, EngineConfig

    return Engine(caller, released, EngineConfig(max_model_len=512, kv_budget_tokens=4096, page_size=16,
                                                max_running=2, max_prefill_rows=1, prefill_chunk=256))


def test_engine_client_runs_to_the_turn_limit_and_answers(released, engine):
    from internlm2_jax.agents.clients import EngineClient

    client = EngineClient(engine)
    config = AgentConfig(decoding=Decoding(max_new_tokens=8))
    with ToolExecutor(interpreter=EchoInterpreter()) as executor:
        result = run_agent(client, released, executor, "Go", max_turns=3, config=config)
        assert (result.stop, result.answer) == ("max_turns", "Sure")
        assert [call.arguments["code"] for call, _ in result.calls] == ["x", "x"]
        assert [m["content"] for m in result.messages if m["role"] == "environment"] == ["ran 'x'"] * 2
        assert [record.calls_banned for record in result.turns] == [False, False, True]
        # Streaming drives the same engine to the same end; batched runs equal the single one (C11).
        events = list(stream_agent(client, released, executor, "Go", max_turns=3, config=config))
        assert events[-1].result.messages == result.messages
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == result.answer
        batched = run_agents(client, released, lambda: ToolExecutor(interpreter=EchoInterpreter()),
                             ["Go", "Stop", "Go"], max_turns=3, config=config)
        assert [r.messages[-1] for r in batched] == [result.messages[-1]] * 3
        assert batched[0].messages == result.messages
    assert engine.idle


def test_closing_a_stream_cancels_its_engine_request(released, engine):
    from internlm2_jax.agents.clients import EngineClient, Prompt

    ids, _ = TEMPLATE.encode([{"role": "user", "content": "Go"}], released, add_generation_prompt=True)
    stream = EngineClient(engine).stream(Prompt(tuple(ids), ()), Decoding(max_new_tokens=200))
    first = next(stream)
    assert first.finish_reason is None and len(first.ids) < 200
    stream.close()  # long before max_new_tokens: the request is cancelled and its pages freed
    assert engine.idle and engine.pool.available == engine.pool.capacity


# ---- our server in a subprocess: CompletionsClient and ChatClient -------------------------------------------------


@pytest.mark.slow
def test_http_clients_drive_the_same_model_through_the_server(released, caller, engine, tmp_path):
    from internlm2_jax.agents.clients import ChatClient, CompletionsClient, EngineClient
    from internlm2_jax.convert import save_pretrained
    from serve_testing import running_server

    save_pretrained(caller, tmp_path / "tiny", layout="internlm2", tokenizer=released)
    config = AgentConfig(decoding=Decoding(max_new_tokens=8))

    def executor():
        return ToolExecutor(interpreter=EchoInterpreter())

    reference = run_agent(EngineClient(engine), released, executor(), "Go", max_turns=3, config=config)
    with running_server(tmp_path / "tiny", tmp_path / "server.log", "--model-name", "tiny", "--max-model-len", 512,
                        "--kv-budget-tokens", 4096, "--max-running", 4, "--no-warmup", "--log-level", "warning") as (
            base, _):
        # Token-id prompts: the same calls from the same ids; it cannot ban, so the last turn is asked in words,
        # and this model calls anyway: the call is not run and the run ends without an answer.
        completions = CompletionsClient(base + "/v1", released)
        assert completions.max_model_len == 512
        result = run_agent(completions, released, executor(), "Go", max_turns=3, config=config)
        assert (result.stop, result.answer) == ("max_turns", None)
        assert result.messages[:-2] == reference.messages[:-1]
        assert result.messages[-2]["content"] == FORCE_ANSWER
        assert [r.generation.ids for r in result.turns[:2]] == [r.generation.ids for r in reference.turns[:2]]
        # Chat: the server renders the same conversation from OpenAI messages; tool_choice="none" on the last turn.
        chat = ChatClient(base + "/v1", model="tiny", interpreter_tool="code_interpreter")
        result = run_agent(chat, released, executor(), "Go", max_turns=3, config=config)
        assert (result.stop, result.answer, result.messages) == ("max_turns", "Sure", reference.messages)
        assert all("text_level_parse" in r.parsed.warnings for r in result.turns)
