"""Task generators, oracle policies and trajectory records (docs/agents.md §2.9, §3, §4.1 A4, §4.7 G1): generators
are deterministic and pinned by hash; every reference answer is what its program prints in the sandbox; oracle runs
through the real loop render through the chat template, parse back from ids into the same calls, and load through
`data.conversations` with loss exactly on the trained assistant turns."""

import dataclasses
import hashlib
import json

import pytest

from internlm2_jax.agents.loop import AgentConfig
from internlm2_jax.agents.protocol import parse_ids
from internlm2_jax.agents.tasks import GENERATOR_VERSION, SUITES, generate
from internlm2_jax.agents.tasks.oracle import OraclePolicy, extract_answer, interpreter_call, plant_bug
from internlm2_jax.agents.tools import PythonTool, ToolExecutor
from internlm2_jax.agents.tools.calculator import calculator
from internlm2_jax.agents.trajectories import dedup, oracle_records, read_records, record_key, write_records
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.data.conversations import SFTDataIterator, conversation
from internlm2_jax.sandbox import run_program
from internlm2_jax.tokenizer import ACTION_END

TEMPLATE = get_chat_template("internlm2_chat")
CONFIG = AgentConfig(interpreter_prompt="You can run Python code.")
# sha256 of 20 problems (seed 7) per suite, for GENERATOR_VERSION 1: a change here must bump the version.
PINNED = {("arith", 2): "6a11edaeca036dc7ca99a749f7e8aa978a51f9a87c41cf620487c5c4d3da88a0",
          ("gsm", 1): "5b8d691dab44f101ead8fe536fcfb5279a0ac84d8e4caf017b6809bc166b36ae",
          ("control", 1): "a845fc285da2d9b21f8ed416e9a72321949ee72df28d7937d80c90ddba6cb44f",
          ("arith_mul", 3): "04be5a898eb1118e96f93c0a3f5b6b75a0c5a09e0838a0a353193a79825f4a5a",
          ("math", 1): "6e6c66c153146b587280489c0eda4b1a7875d4a6b71a1c33fe668c17283ca0ff"}


def digest(problems):
    return hashlib.sha256(json.dumps([dataclasses.asdict(p) for p in problems], sort_keys=True).encode()).hexdigest()


def test_generators_are_deterministic_and_pinned():
    assert GENERATOR_VERSION == 1
    for (suite, difficulty), expected in PINNED.items():
        assert digest(generate(suite, 20, 7, difficulty=difficulty)) == expected, suite
    for suite in SUITES:
        first = generate(suite, 30, 3, difficulty=2)
        assert first == generate(suite, 30, 3, difficulty=2)
        assert first != generate(suite, 30, 4, difficulty=2)
        assert generate(suite, 10, 3, difficulty=2) == first[:10]  # problem i does not depend on n
        assert len({p.id for p in first}) == 30 and all(p.suite == suite for p in first)
    with pytest.raises(ValueError, match="unknown suite"):
        generate("nope", 1, 0)
    with pytest.raises(ValueError, match="difficulty"):
        generate("arith", 1, 0, difficulty=0)


def test_difficulty_scales_the_operands_and_gsm_has_two_to_five_steps():
    for difficulty in (1, 3, 5):
        for p in generate("arith_mul", 20, 1, difficulty=difficulty):
            a, b = p.meta["expression"].split(" * ")
            assert (len(a), len(b)) == (difficulty + 1, difficulty)
    gsm = generate("gsm", 200, 1)
    assert {p.meta["steps"] for p in gsm} <= {2, 3, 4} and len({p.meta["template"] for p in gsm}) >= 12
    assert {p.meta["kind"] for p in generate("arith", 100, 1, difficulty=3)} == {"mul", "floordiv", "mod", "powmod",
                                                                                "nested"}
    assert len({p.meta["kind"] for p in generate("math", 100, 1)}) == 7
    assert all(p.needs_tool for s in ("arith", "gsm", "math") for p in generate(s, 20, 1))
    assert not any(p.needs_tool for p in generate("control", 20, 1))


def test_reference_answers_are_what_the_programs_print_in_the_sandbox():
    problems = [p for suite in SUITES for d in (1, 2, 4) for p in generate(suite, 12, 11, difficulty=d)]
    # One sandboxed program checks them all: each reference program runs with its output captured.
    cases = json.dumps([(p.id, p.program, p.answer) for p in problems])
    checker = ("import contextlib, io, json\n"
               f"for pid, program, answer in json.loads({cases!r}):\n"
               "    out = io.StringIO()\n"
               "    with contextlib.redirect_stdout(out):\n"
               "        exec(program, {})\n"
               "    assert out.getvalue() == answer + '\\n', (pid, out.getvalue(), answer)\n")
    result = run_program(checker, timeout_s=30)
    assert result.status == "passed", result.detail


def test_oracle_episodes_render_and_parse_back_into_the_same_calls(released):
    problems = generate("arith", 12, 5, difficulty=3) + generate("gsm", 6, 5) + generate("control", 4, 5)
    stats = {}
    records = oracle_records(problems, released, config=CONFIG, recovery_rate=0.5, seed=1, stats=stats)
    assert len(records) == len(problems) and "rejected" not in stats
    assert stats["recovery"] >= 3 and stats["tool"] >= 3 and stats["no_tool"] == 4
    action_end = released.token_id(ACTION_END)
    for record, problem in zip(records, problems, strict=True):
        messages = conversation(record)
        assert messages[0] == {"role": "system", "name": "interpreter", "content": CONFIG.interpreter_prompt}
        assert extract_answer(messages[-1]["content"]) == problem.answer
        calls = [(i, m) for i, m in enumerate(messages) if m.get("tool_call")]
        assert bool(calls) == problem.needs_tool  # control questions are answered without a call
        for i, message in calls:
            # A4: the prompt of the turn is a prefix of the whole, and the turn's ids parse back into its call.
            prompt, _ = TEMPLATE.encode(messages[:i], released, add_generation_prompt=True)
            whole, _ = TEMPLATE.encode(messages, released)
            assert whole[:len(prompt)] == prompt
            turn = whole[len(prompt):]
            parsed = parse_ids(turn[:turn.index(action_end) + 1], released, tools={})
            assert parsed.error is None and parsed.content == message["content"]
            assert parsed.call.kind == "interpreter" and parsed.call.arguments["code"] == message["tool_call"]["code"]
            result = messages[i + 1]
            assert result["role"] == "environment" and result["name"] == "interpreter"
        if record["meta"]["episode"] == "recovery":
            (first, bad), (_, fixed) = calls
            assert "NameError" in messages[first + 1]["content"] and bad["loss"] is False and "loss" not in fixed
            assert fixed["tool_call"]["code"] == problem.program and messages[-2]["content"] == problem.answer
    direct = oracle_records(problems[:3], released, config=CONFIG, interpreter=False)
    assert all(len(r["messages"]) == 2 and r["messages"][0]["role"] == "user" for r in direct)


def test_calculator_episodes_announce_the_tool_and_render_as_the_agent_rendered(released):
    problems = generate("arith", 16, 2, difficulty=2)
    stats = {}
    records = oracle_records(problems, released, config=CONFIG, recovery_rate=0.0, calculator_rate=0.6, stats=stats)
    assert len(records) == 16 and stats["calculator"] >= 4 and stats["tool"] >= 1
    executor = ToolExecutor([calculator], interpreter=PythonTool())
    announced = executor.system_turns(interpreter_prompt=CONFIG.interpreter_prompt)
    for record, problem in zip(records, problems, strict=True):
        messages = conversation(record)
        assert messages[:2] == announced  # the plugin turn re-inserted by `with_tools` exactly as the agent showed it
        assert extract_answer(messages[-1]["content"]) == problem.answer
        if record["meta"]["episode"] == "calculator":
            call, result = messages[3], messages[4]
            assert call["tool_call"] == {"type": "plugin", "name": "calculator",
                                         "parameters": {"expression": problem.meta["expression"]}}
            assert result == {"role": "environment", "name": "plugin", "content": problem.answer}
            prompt, _ = TEMPLATE.encode(messages[:3], released, add_generation_prompt=True)
            whole, _ = TEMPLATE.encode(messages, released)
            turn = whole[len(prompt):]
            parsed = parse_ids(turn[:turn.index(released.token_id(ACTION_END)) + 1], released,
                               tools=executor.specs())
            assert parsed.error is None and parsed.call.arguments == call["tool_call"]["parameters"]


def test_records_load_through_the_sft_iterator_with_loss_on_trained_assistant_turns(released, tmp_path):
    problems = generate("arith", 6, 9, difficulty=2) + generate("control", 2, 9)
    records = oracle_records(problems, released, config=CONFIG, recovery_rate=0.5)
    path = write_records(records + records[:2], tmp_path / "trajectories.jsonl")  # repeats are written once
    assert read_records(path) == records
    for record in records:
        ids, mask = TEMPLATE.encode(conversation(record), released)
        trained = released.decode([t for t, m in zip(ids, mask, strict=True) if m])
        # Trained: each trained assistant turn's thought, call and <|im_end|>, nothing of any other turn.
        expected = "".join(m["content"] + (interpreter_call(m["tool_call"]["code"]) + "\n" if "tool_call" in m else "")
                           + "<|im_end|>" for m in record["messages"]
                           if m["role"] == "assistant" and m.get("loss", True))
        assert trained == expected
        assert "Traceback" not in trained and "prnt(" not in trained
    batches = SFTDataIterator([str(path)], released, seq_len=512, batch_size=2, shuffle=False, repeat=False,
                              strict=True)
    rows = list(batches)
    assert sum(int(b["loss_mask"].sum()) for b in rows) > 0 and batches.stats["bad_records"] == 0


def test_dedup_keys_ignore_meta_and_bugs_are_planted_where_they_raise():
    record = {"messages": [{"role": "user", "content": "hi"}], "meta": {"id": 1}}
    assert record_key(record) == record_key({**record, "meta": {"id": 2}})
    assert dedup([record, {**record, "meta": {}}, {"messages": []}]) == [record, {"messages": []}]
    import random
    rng = random.Random(0)
    for problem in generate("gsm", 10, 2) + generate("arith", 10, 2):
        assert plant_bug(problem.program, rng) != problem.program
    policy = OraclePolicy(generate("control", 1, 0)[0], "no_tool")
    assert extract_answer(policy.next_turn([])) == generate("control", 1, 0)[0].answer
