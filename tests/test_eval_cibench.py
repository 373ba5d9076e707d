"""CIBench-like notebooks (agents.md §3, §4.7 G1-G5): the generator is deterministic and its gold code runs clean in
the sandbox; through the real loop, sandbox and scorers an oracle scores 1 everywhere, a client that never calls the
interpreter has tool_rate 0, code that raises is not executable, steps without an answer fail the task, and oracle
mode replaces the earlier steps by the gold ones; the figure sidecars; the scorers (numbers at rel 1e-6, CIBench's
lenient `in`, ROUGE-1, SSIM) on hand cases; the prompt hash."""

import dataclasses
import hashlib
import io
import json

import numpy as np
import pytest

from internlm2_jax.agents.clients import ScriptedClient
from internlm2_jax.agents.tasks.cibench import TABLES, TAGS, generate_notebooks
from internlm2_jax.eval import cibench
from internlm2_jax.eval.cibench import (CIBenchTaskConfig, cibench_metrics, numbers, numeric_correct,
                                        numeric_lenient, rouge1, run_cibench_task, ssim, vis_similarity)
from internlm2_jax.eval.postprocess import ExtractionError
from internlm2_jax.eval.tasks import Reader, Task
from internlm2_jax.sandbox import PythonSession, SandboxPolicy

SEED = 10**9 + 8  # one notebook of five steps: sales, each tag once, num twice


@pytest.fixture(scope="module", autouse=True)
def references_once():
    """The tests run the same notebook many times: its references are computed in the sandbox once per module."""
    computed = {}
    compute = cibench.gold_steps

    def cached(notebook, policy, guards):
        if (notebook.id, policy) not in computed:
            computed[notebook.id, policy] = compute(notebook, policy, guards)
        return computed[notebook.id, policy]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cibench, "gold_steps", cached)
        yield


def cibench_task(mode="end_to_end", max_empty_share=0.1, **fields):
    config = CIBenchTaskConfig(**{"mode": mode, "n": 1, "seed": SEED, **fields})
    return Task(f"cibench-{mode}", Reader("agents.tasks:cibench"), inferencer="cibench", agent=config,
                max_empty_share=max_empty_share)


def scripted(released, code_for):
    """A client that, at each step, sends `code_for(notebook, step index)` to the interpreter (or answers without
    a call when it is None) and then answers."""
    notebooks = {path: nb for nb in generate_notebooks(8, SEED) for path in nb.files}

    def policy(prompt):
        if prompt.messages[-1]["role"] == "environment":
            return "Done.<|im_end|>"
        [attached] = json.loads(next(m["content"] for m in prompt.messages if m.get("name") == "file"))
        notebook = notebooks[attached["path"]]
        index = sum(m["role"] == "user" and m.get("name") is None for m in prompt.messages) - 1
        code = code_for(notebook, index)
        if code is None:
            return "I would rather not run any code.<|im_end|>"
        return f"Let me run it.<|action_start|><|interpreter|>\n```python\n{code}\n```<|action_end|>"

    return ScriptedClient(released, policy)


def gold(notebook, index):
    return notebook.steps[index].code


# ---- G1: the generator ---------------------------------------------------------------------------------------------


def test_notebooks_are_deterministic_and_cover_every_tag_and_table():
    notebooks = generate_notebooks(6, SEED)
    blob = json.dumps([dataclasses.asdict(nb) for nb in notebooks], sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == "287383ae5a5511ac"
    assert json.dumps([dataclasses.asdict(nb) for nb in generate_notebooks(6, SEED)], sort_keys=True) == blob
    assert generate_notebooks(1, SEED + 1)[0].files != notebooks[0].files
    assert {nb.table for nb in notebooks} == set(TABLES)
    for nb in notebooks:
        assert 5 <= len(nb.steps) <= 8 and nb.steps[0].kind == "count" and {s.tag for s in nb.steps} == set(TAGS)
        assert all(path.startswith("data/") for path in nb.files)
    assert len({path for nb in notebooks for path in nb.files}) == len(notebooks)
    assert {"max", "distinct", "group_names", "scatter"} <= {s.kind for nb in notebooks for s in nb.steps}
    with pytest.raises(ValueError, match="n must be"):
        generate_notebooks(0, SEED)


def test_gold_code_runs_clean_in_the_sandbox():
    notebooks = generate_notebooks(4, SEED)  # every table and every kind of step
    assert {s.kind for nb in notebooks for s in nb.steps} == {"count", "mean", "top_k", "filter_write", "bar", "max",
                                                              "distinct", "group_names", "scatter"}
    with PythonSession(files={p: t.encode() for nb in notebooks for p, t in nb.files.items()}) as session:
        for nb in notebooks:
            session.reset()  # each notebook from a fresh namespace, as in its own session
            for step in nb.steps:
                cell = session.run(step.code)
                assert cell.status == "ok", (nb.id, step.kind, cell.error)
                assert bool(numbers(cell.stdout)) == (step.tag in ("num", "exec")), (nb.id, step.kind, cell.stdout)
                assert bool(cell.images) == (step.tag == "vis"), (nb.id, step.kind)


# ---- G4: oracle, never-calling and failing clients -----------------------------------------------------------------


def test_an_oracle_client_scores_one_everywhere(released):
    task = cibench_task()
    [notebook] = generate_notebooks(1, SEED)
    result = run_cibench_task(None, released, task, client=scripted(released, gold))
    assert result["rows"] == len(notebook.steps) and result["notebooks"] == 1, result["details"]
    for metric in ("tool_rate", "executable", "numeric_correct", "numeric_lenient", "text_score", "vis_structure"):
        assert result[metric] == 1.0, (metric, result["details"])
    assert result["vis_sim"] == pytest.approx(1.0, abs=1e-9)  # the same matplotlib renders the same pixels
    assert result["no_answer_rate"] == 0.0 and result["mean_turns"] == 2.0
    assert result["prompt_hash"] == task.prompt_hash() and result["mode"] == "end_to_end"
    assert result["by_table"] == {notebook.table: {k: result[k] for k in cibench.METRICS}}
    assert {"netns", "wall-clock"} <= set(result["guards"])
    first, last = result["details"][0], result["details"][-1]
    assert first["output"] == first["reference"] and first["tag"] == "num"
    assert [m["role"] for m in first["trajectory"]] == ["user", "assistant", "environment", "assistant"]
    # One conversation: the last step's prompt holds every earlier step, after the file turn.
    assert [m["role"] for m in last["trajectory"]] == ["user", "assistant", "environment", "assistant"]
    assert last["trajectory"][0]["content"] == notebook.steps[-1].prompt


def test_steps_without_a_call_have_tool_rate_zero_and_code_that_raises_is_not_executable(released):
    """One run for both clients' behaviours: even steps are answered without a call, odd steps run code that
    raises."""
    client = scripted(released, lambda nb, k: None if k % 2 == 0 else "raise ValueError('no such column')")
    result = run_cibench_task(None, released, cibench_task(), client=client)
    details = result["details"]
    assert [d["tool_rate"] for d in details] == [float(k % 2) for k in range(len(details))]
    assert [d["calls"] for d in details] == [k % 2 for k in range(len(details))]
    assert result["executable"] == 0.0 and result["tool_rate"] == pytest.approx((len(details) // 2) / len(details))
    assert result["numeric_correct"] == result["numeric_lenient"] == result["text_score"] == 0.0
    assert result["vis_sim"] == result["vis_structure"] == 0.0
    assert result["no_answer_rate"] == 0.0  # it answered every step, in words
    assert "ValueError: no such column" in details[1]["trajectory"][2]["content"]
    assert [m["role"] for m in details[0]["trajectory"]] == ["user", "assistant"]
    never = scripted(released, lambda nb, k: None)  # and a client that never calls: tool_rate 0 over the task
    assert run_cibench_task(None, released, cibench_task(), client=never)["tool_rate"] == 0.0


def test_steps_without_an_answer_fail_the_task_loudly(released):
    silent = ScriptedClient(released, lambda prompt: "<|im_end|>")
    with pytest.raises(ExtractionError, match="cibench-end_to_end"):
        run_cibench_task(None, released, cibench_task(), client=silent)
    result = run_cibench_task(None, released, cibench_task(max_empty_share=1.0), client=silent)
    assert result["no_answer_rate"] == 1.0 and result["tool_rate"] == 0.0


def test_oracle_mode_replaces_the_earlier_steps_by_the_gold_ones(released):
    """Wrong code at every step but the last: in oracle mode the last step still runs (its variables come from the
    gold code that replaced the earlier steps) and its prompt shows the gold calls and outputs; end to end, the same
    last step fails, because the model never loaded the table."""
    [notebook] = generate_notebooks(1, SEED)
    last = len(notebook.steps) - 1

    def lazy(nb, k):
        return gold(nb, k) if k == last else "print('no idea')"

    client = scripted(released, lazy)
    oracle = run_cibench_task(None, released, cibench_task("oracle"), client=client)
    assert oracle["mode"] == "oracle" and oracle["details"][last]["executable"] == 1.0
    tag = notebook.steps[last].tag
    score = {"num": "numeric_correct", "text": "text_score", "vis": "vis_sim", "exec": "executable"}[tag]
    assert oracle["details"][last][score] == pytest.approx(1.0)
    assert all(d["executable"] == 1.0 and d["tool_rate"] == 1.0 for d in oracle["details"])
    shown = client.prompts[-1].messages  # the last step's turn that answers after its call
    calls = [m["tool_call"]["code"] for m in shown if "tool_call" in m]
    assert calls == [s.code for s in notebook.steps]  # earlier steps: gold; the last: the model's (gold too)
    assert not any("no idea" in m["content"] for m in shown)
    environment = [m["content"] for m in shown if m["role"] == "environment"]
    assert environment[0] == oracle["details"][0]["reference"]  # the gold output, shown as the environment's
    end_to_end = run_cibench_task(None, released, cibench_task(), client=scripted(released, lazy))
    assert end_to_end["details"][last]["executable"] == 0.0
    assert "NameError" in end_to_end["details"][last]["trajectory"][2]["content"]


def test_the_figure_sidecars_and_what_the_harness_reads_back():
    [notebook] = generate_notebooks(1, SEED)
    guards = set()
    session = cibench.NotebookSession(notebook, SandboxPolicy(), guards)
    try:
        clean = session.run("sorted(k for k in globals() if not k.startswith('__'))")
        assert clean.result.value == "[]" and "netns" in guards  # the hook left nothing in the notebook's namespace
        run = session.run("import matplotlib.pyplot as plt\nplt.bar(['a', 'b', 'c'], [1, 2, 3])\nplt.show()\n"
                          "fig, axes = plt.subplots(1, 2)\naxes[0].scatter(range(5), range(5))\n"
                          "axes[1].plot([0, 1, 2], [2, 0, 1])\nplt.show()")
        assert [f.name for f in run.figures] == ["fig-001.png", "fig-002.png"]
        assert [f.structure for f in run.figures] == [{"axes": 1, "bars": 3, "points": 0},
                                                      {"axes": 2, "bars": 0, "points": 8}]
        assert all(f.png.startswith(b"\x89PNG") for f in run.figures)
        # Links the code plants where the harness reads (it reads as root) are not followed.
        planted = session.run("import os\nplt.plot([1, 2])\nplt.show()\nos.remove('fig-003.png')\n"
                              "os.symlink('/etc/passwd', 'fig-003.png')\nos.remove('.cibench/fig-003.json')\n"
                              "os.symlink('/etc/passwd', '.cibench/fig-003.json')")
        [figure] = planted.figures
        assert figure.png == b"" and figure.structure is None
        # An interpreter that dies is replaced with the hook in place again.
        assert session.run("import os\nos._exit(3)").result.status == "restarted"
        [after] = session.run("import matplotlib.pyplot as plt\nplt.bar([1], [1])\nplt.show()").figures
        assert after.structure == {"axes": 1, "bars": 1, "points": 0}
        gold = cibench.GoldStep("", run.figures[0])
        step = notebook.steps[-1]
        assert step.tag == "vis"
        assert cibench.score_step(step, gold, [run])["vis_structure"] == 0.0  # its last figure is another plot
        assert cibench.score_step(step, gold, [planted])["vis_sim"] == 0.0
        assert cibench.score_step(step, gold, [dataclasses.replace(run, figures=run.figures[:1])])["vis_sim"] == 1.0
    finally:
        session.close()


# ---- G2: scorers ---------------------------------------------------------------------------------------------------


def test_numbers_and_numeric_scores():
    assert numbers("mean np.float64(12.5), dtype: float64, s05, -3, 1e-05, 2.") == [
        12.5, -3, pytest.approx(1e-5), 2]
    assert numeric_correct("12.50", "12.5\n") and numeric_correct("Mean: 12.5000001", "12.5")
    assert not numeric_correct("12.51", "12.5") and not numeric_correct("12.5000200", "12.5")
    assert not numeric_correct("North 12.5, South 13.0", "12.5")  # one number asked for, two printed
    assert numeric_correct("0", "0") and not numeric_correct("", "3") and not numeric_correct("3", "")
    assert numeric_lenient("  37 \n", "37") and numeric_lenient("The mean for 2 decimals is 112.53", "12.5\n")
    assert not numeric_lenient("12.4", "12.5") and not numeric_lenient("anything", "")


def test_rouge1():
    assert rouge1("ivan, chen, jia", "ivan, chen, jia\n") == 1.0
    assert rouge1("Jia, Ivan, Chen", "ivan, chen, jia") == 1.0  # unigrams: order and case do not count
    assert rouge1("ivan, bob", "ivan, chen") == pytest.approx(0.5)
    assert rouge1("ivan ivan ivan", "ivan, chen") == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))  # clipped
    assert rouge1("", "ivan") == rouge1("ivan", "") == 0.0


def _png(draw, dpi=100):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=dpi)
    draw(figure.subplots())
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_ssim_on_images_and_rendered_plots():
    rng = np.random.default_rng(0)
    noise = rng.random((40, 50))
    assert ssim(noise, noise) == 1.0 and ssim(np.full((9, 9), 0.5), np.full((9, 9), 0.5)) == 1.0
    c1 = 0.01**2  # black against white: only the luminance constant is left
    assert ssim(np.zeros((9, 9)), np.ones((9, 9))) == pytest.approx(c1 / (1 + c1))
    assert ssim(noise, rng.random((40, 50))) < 0.1
    with pytest.raises(ValueError, match="one shape"):
        ssim(noise, noise[:, :-1])
    with pytest.raises(ValueError, match="window"):
        ssim(noise[:5], noise[:5])
    bars = _png(lambda ax: ax.bar(["a", "b", "c"], [3, 1, 2]))
    other_bars = _png(lambda ax: ax.bar(["a", "b", "c"], [1, 3, 2]))
    line = _png(lambda ax: ax.plot([0, 1, 2, 3], [3, 0, 2, 1]))
    assert vis_similarity(bars, bars) == 1.0
    assert vis_similarity(line, bars) < 0.9 and vis_similarity(other_bars, bars) < 0.95
    half_size = _png(lambda ax: ax.bar(["a", "b", "c"], [3, 1, 2]), dpi=50)  # resized onto the gold's grid
    assert vis_similarity(half_size, bars) > vis_similarity(other_bars, bars)
    assert vis_similarity(b"not a png", bars) == 0.0
    assert vis_similarity(bars[:200], bars) == 0.0  # a truncated PNG does not decode


def test_metrics_pool_the_steps_that_have_each_score():
    def row(tag, table="sales", answer="ok", **scores):
        return {"tag": tag, "table": table, "answer": answer, "turns": 2,
                **dict.fromkeys(cibench.SCORES), "tool_rate": 1.0, "executable": 1.0, **scores}

    rows = [row("num", numeric_correct=1.0, numeric_lenient=1.0), row("num", numeric_correct=0.0, numeric_lenient=1.0),
            row("text", text_score=0.5), row("exec", executable=0.0, answer=" "), row("vis", tool_rate=0.0,
                                                                                      executable=0.0, vis_sim=0.0,
                                                                                      vis_structure=0.0)]
    metrics = cibench_metrics(rows)
    assert metrics["tool_rate"] == 0.8 and metrics["executable"] == 0.6 and metrics["numeric_correct"] == 0.5
    assert metrics["numeric_lenient"] == 1.0 and metrics["text_score"] == 0.5 and metrics["vis_sim"] == 0.0
    assert metrics["no_answer_rate"] == 0.2 and metrics["mean_turns"] == 2.0
    assert cibench_metrics(rows[:2])["text_score"] is None  # no text step: no text score
    with pytest.raises(ValueError, match="no rows"):
        cibench_metrics([])


# ---- G3: configuration and the prompt hash -------------------------------------------------------------------------


def test_config_validation_and_the_prompt_hash(monkeypatch):
    base = cibench_task()
    for fields in ({"n": 7}, {"seed": SEED + 1}, {"batch": 2}, {"trajectory_chars": 10}):
        assert cibench_task(**fields).prompt_hash() == base.prompt_hash(), fields
    changed = [{"mode": "oracle"}, {"max_turns": 4}, {"max_new_tokens": 256}, {"meta": "Be brief."},
               {"interpreter_prompt": "Use Python."}, {"sandbox": SandboxPolicy(wall_s=5.0)}]
    assert len({base.prompt_hash(), *(cibench_task(**fields).prompt_hash() for fields in changed)}) == 7
    for fields, message in (({"mode": "e2e"}, "agent.mode"), ({"seed": 12}, "agent.seed"), ({"n": 0}, "agent.n"),
                            ({"max_turns": 0}, "max_turns")):
        with pytest.raises(ValueError, match=message):
            cibench_task(**fields).validate()
    with pytest.raises(ValueError, match="go together"):
        Task("x", Reader("agents.tasks:cibench"), inferencer="cibench").validate()
    original = base.prompt_hash()
    real = cibench.generate_notebooks
    monkeypatch.setattr(cibench, "generate_notebooks", lambda n, seed: [
        dataclasses.replace(nb, steps=nb.steps[:-1]) for nb in real(n, seed)])
    assert base.prompt_hash() != original  # a changed generator is a different setting
