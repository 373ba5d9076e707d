"""`make demo` (experiments/tiny_chain.py): the chain of stages, run end to end through its command
(`python -m internlm2_jax.launch experiments/tiny_chain.py`) in a subprocess on the one CPU device a newcomer has,
shortened with `--set` (fewer steps, a smaller model); and a check that each stage is the public function its own
experiment's `main` runs (no code path of the demo's own)."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from internlm2_jax.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]
SHORTER = {
    "train.steps": 120, "optimizer.total_steps": 120, "optimizer.warmup_steps": 10, "train.batch_size": 8,
    "data.eval_batches": 8, "model.num_hidden_layers": 2, "model.hidden_size": 128, "model.intermediate_size": 384,
    "model.head_dim": 32,
    "chain.sft_steps": 6, "chain.reward_steps": 6, "chain.rlhf_sft_steps": 6, "chain.rlhf_iterations": 2,
    "chain.rlhf_eval_prompts": 4, "chain.agent_steps": 3, "chain.agent_heldout": 3,
}
STAGES = ("curation", "pretraining", "sft", "reward", "rlhf", "agent", "evaluation", "deployment")


def run_chain(cwd: Path, overrides: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    args = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "internlm2_jax.launch", str(ROOT / "experiments" / "tiny_chain.py"),
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def stage_table(report: str) -> dict[str, list[str]]:
    """stage -> [metric, before, after, what you saw, seconds] from the report's first table."""
    lines = report.split("\n\n")[1].splitlines()
    assert lines[0] == "| stage | metric | before | after | what you just saw | seconds |", lines[0]
    rows = ([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip("|"))] for line in lines[2:])
    return {cells[0]: cells[1:] for cells in rows}


def check_rows(table: dict[str, list[str]], stages: tuple[str, ...]) -> None:
    """Every stage has its row, each row its numbers and its line of what was seen."""
    assert tuple(table) == stages
    for stage, (metric, before, after, saw, seconds) in table.items():
        assert metric and before and after and saw and float(seconds) >= 0, stage
    for stage in {"sft", "rlhf", "agent"} & set(stages):  # shares, each in [0, 1]
        assert all(0.0 <= float(cell.split()[0]) <= 1.0 for cell in table[stage][1:3]), stage


def hashed_sets(report: str) -> set[str]:
    """The held-out sets in the evaluation table (rows with a 10-digit prompt hash)."""
    return {line.split("|")[1].strip() for line in report.splitlines()
            if re.match(r"\| \S+ \| [0-9a-f]{10} \|", line)}


def test_make_demo_runs_the_chain_and_reports(tmp_path):
    """Every stage but RLHF and agent (the slow test below runs those two shortened): its progress line, its row of
    the first table, its files, its held-out set in the evaluation table."""
    assert "-m internlm2_jax.launch experiments/tiny_chain.py" in (ROOT / "Makefile").read_text()
    stages = tuple(s for s in STAGES if s not in ("rlhf", "agent"))
    done = run_chain(tmp_path, SHORTER | {"chain.stages": ",".join(stages)})
    # The run exits non-zero when the held-out loss does not beat the unigram baseline: it must beat it even short.
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_chain"
    for i, stage in enumerate(stages):
        assert f"=== stage {i + 1}/{len(stages)}: {stage} ===" in done.stdout  # the progress line of each stage
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == SHORTER["train.steps"]
    assert math.isfinite(rows[-1]["eval_perplexity"]) and rows[-1]["eval_tokens"] > 0
    assert (run / "loss_curve.png").stat().st_size > 1000 and (run / "stages.png").stat().st_size > 1000
    report = (run / "report.md").read_text()
    assert report.strip() in done.stdout  # printed as well as written
    table = stage_table(report)
    check_rows(table, stages)
    assert int(table["curation"][1]) > int(table["curation"][2]) > 0  # files in, files kept
    unigram, model = float(table["pretraining"][1].split()[0]), float(table["pretraining"][2])
    assert model < unigram
    assert re.fullmatch(r"[\d.]+ / [\d.]+", table["reward"][2])
    # Each stage's own files, where its experiment writes them, under the chain's run directory.
    assert (run / "sft" / "sft_report.json").exists() and (run / "reward" / "reward_stage.json").exists()
    assert hashed_sets(report) == {"stdlib-heldout", "sft-chat-format", "rm-pairs"}
    assert "| quality |" in report and "| fuzzy_dedup |" in report  # the curation stage table
    assert (run / "deploy" / "tiny-chat" / "config.json").exists() and "answered identically" in table["deployment"][3]


@pytest.mark.slow  # ~1 min on the 2-core machine (56 s; the RL and agent stages each compile several programs)
def test_the_rlhf_and_agent_stages_run_shortened(tmp_path):
    stages = ("rlhf", "agent", "evaluation")
    done = run_chain(tmp_path, SHORTER | {"chain.stages": ",".join(stages)})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_chain"
    report = (run / "report.md").read_text()
    check_rows(stage_table(report), stages)
    assert (run / "rlhf" / "rl_report.json").exists() and (run / "agent" / "report.json").exists()
    assert hashed_sets(report) == {"doctest-completion", "arith_mul-heldout"}


def test_stages_can_be_chosen_and_a_bad_choice_is_named(tmp_path):
    done = run_chain(tmp_path, {"chain.stages": "pretraining"}, timeout=120)
    assert done.returncode != 0 and "pretraining trains on the curation stage's data" in done.stderr


@pytest.mark.parametrize("question, reply, follows", [
    ("What does `statistics` do with this?\ndef median_low(data)", "Return the low median of data.<|im_end|>", True),
    ("What does `statistics` do with this?\ndef median_low(data)", ".<|im_end|>", False),  # not a sentence
    ("What does `statistics` do with this?\ndef median_low(data)", "Return the low median of data.", False),  # no end
    ("Use Python to compute 17 * 65.", "Let me run it.<|action_start|><|interpreter|>\n```python\nprint(17 * 65)\n"
     "```<|action_end|>\n<|im_end|>", True),
    ("Use Python to compute 17 * 65.", "Let me run it.<|action_start|><|interpreter|>\n```python\nprint(17 *\n"
     "```<|action_end|>\n<|im_end|>", False),  # the code does not compile
    ("Use Python to compute 17 * 65.", "It is about a thousand.<|im_end|>", False),  # no call
])
def test_the_sft_stage_counts_replies_in_the_chat_format(released, question, reply, follows):
    from internlm2_jax.decode.generate import Completion

    sft = load_experiment(ROOT / "experiments" / "sft_tiny.py")
    completion = Completion(released.encode(reply), [], [], "stop")
    assert sft.follows_format(question, completion, released) is follows


@dataclasses.dataclass
class Recorder:
    """Stands in for a stage function: records its calls, returns a canned result."""

    result: object
    calls: list = dataclasses.field(default_factory=list)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def canned_results():
    examples = [{"user": "q", "assistant": "a", "follows_format": True}]
    sft = {"steps": 1, "heldout_loss": 1.0, "prompts": 2, "format_share_before": 0.0, "format_share_after": 1.0,
           "examples": examples}
    numbers = {"heldout_pairs": 2, "accuracy": 1.0, "accuracy_by_domain": {"code": 1.0}, "conditional_flip_rate": 1.0,
               "mean_margin_detailed_minus_refusal": {"helpful": 1.0, "harmless": -1.0}}
    reward = {"steps": 1, "before": numbers, "after": numbers}
    rl = {"pass_at_1_sft": 0.5, "pass_at_1_rl": 0.9, "heldout_mean_kl_to_sft": 0.01, "iterations": 1,
          "rl_seconds": 1.0, "per_task_rl": {"add": 1.0}, "examples_rl": [{"response": "a + b", "score": 1.0}]}
    messages = [{"role": "user", "content": "What is 2 * 3?"},
                {"role": "assistant", "content": "", "tool_call": {"type": "interpreter", "code": "print(2 * 3)"}},
                {"role": "environment", "content": "6"}, {"role": "assistant", "content": "\\boxed{6}"}]
    mode = {"n": 2, "accuracy": 0.5, "tool_rate": 1.0, "parse_error_rate": 0.0, "exec_error_rate": 0.0,
            "mean_turns": 2.0, "examples": [{"messages": messages}]}
    agent = {"steps": 1, "heldout_direct": mode, "heldout_agent": mode, "heldout_lying": mode}
    return sft, reward, rl, agent


def function_id(fn) -> tuple[str, str]:
    """A function as its file and qualified name: each `load_experiment` makes a new module object of a file."""
    return fn.__code__.co_filename, fn.__code__.co_qualname


def test_each_stage_is_the_function_its_own_experiment_runs(tmp_path, monkeypatch):
    """Acceptance 3 of issue 24: the chain's SFT, reward, RLHF and agent stages call the public functions that
    `sft_tiny.main`, `reward_tiny.main`, `grpo_tiny.main` / `ppo_tiny.main` and `agent_sft_tiny.main` call (stood in
    for by recorders here, so nothing trains), and only with configs of those experiments."""
    monkeypatch.chdir(tmp_path)
    chain = load_experiment(ROOT / "experiments" / "tiny_chain.py")
    sft, reward, rl, agent = canned_results()
    targets = {"sft": (chain.SFT, "stage", sft), "reward": (chain.RM, "stage", reward),
               "rlhf": (chain.PPO, "run_rl", rl), "agent": (chain.AGENT, "run", agent)}
    originals = {stage: function_id(getattr(module, name)) for stage, (module, name, _) in targets.items()}
    recorders = {}
    for stage, (module, name, result) in targets.items():
        recorders[stage] = Recorder(result)
        monkeypatch.setattr(module, name, recorders[stage])
    exp = chain.config()
    exp = dataclasses.replace(exp, chain=dataclasses.replace(exp.chain, stages=("sft", "reward", "rlhf", "agent",
                                                                                "evaluation")))
    for heldout in ("sft/data/heldout.jsonl", "reward/data/heldout.jsonl", "rlhf_sft/data/rl_heldout.jsonl"):
        (chain.RUN / heldout).parent.mkdir(parents=True)  # what the stages would have written: their hashes read it
        (chain.RUN / heldout).write_text("{}\n")
    chain.main(exp)
    assert all(len(r.calls) == 1 for r in recorders.values())
    (sft_exp,), _ = recorders["sft"].calls[0]
    assert sft_exp.name == "sft_tiny" and sft_exp.train.steps == exp.chain.sft_steps
    assert Path(sft_exp.data.heldout_files[0]).is_relative_to(chain.RUN / "sft")
    (rm_exp,), _ = recorders["reward"].calls[0]
    assert rm_exp.name == "reward_tiny" and rm_exp.objective.name == "reward"
    (rl_sft, cfg), kwargs = recorders["rlhf"].calls[0]
    assert rl_sft.name == "rl_sft_tiny" and cfg.algorithm == "grpo" and kwargs["critic"] is False
    assert dataclasses.replace(cfg, iterations=40, checkpoint_every=20, run_dir="runs/grpo_tiny") == \
        chain.GRPO.rl_config()  # grpo_tiny's RL settings, shortened and moved
    (agent_exp, sizes), _ = recorders["agent"].calls[0]
    assert agent_exp.name == "agent_sft_tiny" and sizes.heldout == exp.chain.agent_heldout
    report = (tmp_path / chain.RUN / "report.md").read_text()
    assert "| agent | held-out 4x3-digit products right (of 2)" in report and "| 0.50 | 0.50 |" in report
    assert "'What is 2 * 3?' -> 'print(2 * 3)' -> '6'" in report  # what the agent did, in the first table

    # The experiments' own mains call the same functions (their file and name), here stood in for by recorders too.
    mains = {"sft": (load_experiment(ROOT / "experiments" / "sft_tiny.py"), "stage", sft),
             "reward": (load_experiment(ROOT / "experiments" / "reward_tiny.py"), "stage", reward),
             "agent": (load_experiment(ROOT / "experiments" / "agent_sft_tiny.py"), "run", agent)}
    grpo = load_experiment(ROOT / "experiments" / "grpo_tiny.py")
    mains["rlhf"] = (grpo.PPO, "run_rl", rl)  # grpo_tiny's main is ppo_tiny's run_rl with its rl_config
    for stage, (module, name, result) in mains.items():
        assert function_id(getattr(module, name)) == originals[stage], stage
        recorder = Recorder(result)
        monkeypatch.setattr(module, name, recorder)
        if stage == "reward":
            monkeypatch.setattr(module, "report", Recorder({**reward["after"], "accuracy": 1.0}))
        (grpo if stage == "rlhf" else module).main((grpo if stage == "rlhf" else module).config())
        assert len(recorder.calls) == 1, stage


@pytest.mark.slow  # the whole default chain: ~10 min on the idle 2-core machine
def test_every_stage_of_the_default_chain_beats_its_before(tmp_path):
    """Acceptance 1 of issue 24 on one seed: every stage's "after" beats its "before" on held-out data."""
    done = run_chain(tmp_path, {}, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    table = stage_table((tmp_path / "runs" / "tiny_chain" / "report.md").read_text())
    first = {stage: [float(cell.split()[0]) for cell in table[stage][1:3]]
             for stage in ("pretraining", "sft", "reward", "rlhf", "agent")}
    assert first["pretraining"][1] < first["pretraining"][0] / 1.3  # perplexity, lower is better
    assert first["sft"][1] >= first["sft"][0] + 0.5
    assert first["reward"][1] >= first["reward"][0] + 0.3
    assert first["rlhf"][1] >= first["rlhf"][0] + 0.2
    assert first["agent"][1] >= first["agent"][0] + 0.3
    assert "answered identically" in table["deployment"][3]
