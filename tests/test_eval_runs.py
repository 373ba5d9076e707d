"""The GEN inferencer, perplexity / bits per byte, the needle sweep and the `python -m internlm2_jax.eval` runner on a
tiny model (its max_position_embeddings of 64 is crossed by the longer haystacks)."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.eval.generation import prompt_ids, run_gen
from internlm2_jax.eval.needle import NEEDLE, QUESTION, haystack_prompt, needle_sweep, plot_heatmap
from internlm2_jax.eval.perplexity import perplexity
from internlm2_jax.eval.postprocess import ExtractionError
from internlm2_jax.eval.tasks import Prompt, Reader, Task, read_rows
from internlm2_jax.model import InternLM2ForCausalLM


@pytest.fixture(scope="module")
def tiny(trained):
    return InternLM2ForCausalLM(preset("tiny", vocab_size=trained.vocab_size), rngs=nnx.Rngs(1))


def test_gen_inferencer_scores_extracted_answers_and_refuses_empty_extraction(tmp_path, tiny, trained):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in [("one plus one", "2"), ("two plus two", "4"), ("red or blue", "red")]))
    task = Task("qa", Reader(str(data)), Prompt(template="Q: {question}\nA:"), inferencer="gen",
                max_new_tokens=6, max_empty_share=1.0)
    result = run_gen(tiny, trained, task)
    assert result["prompt_hash"] == task.prompt_hash() and len(result["details"]) == 3
    expected = np.mean([d["prediction"] == d["reference"] for d in result["details"]])
    assert result["accuracy"] == pytest.approx(expected)
    assert all(d["prediction"] == d["output"].strip() for d in result["details"])
    with pytest.raises(ExtractionError, match="qa"):  # nothing extracts as an option letter from random text
        run_gen(tiny, trained, Task("qa", Reader(str(data)), Prompt(template="Q: {question}\nA:"),
                                    inferencer="gen", postprocessor="first_option", max_new_tokens=4,
                                    max_empty_share=0.0))
    ids, stops = prompt_ids(trained, "hello", chat=True, bos=True)
    assert ids[0] == trained.bos_id and trained.token_id("<|im_start|>") in ids and len(stops) == 2
    assert task.prompt_hash() != Task("qa", Reader(str(data)), Prompt(template="Q: {question}\nA: "),
                                      inferencer="gen").prompt_hash()


def test_bad_rows_are_errors_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "x"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_rows(path)


def test_perplexity_and_bits_per_byte_match_a_direct_computation(tiny, trained):
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"]
    result = perplexity(tiny, trained, texts, window=512)
    nll, tokens = 0.0, 0
    for text in texts:
        ids = trained.encode(text, add_bos=True, add_eos=True)
        hidden = tiny(jnp.asarray([ids[:-1]]), return_hidden=True)
        nll -= float(tiny.token_logprobs(hidden, jnp.asarray([ids[1:]])).sum())
        tokens += len(ids) - 1
    assert result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(t.encode()) for t in texts),
                                                    rel=1e-4)
    windowed = perplexity(tiny, trained, texts, window=8)
    assert windowed["tokens"] == tokens  # windows overlap by one token: every token is predicted once


def test_needle_sweep_crosses_max_positions_and_draws_the_heat_map(tmp_path, tiny, trained):
    filler = "The quick brown fox jumps over the lazy dog. " * 3
    prompt = haystack_prompt(trained, filler, 96, 0.5, 4321)
    needle = trained.encode(NEEDLE.format(number=4321), allow_special=False)
    at = next(i for i in range(len(prompt)) if prompt[i:i + len(needle)] == needle)
    body = 96 - len(needle) - len(trained.encode(QUESTION, allow_special=False)) - 1  # filler tokens around it
    assert len(prompt) == 96 and at == 1 + round(0.5 * body)
    with pytest.raises(ValueError, match="no room"):
        haystack_prompt(trained, filler, 8, 0.5, 4321)
    result = needle_sweep(tiny, trained, filler, lengths=[48, 64, 128], depths=[0.0, 0.5, 1.0])
    assert result["prompt_tokens"] == [48] * 3 + [64] * 3 + [128] * 3  # 128 > max_position_embeddings = 64
    assert np.shape(result["grid"]) == (3, 3) and 0 <= result["retrieval"] <= 1
    path = plot_heatmap(result, tmp_path / "needle.png", max_position_embeddings=64)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_runner_on_a_task_file_and_errors(tmp_path, tiny, trained):
    """The runner on a task file, on one device and on a tensor=4 mesh (the tiny model's 2 kv heads repeated) with
    the same scores; a broken task file is an error naming the task."""
    save_pretrained(tiny, tmp_path / "model", layout="internlm2", tokenizer=trained)
    (tmp_path / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": ["yes", "no", "maybe"], "answer": i % 3}) + "\n"
        for i, q in enumerate(["is it red", "is it blue", "is it big", "is it old"])))
    (tmp_path / "suite.json").write_text(json.dumps({"tasks": [
        {"name": "mc", "reader": {"path": "mc.jsonl"}, "rule": "opencompass", "group": "both"},
        {"name": "mc_lm_eval", "reader": {"path": "mc.jsonl"}, "group": "both"}]}))
    run = subprocess.run([sys.executable, "-m", "internlm2_jax.eval", "--checkpoint", str(tmp_path / "model"),
                          "--suite", str(tmp_path / "suite.json"), "--no-progress"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| mc | " in run.stdout and "| mc_lm_eval | " in run.stdout and "accuracy_norm" in run.stdout
    record = json.loads((tmp_path / "model" / "eval" / "results.json").read_text())
    assert [r["task"] for r in record["results"]] == ["mc", "mc_lm_eval"]
    mean = (record["results"][0]["accuracy"] + record["results"][1]["accuracy"]) / 2
    average = [line for line in run.stdout.splitlines() if line.startswith("| **both** (average of 2) |")]
    assert any(line.endswith(f"| accuracy | ppl | {mean:.4f} |") for line in average), run.stdout
    assert record["tokenizer_sha256"] == trained.sha256 and record["git_commit"]
    assert record["mesh"] is None and record["dtype"] == "float32" and "(float32) on one device" in run.stderr
    sharded = subprocess.run([sys.executable, "-m", "internlm2_jax.eval", "--checkpoint", str(tmp_path / "model"),
                              "--suite", str(tmp_path / "suite.json"), "--no-progress", "--output",
                              str(tmp_path / "sharded"), "--cpu-devices", "8", "--mesh", "tensor=4"],
                             capture_output=True, text=True, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    on_mesh = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert on_mesh["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4, "sequence": 1} and on_mesh["dtype"] == "float32"
    assert "on mesh {'data': 1, 'fsdp': 1, 'tensor': 4, 'sequence': 1}" in sharded.stderr  # the memory line
    for got, want in zip(on_mesh["results"], record["results"], strict=True):
        assert [d["prediction"] for d in got["details"]] == [d["prediction"] for d in want["details"]]
        for key in ("logprobs", "mean_loss"):
            np.testing.assert_allclose([d.get(key, []) for d in got["details"]],
                                       [d.get(key, []) for d in want["details"]], atol=1e-4)
    (tmp_path / "broken.json").write_text(json.dumps({"tasks": [{"name": "x", "reader": {}}]}))
    bad = subprocess.run([sys.executable, "-m", "internlm2_jax.eval", "--checkpoint", str(tmp_path / "model"),
                          "--suite", str(tmp_path / "broken.json")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "tasks[0]" in bad.stderr


def test_options_scored_on_their_shared_context_equal_each_pair_scored_alone():
    from types import SimpleNamespace

    from internlm2_jax.decode.scoring import shares_prefix_exactly
    from internlm2_jax.eval.loglikelihood import _score_grouped, _score_one_by_one, choose

    cfg = preset("tiny")
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(4))
    rng = np.random.RandomState(1)
    pairs = []
    for n_options in (4, 4, 2, 3, 1):  # questions with different numbers of options and context lengths
        context = [1, *rng.randint(3, 500, rng.randint(0, 40))]
        pairs += [(context, list(rng.randint(3, 500, rng.randint(1, 7)))) for _ in range(n_options)]
    order = rng.permutation(len(pairs))  # the options of a question need not be adjacent
    pairs = [pairs[i] for i in order]
    no_bar = SimpleNamespace(update=lambda n: None)
    grouped = _score_grouped(model, pairs, 2048, no_bar, True)
    alone = _score_one_by_one(model, pairs, 2048, no_bar, True)
    continuation_only = _score_grouped(model, pairs, 2048, no_bar, False)  # the context's projection skipped
    for a, b, c in zip(grouped, alone, continuation_only, strict=True):
        assert a.tokens == b.tokens == c.tokens and a.greedy == b.greedy == c.greedy
        np.testing.assert_allclose([a.logprob, a.mean_loss, c.logprob], [b.logprob, b.mean_loss, b.logprob],
                                   rtol=1e-5, atol=1e-5)
        assert c.mean_loss is None
    with pytest.raises(ValueError, match="context_loss=True"):
        choose(continuation_only[:2], "opencompass")
    # Beyond max_position_embeddings dynamic NTK takes the base from the whole sequence: no sharing there.
    assert shares_prefix_exactly(cfg, cfg.max_position_embeddings)
    assert not shares_prefix_exactly(cfg, cfg.max_position_embeddings + 1)
    assert shares_prefix_exactly(cfg.replace(rope_scaling=None), 10 * cfg.max_position_embeddings)

