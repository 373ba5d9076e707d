"""Same scores as a harness we did not write: a tiny model exported in the Llama layout (with its HF tokenizer files)
is scored on a local multiple-choice task by lm-eval (HF backend, a custom task) and by ours under lm-eval's rule:
identical predictions, per-choice log-likelihoods within 1e-3."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.convert import load_pretrained, save_pretrained
from internlm2_jax.eval.tasks import Prompt, Reader, Task, run_ppl
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.tokenizer import Tokenizer

WORDS = ("red green blue cat dog bird runs sleeps jumps small big old new fast slow tree house river stone "
         "light dark warm cold sings reads").split()


def write_task(root, rows):
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return data


def test_multiple_choice_scores_match_lm_eval(tmp_path, trained, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = preset("tiny", vocab_size=trained.vocab_size, max_position_embeddings=512, initializer_range=0.08)
    save_pretrained(InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(7)), tmp_path / "model", layout="llama",
                    tokenizer=trained)
    rng = np.random.RandomState(0)
    rows = [{"question": " ".join(rng.choice(WORDS, rng.randint(3, 9))),
             "choices": [" ".join(rng.choice(WORDS, rng.randint(1, 4))) for _ in range(4)],
             "answer": int(rng.randint(4))} for _ in range(16)]
    data = write_task(tmp_path, rows)

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'model'},dtype=float32,"
                                                         "add_bos_token=True", tasks=["tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), batch_size=8,
                                  device="cpu", log_samples=True)
    theirs = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])

    _, model = load_pretrained(tmp_path / "model")
    ours = run_ppl(model, Tokenizer.from_pretrained(tmp_path / "model"),
                   Task("tiny_mc", Reader(str(data)), Prompt(continuation=" {choice}", bos=True), rule="lm_eval"))
    assert len(theirs) == len(ours["details"]) == len(rows)
    for sample, mine in zip(theirs, ours["details"], strict=True):
        their_ll = [resp[0][0] for resp in sample["resps"]]
        np.testing.assert_allclose(mine["logprobs"], their_ll, atol=1e-3)
        assert mine["greedy"] == [bool(resp[0][1]) for resp in sample["resps"]]
        assert mine["prediction"] == int(np.argmax(their_ll))
    metrics = out["results"]["tiny_mc"]
    assert ours["accuracy"] == pytest.approx(metrics["acc,none"])
    assert ours["accuracy_norm"] == pytest.approx(metrics["acc_norm,none"])
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
