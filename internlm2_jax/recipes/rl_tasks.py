"""The data and the measurement of the tiny RL experiments (docs/rlhf.md §3.6 item 2, "RL beats the SFT ceiling").

The task is `finetune_data`'s complete-the-doctest one: the user shows a function stub with its doctest, the
assistant answers with the function (`def name(args):\\n    return body`). Built here:
- `noisy_demonstrations`: SFT chats whose answer is the correct body with probability `p_correct` and one of the
  task's plausible wrong bodies otherwise (each wrong one verified to fail the doctest), so an SFT policy that fits
  them passes about half the time: the SFT ceiling, by construction.
- `rl_prompts`: prompt records for `data.prompts.PromptDataIterator`, with the stub as `meta` (what
  `train.rl.rewards.rule("doctest", tokenizer)` runs the response against).
- the `"correct_body"` rule (registered on import): 1.0 where the response is exactly the task's correct function,
  a cheap in-process proxy for the doctest rule (no sandbox processes) for CI-sized runs.
- `pass_at_1`: sampled held-out pass@1 of a policy through the RL rollout (`decode.rollout`) and a reward source,
  with the mean per-token KL to a reference model on the same samples.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from internlm2_jax.recipes.finetune_data import _TASKS, _function, _inputs, passes_doctest

INSTRUCTION = "Complete the function so that its doctest passes."
BODY_RULE = "correct_body"
_BY_NAME = {task[0]: task for task in _TASKS}


def answer(name: str, args: str, body: str) -> str:
    """The assistant's answer: the function without its docstring (the doctest comes from the prompt's stub)."""
    return f"def {name}({args}):\n    return {body}"


def _sample_task(rng: random.Random) -> tuple[tuple, str, str, str]:
    """(task, call, expected, stub) of one doctest task instance."""
    task = rng.choice(_TASKS)
    name, args, doc, good, _, kind = task
    call = _inputs(kind, rng)
    expected = repr(eval(f"(lambda {args}: {good})({call})"))  # noqa: S307 - our own generated expression
    return task, call, expected, _function(name, args, doc, "...", call, expected)


def prompt_text(stub: str) -> str:
    return f"{INSTRUCTION}\n{stub}"


def noisy_demonstrations(n: int, seed: int = 0, *, p_correct: float = 0.5) -> list[dict]:
    """`{"messages": [user: stub, assistant: function]}` SFT records; the function is correct with probability
    `p_correct`, else one of the task's wrong bodies that fails this instance's doctest (checked by running it)."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        (name, args, doc, good, bad_bodies, _), call, expected, stub = _sample_task(rng)
        if rng.random() < p_correct:
            body = good
        else:
            body = rng.choice(bad_bodies)
            if passes_doctest(_function(name, args, doc, body, call, expected), name):
                continue  # e.g. max and min agree when a == b: this instance would not be noise
        records.append({"messages": [{"role": "user", "content": prompt_text(stub)},
                                     {"role": "assistant", "content": answer(name, args, body)}]})
    return records


def rl_prompts(n: int, seed: int = 0, *, domain: str | None = None) -> list[dict]:
    """`{"prompt", "meta"}` records (the meta is the stub with its doctest), for `PromptDataIterator`."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        _, _, _, stub = _sample_task(rng)
        record = {"prompt": prompt_text(stub), "meta": stub}
        if domain is not None:
            record["domain"] = domain
        records.append(record)
    return records


def correct_answer(stub: str) -> str:
    """The task's correct function for a stub (found by the function's name)."""
    node = next(n for n in ast.parse(stub).body if isinstance(n, ast.FunctionDef))
    name, args, _, good, _, _ = _BY_NAME[node.name]
    return answer(name, args, good)


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def correct_body(metas: Sequence[Any], texts: Sequence[str], stopped: np.ndarray) -> np.ndarray:
    """1.0 where the response (stopped, trailing blanks ignored) is exactly the stub's correct function, else 0.0."""
    return np.asarray([bool(stop) and _normalise(text) == correct_answer(meta)
                       for meta, text, stop in zip(metas, texts, stopped, strict=True)], np.float32)


def _register() -> None:
    from internlm2_jax.train.rl.rewards import register_rule

    register_rule(BODY_RULE, correct_body, replace=True)  # idempotent: a reloaded module registers itself again


_register()


_DEF = re.compile(r"def (\w+)\(")


def task_name(stub: str) -> str:
    return _DEF.search(stub).group(1)


# ---- measurement --------------------------------------------------------------------------------------------------


def sampled_rate(graphdef, params, prompts_path: str | Path, tokenizer, *, reward, group: Callable[[Any], str] | None
                 = None, max_prompt_len: int = 256, max_new_tokens: int = 32, samples_per_prompt: int = 4,
                 batch_size: int = 32, temperature: float = 1.0, top_p: float = 1.0, seed: int = 1234,
                 ref_params=None, chunk_size: int = 1024, max_prompts: int | None = None,
                 domains: Sequence[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mean of `reward(batch, rollout)` over `samples_per_prompt` sampled answers to each prompt of a JSONL file
    (one pass, a last partial batch dropped): `rl_tasks.pass_at_1`'s measurement without its doctest-task grouping.
    `group(meta)` names each prompt's group for the per-group rates (None: one group, "all"). With `ref_params`
    (same graphdef), the mean per-token KL(policy || reference) on the same samples (`rl_tasks._kl_sum`).
    `extra` ({name: reward source}) are averaged over the same samples too. Sampled, not greedy: a policy that puts
    0.5 on the correct answer and 0.25 on each wrong one scores half the time, while its argmax would always pass.
    Returns {"rate", "samples", "per_group", "stop_rate", "mean_kl"?, "examples", **{name: rate of extra}}."""
    from internlm2_jax.data.prompts import PromptDataIterator
    from internlm2_jax.decode.rollout import RolloutConfig, rollout, rollout_keys

    cfg = RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        samples_per_prompt=samples_per_prompt, stop_ids=tuple(tokenizer.stop_ids))
    kw = {} if domains is None else {"domains": tuple(domains)}
    prompts = PromptDataIterator([str(prompts_path)], tokenizer, max_prompt_len, batch_size, shuffle=False,
                                 repeat=False, **kw)
    scores, names, stops, kl_sum, kl_tokens, examples = [], [], [], 0.0, 0.0, []
    extra = extra or {}
    extra_scores = {name: [] for name in extra}
    for index, batch in enumerate(prompts):
        if max_prompts is not None and index * batch_size >= max_prompts:
            break
        keys = rollout_keys(seed, index, batch.size * samples_per_prompt)
        roll = rollout(graphdef, params, batch.prompt_ids, batch.prompt_lengths, keys, cfg=cfg)
        roll = type(roll)(*(np.asarray(x) for x in (roll.tokens, roll.logprobs, roll.lengths, roll.stopped)))
        batch_scores = np.asarray(reward(batch, roll), np.float32)
        scores.append(batch_scores)
        for name, source in extra.items():
            extra_scores[name].append(np.asarray(source(batch, roll), np.float32))
        stops.append(roll.stopped)
        names += ["all" if group is None else group(batch.metas[row // samples_per_prompt])
                  for row in range(len(batch_scores))]
        for row in range(0, len(batch_scores), max(1, len(batch_scores) // 4)):
            if len(examples) < 8:
                prompt = batch.records[row // samples_per_prompt] if batch.records else batch.metas[0]
                examples.append({"prompt": prompt, "response": tokenizer.decode(roll.tokens[row, :roll.lengths[row]]),
                                 "score": float(batch_scores[row])})
        if ref_params is not None:
            total, count = _kl_sum(graphdef, params, ref_params, batch, roll, tokenizer.pad_id, temperature,
                                   chunk_size)
            kl_sum, kl_tokens = kl_sum + total, kl_tokens + count
    if not scores:
        raise ValueError(f"{prompts_path}: fewer than {batch_size} prompts, no full batch to evaluate")
    scores = np.concatenate(scores)
    per_group = {name: float(np.mean([s for s, n in zip(scores, names, strict=True) if n == name]))
                 for name in sorted(set(names))}
    out = {"rate": float(scores.mean()), "samples": int(scores.size), "per_group": per_group,
           "stop_rate": float(np.concatenate(stops).mean()), "examples": examples}
    out |= {name: float(np.concatenate(values).mean()) for name, values in extra_scores.items()}
    if ref_params is not None:
        out["mean_kl"] = kl_sum / max(kl_tokens, 1.0)
    return out


def pass_at_1(graphdef, params, prompts_path: str | Path, tokenizer, *, reward, **kw) -> dict[str, Any]:
    """Held-out pass@1 of the policy on the doctest prompts (`sampled_rate` grouped by task): {"pass_at_1",
    "samples", "per_task": {name: rate}, "stop_rate", "mean_kl"? (with `ref_params`), "examples"}."""
    out = sampled_rate(graphdef, params, prompts_path, tokenizer, reward=reward, group=task_name, **kw)
    out["pass_at_1"], out["per_task"] = out.pop("rate"), out.pop("per_group")
    return out


def _kl_sum(graphdef, params, ref_params, batch, roll, pad_id: int, temperature: float, chunk_size: int):
    """(sum over response tokens of logp - ref_logp, response tokens) for one rollout."""
    from internlm2_jax.parallel.mesh import within_mesh_of
    from internlm2_jax.train.rl.experience import build_rows

    rows = build_rows(batch.prompt_ids, batch.prompt_lengths, roll, pad_id)
    inputs = {k: rows[k] for k in ("input_ids", "targets", "positions", "segment_ids")}
    with within_mesh_of(params):
        logp = _logprobs(graphdef, params, inputs, temperature, chunk_size)
    with within_mesh_of(ref_params):
        ref_logp = _logprobs(graphdef, ref_params, inputs, temperature, chunk_size)
    mask = rows["response_mask"].astype(np.float32)
    diff = np.asarray(jax.device_get(logp), np.float64) - np.asarray(jax.device_get(ref_logp), np.float64)
    return float((diff * mask).sum()), float(mask.sum())


@partial(jax.jit, static_argnums=(0, 3, 4))
def _logprobs(graphdef, params, batch, temperature, chunk_size):
    from internlm2_jax.train.rl.objectives import policy_logprobs

    return policy_logprobs(nnx.merge(graphdef, params), batch, temperature=temperature, chunk_size=chunk_size)
