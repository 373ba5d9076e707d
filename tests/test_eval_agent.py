"""Agent evaluation (agents.md §4.7, G2–G5, and §3's held-out check 5): scripted clients over generated problems,
through the real loop, sandbox and scorers. An oracle scores 100%, a client that never calls tools has action_pct 0
and cannot guess big products, random-format output is counted as parse errors and fails the no-answer check; the
prompt hash moves with what the model sees and nothing else; answer extraction and `math_equal` tables."""

import dataclasses
import json
import random
import subprocess
import sys

import pytest

from internlm2_jax.agents.clients import ScriptedClient
from internlm2_jax.eval.agent import AgentTaskConfig, load_problems, run_agent_task
from internlm2_jax.eval.agent_scoring import SymbolicCheck, agent_metrics, final_answer, math_equal, numeric_equal
from internlm2_jax.eval.postprocess import ExtractionError
from internlm2_jax.eval.suites import agents_offline_suite, load_suite
from internlm2_jax.eval.tasks import Reader, Task, suite_table
from internlm2_jax.sandbox import SandboxPolicy

SEED = 10**9 + 7


def agent_task(max_empty_share=0.1, **fields):
    config = AgentTaskConfig(**{"suite": "arith", "n": 4, "seed": SEED, "difficulty": 3, **fields})
    return Task(f"{config.suite}-{config.mode}", Reader(f"agents.tasks:{config.suite}"), inferencer="agent",
                agent=config, max_empty_share=max_empty_share)


def user_turn(prompt):
    return next(m["content"] for m in prompt.messages if m["role"] == "user")


def oracle(problems):
    """Knows each problem's reference program: runs it in the interpreter and answers with what it printed (agent
    mode), returns it from `solution()` (PAL), or states the answer (direct mode and questions needing no tool)."""
    def policy(prompt):
        user = user_turn(prompt)
        problem = next(p for p in problems if p.question in user)
        if "solution()" in user:
            *steps, last = problem.program.splitlines()
            body = "\n".join(f"    {line}" for line in [*steps, "return " + last.removeprefix("print")])
            return f"```python\ndef solution():\n{body}\n```<|im_end|>"
        if prompt.messages[-1]["role"] == "environment":
            return f"The answer is \\boxed{{{prompt.messages[-1]['content'].strip()}}}.<|im_end|>"
        if problem.needs_tool and prompt.interpreter:
            return f"Let me run it.<|action_start|><|interpreter|>\n```python\n{problem.program}\n```<|action_end|>"
        return f"The answer is \\boxed{{{problem.answer}}}.<|im_end|>"
    return policy


# ---- G4: oracle, never-calling and random-format clients ---------------------------------------------------------


@pytest.mark.parametrize("suite", ["arith", "gsm", "math", "control"])
def test_an_oracle_client_scores_everything(released, suite):
    rows = {}
    for mode in ("direct", "pal", "agent") if suite != "control" else ("agent",):
        task = agent_task(suite=suite, mode=mode)
        problems = load_problems(task.agent, None)
        result = run_agent_task(None, released, task, client=ScriptedClient(released, oracle(problems)))
        assert result["accuracy"] == 1.0 and result["no_answer_rate"] == 0.0, result["details"]
        assert result["prompt_hash"] == task.prompt_hash() and result["seed"] == SEED and result["rows"] == 4
        rows[mode] = result
    agent = rows["agent"]
    if suite == "control":  # answered directly: nothing to count as a call, unnecessary or not
        assert agent["action_pct"] == 0.0 and agent["unnecessary_call_rate"] == 0.0 and agent["mean_turns"] == 1
        return
    assert agent["follow_acc"] == agent["reasoning_acc"] == agent["code_acc"] == agent["action_pct"] == 1.0
    assert agent["parse_error_rate"] == agent["exec_error_rate"] == agent["max_turns_rate"] == 0.0
    assert agent["mean_turns"] == 2.0 and agent["unnecessary_call_rate"] is None  # no control questions here
    assert {"netns", "wall-clock"} <= set(agent["guards"])  # the sandbox sessions' guards are recorded
    trajectory = agent["details"][0]["trajectory"]
    assert [m["role"] for m in trajectory] == ["user", "assistant", "environment", "assistant"]
    assert trajectory[2]["content"] == agent["details"][0]["reference"]  # the real interpreter's output
    assert rows["pal"]["exec_error_rate"] == 0.0 and set(rows["pal"]["guards"]) == set(agent["guards"])
    assert "follow_acc" not in rows["direct"] and "no_answer_rate" in rows["direct"]  # one-turn modes: no calls
    table = suite_table(list(rows.values()))
    assert f"| {suite}-agent | {agent['prompt_hash']} | code_acc | agent | 1.0000 |" in table


def test_a_client_that_never_calls_tools_has_action_pct_zero_and_cannot_guess(released):
    client = ScriptedClient(released, lambda prompt: "I think the answer is \\boxed{123456}.<|im_end|>")
    result = run_agent_task(None, released, agent_task(n=8), client=client)
    assert result["action_pct"] == result["code_acc"] == 0.0 and result["unnecessary_call_rate"] is None
    assert result["accuracy"] == 0.0 and result["no_answer_rate"] == 0.0  # answers, just wrong ones
    assert result["parse_error_rate"] == 0.0 and result["mean_turns"] == 1.0
    assert {d["prediction"] for d in result["details"]} == {"123456"}
    assert result["guards"] == []  # no call, no sandbox session


def test_random_format_output_counts_parse_errors_and_fails_the_no_answer_check(released):
    def scribble(prompt):
        rng = random.Random(len(prompt.ids))
        word = "".join(rng.choice("abcdefgh ") for _ in range(12))
        return rng.choice([f"<|action_start|><|plugin|>\n{{{word}<|action_end|>",
                           f"<|action_start|>{word}<|action_end|>", "<|action_start|><|interpreter|>\n```\n```"
                           "<|action_end|>", f"{word}<|im_end|>"])

    task = agent_task(n=8, max_empty_share=1.0)
    result = run_agent_task(None, released, task, client=ScriptedClient(released, scribble))
    assert result["no_answer_rate"] >= 0.9 and result["accuracy"] == 0.0
    assert result["parse_error_rate"] == 1.0 and result["action_pct"] == 0.0  # every call attempt was malformed
    assert sum(d["parse_errors"] for d in result["details"]) >= 4  # fed back and counted, not silently retried
    with pytest.raises(ExtractionError, match="arith-agent"):  # the default: above 10% without an answer fails
        run_agent_task(None, released, agent_task(n=8), client=ScriptedClient(released, scribble))


def test_pal_programs_that_fail_are_exec_errors_and_last_line_output_style(released):
    client = ScriptedClient(released, lambda prompt: "```python\ndef solution():\n    return 1 / 0\n```<|im_end|>")
    result = run_agent_task(None, released, agent_task(mode="pal", max_empty_share=1.0), client=client)
    assert result["exec_error_rate"] == 1.0 and result["no_answer_rate"] == 1.0
    assert "ZeroDivisionError" in result["details"][0]["program_error"]
    # "last_line": the environment shows only the last line of stdout, as lagent's IPythonInteractive does.
    task = agent_task(output_style="last_line", n=2)
    problems = load_problems(task.agent, None)
    noisy = [dataclasses.replace(p, program="print('warming up')\n" + p.program) for p in problems]
    result = run_agent_task(None, released, task, client=ScriptedClient(released, oracle(noisy)), problems=noisy)
    assert result["accuracy"] == 1.0
    assert all("warming up" not in m["content"] for d in result["details"] for m in d["trajectory"])


# ---- G3: the prompt hash -----------------------------------------------------------------------------------------


def test_the_prompt_hash_moves_with_what_the_model_sees_and_nothing_else(monkeypatch):
    base = agent_task()
    same = [{"n": 50}, {"seed": SEED + 1}, {"batch": 3}, {"trajectory_chars": 10}]
    changed = [{"max_turns": 4}, {"tools": ("calculator",)}, {"sandbox": SandboxPolicy(memory_mb=1024)},
               {"sandbox": SandboxPolicy(wall_s=5.0)}, {"interpreter_prompt": "Use Python."}, {"meta": "Be brief."},
               {"output_style": "last_line"}, {"style": "lagent", "tools": ("calculator",)}, {"interpreter": False},
               {"max_new_tokens": 256}, {"mode": "pal"}, {"template": "Q: {question}"}, {"difficulty": 2}]
    original = base.prompt_hash()
    hashes = {original}
    for fields in same:
        assert agent_task(**fields).prompt_hash() == base.prompt_hash(), fields
    for fields in changed:
        hashes.add(agent_task(**fields).prompt_hash())
    assert len(hashes) == len(changed) + 1
    assert agent_task(style="lagent").prompt_hash() == base.prompt_hash()  # no plugins: nothing styled
    # A changed generator (same suite name and arguments) is a different setting too.
    import internlm2_jax.eval.agent as agent_module

    real = agent_module.generate
    monkeypatch.setattr(agent_module, "generate", lambda *a, **k: [dataclasses.replace(p, answer=p.answer + "0")
                                                                   for p in real(*a, **k)])
    assert agent_task().prompt_hash() != original


# ---- G2: scorers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("So the total is \\boxed{42}.", "42"),
    ("First \\boxed{1}, on reflection \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box, braces balanced
    ("\\boxed{7} and then an unclosed \\boxed{8", "7"),
    ("The answer is 1,234. Check: 1000 + 234 = 1234", "1234"),  # the stated answer, not the check's numbers
    ("The answer is 3 + 4 = 7.", "7"),
    ("The answer is red.", "red"),
    ("Answer: r", "r"),
    ("The final answer is **blue**", "blue"),
    ("The answer is 42. Answer: maybe", "42"),  # the first statement decides
    ("Answer: the number 3.5 exactly.", "3.5"),
    ("We get 12 apples and then 15 pears", "15"),  # nothing stated: the last number
    ("no idea", ""),
    ("", ""),
    (None, ""),
])
def test_final_answer_extraction(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize("a, b, equal", [
    ("42", "42", True), ("42.0", "42", True), ("1,234", "1234", True), ("$42", "42", True), ("-7", "−7", True),
    ("0.5", "\\frac{1}{2}", True), ("50%", "0.5", True), ("0.25", "25", True),  # InternLM's x100 / ÷100
    ("3.14159", "3.1416", True), ("100001", "100000", True),  # rel 1e-4
    ("101", "100", False), ("43", "42", False), ("", "0", False), ("red", "Red", True), ("red", "blue", False),
    ("(1, 2)", "(1,2)", True), ("(1, 2)", "(2, 1)", False), ("(1, 2)", "(1, 2, 3)", False),
    ("9" * 400, "1", False), ("1/0", "0", False), ("3/-4", "-0.75", False),  # no overflow, no crash
])
def test_math_equal_numeric_table(a, b, equal):
    assert math_equal(a, b) is equal


def test_math_equal_symbolic_in_the_sandbox():
    with SymbolicCheck(timeout_s=10) as symbolic:
        for a, b, equal in [("2\\sqrt{2}", "\\sqrt{8}", True), ("x + 1", "1 + x", True),
                            ("\\frac{\\pi}{2}", "1.5707963", True), ("x^2", "x*x", True), ("x", "y", False),
                            ("\\sqrt{2}", "1.5", False),
                            ("__import__('os').getpid()", "0", False)]:  # not a formula: never handed to sympify
            assert math_equal(a, b, symbolic=symbolic) is equal, (a, b)
    assert not math_equal("2\\sqrt{2}", "\\sqrt{8}")  # without the symbolic step: numeric only


def test_numeric_equal_is_exact():
    assert numeric_equal("1/3", "\\frac{1}{3}") and numeric_equal("2.50", "5/2")
    assert not numeric_equal("0.3333", "1/3") and not numeric_equal("12", "1200") and not numeric_equal("x", "x")


def test_opencompass_agent_metrics_on_hand_rows():
    def row(correct, calls=0, last_ok=False, last_right=False, needs_tool=True, **rest):
        return {"correct": correct, "prediction": "1", "needs_tool": needs_tool, "calls": calls,
                "call_errors": calls - last_ok if calls else 0, "timeouts": 0, "parse_errors": 0, "attempts": calls,
                "last_call_ok": last_ok, "last_output_correct": last_right, "turns": calls + 1, "stop": "answered",
                **rest}

    rows = [row(True, 1, True, True),  # right with a call: every metric
            row(True),  # right without a call: follow and reasoning only
            row(False, 1, True, True),  # wrong, but the last call's output was right: reasoning and code
            row(False, 2, True, False),  # wrong, last call ran: code
            row(False, 1, False, False),  # wrong, last call failed: action only
            row(False, needs_tool=False, prediction=" ", stop="max_turns")]  # a control with no answer
    metrics = agent_metrics(rows)
    assert metrics["follow_acc"] == metrics["accuracy"] == pytest.approx(2 / 6)
    assert metrics["reasoning_acc"] == pytest.approx(3 / 6)
    assert metrics["code_acc"] == pytest.approx(3 / 6)
    assert metrics["action_pct"] == pytest.approx(4 / 6)
    assert metrics["exec_error_rate"] == pytest.approx(2 / 5) and metrics["unnecessary_call_rate"] == 0.0
    assert metrics["no_answer_rate"] == pytest.approx(1 / 6) and metrics["max_turns_rate"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="no rows"):
        agent_metrics([])


# ---- registration: task files, the agents-offline suite ----------------------------------------------------------


def test_agents_offline_suite_and_agent_tasks_in_task_files(tmp_path):
    tasks = agents_offline_suite(seed=SEED, problems=5)
    assert [t.name for t in tasks] == ["arith-direct", "arith-pal", "arith-agent", "gsm-direct", "gsm-pal",
                                       "gsm-agent", "math-direct", "math-pal", "math-agent", "mathbench-direct",
                                       "mathbench-pal", "mathbench-agent", "control-agent", "injection-agent",
                                       "teval", "cibench-end_to_end", "cibench-oracle"]
    ood = agents_offline_suite(seed=SEED, problems=5, ood=True)
    assert [t.name for t in ood] == [f"{t.name}-ood" for t in tasks[:-2]]  # CIBench: no difficulty to raise
    assert [t.agent.difficulty for t in ood[:-1]] == [t.agent.difficulty + 1 for t in tasks[:-3]]
    assert ood[-1].agent.ood and not tasks[-3].agent.ood  # T-Eval: its tools renamed
    assert not {t.prompt_hash() for t in ood} & {t.prompt_hash() for t in tasks}  # the generators' fingerprints
    assert {(t.agent.seed, t.agent.n) for t in tasks[:-2]} == {(SEED, 5)}
    assert {(t.agent.seed, t.agent.n) for t in tasks[-2:]} == {(SEED, 1)}  # notebooks of ~6 steps each
    assert [t.inferencer for t in tasks[-3:]] == ["teval", "cibench", "cibench"]
    assert {t.group for t in tasks[-3:]} == {None}
    assert len({t.prompt_hash() for t in tasks}) == len(tasks)
    assert [t.prompt_hash() for t in agents_offline_suite(seed=SEED + 1)] == [t.prompt_hash() for t in tasks]
    with pytest.raises(ValueError, match="agent.seed"):  # training seeds are not for evaluation
        agents_offline_suite(seed=12)
    (tmp_path / "suite.json").write_text(json.dumps({"tasks": [
        {"name": "calc", "reader": {"path": "unused.jsonl"}, "inferencer": "agent", "max_empty_share": 1.0,
         "agent": {"suite": "gsm", "n": 3, "seed": SEED, "tools": ["calculator"], "max_turns": 3,
                   "sandbox": {"wall_s": 5.0, "read_paths": []}}}]}))
    [task] = load_suite(tmp_path / "suite.json")
    assert task.agent.tools == ("calculator",) and task.agent.sandbox.wall_s == 5.0
    (tmp_path / "teval.json").write_text(json.dumps({"tasks": [
        {"name": "t", "reader": {"path": "unused.jsonl"}, "inferencer": "teval", "agent": {"n": 3, "seed": SEED}}]}))
    [task] = load_suite(tmp_path / "teval.json")
    assert type(task.agent).__name__ == "TEvalTaskConfig" and task.agent.n == 3
    (tmp_path / "cibench.json").write_text(json.dumps({"tasks": [
        {"name": "c", "reader": {"path": "unused.jsonl"}, "inferencer": "cibench",
         "agent": {"mode": "oracle", "n": 2, "seed": SEED, "sandbox": {"wall_s": 5.0, "read_paths": []}}}]}))
    [task] = load_suite(tmp_path / "cibench.json")
    assert task.agent.mode == "oracle" and task.agent.sandbox.wall_s == 5.0
    (tmp_path / "bad.json").write_text(json.dumps({"tasks": [
        {"name": "bad", "reader": {"path": "x.jsonl"}, "inferencer": "agent", "agent": {"tools": ["rm_rf"]}}]}))
    with pytest.raises(ValueError, match="agent.tools"):
        load_suite(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="agent config go together"):
        Task("x", Reader("x.jsonl"), inferencer="gen", agent=AgentTaskConfig()).validate()


def test_problems_from_a_jsonl_file(tmp_path, released):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"id": "p0", "suite": "mine", "question": "What is 6 * 7?", "answer": "42",
                                "program": "print(6 * 7)", "needs_tool": True, "extra": "ignored"}) + "\n")
    task = Task("mine", Reader(str(path)), inferencer="agent", agent=AgentTaskConfig())
    [problem] = load_problems(task.agent, str(path))
    result = run_agent_task(None, released, task, client=ScriptedClient(released, oracle([problem])))
    assert result["accuracy"] == 1.0 and result["suite"] is None


def test_the_cli_refuses_a_seed_for_other_suites(tmp_path, capsys):
    from internlm2_jax.eval.__main__ import main

    assert main(["--checkpoint", str(tmp_path), "--suite", "demo", "--seed", str(SEED)]) == 1
    assert "--seed, --problems and --ood are for the agents-offline suite" in capsys.readouterr().err


@pytest.mark.slow  # ~25 s: a JAX process and the engine's compilation
def test_the_cli_runs_agent_tasks_on_a_tiny_checkpoint(tmp_path, trained):
    """A task file with agent tasks, end to end on an untrained model through the engine: the summary table has the
    agent metrics under the tasks' prompt hashes, and results.json the rows' trajectories."""
    from flax import nnx

    from internlm2_jax.config import preset
    from internlm2_jax.convert import save_pretrained
    from internlm2_jax.model import InternLM2ForCausalLM

    model = InternLM2ForCausalLM(preset("tiny", vocab_size=trained.vocab_size), rngs=nnx.Rngs(1))
    save_pretrained(model, tmp_path / "model", layout="internlm2", tokenizer=trained)
    common = {"suite": "arith", "n": 2, "seed": SEED, "max_new_tokens": 6, "max_turns": 2}
    # The first task allows no empty answer, which one generated token of an untrained model leaves: it fails, alone.
    strict = {"name": "strict", "reader": {"path": "unused"}, "inferencer": "agent", "max_empty_share": 0.0,
              "agent": {**common, "mode": "direct", "max_new_tokens": 1}}
    (tmp_path / "suite.json").write_text(json.dumps({"tasks": [strict] + [
        {"name": f"arith-{mode}", "reader": {"path": "unused"}, "inferencer": "agent", "max_empty_share": 1.0,
         "agent": {**common, "mode": mode}} for mode in ("direct", "agent")]}))
    run = subprocess.run([sys.executable, "-m", "internlm2_jax.eval", "--checkpoint", str(tmp_path / "model"),
                          "--suite", str(tmp_path / "suite.json"), "--no-progress"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1 and "1 of 3 tasks failed: strict" in run.stderr, run.stderr[-3000:]
    record = json.loads((tmp_path / "model" / "eval" / "results.json").read_text())
    assert [f["task"] for f in record["failed"]] == ["strict"] and "empty answer" in record["failed"][0]["error"]
    direct, agent = record["results"]
    assert (direct["mode"], agent["mode"], agent["rows"]) == ("direct", "agent", 2)
    assert f"| arith-agent | {agent['prompt_hash']} | action_pct | agent |" in run.stdout
    assert f"| arith-direct | {direct['prompt_hash']} | accuracy | direct |" in run.stdout
    assert all(d["trajectory"][0] == {"role": "user", "content": d["question"]} for d in agent["details"])
