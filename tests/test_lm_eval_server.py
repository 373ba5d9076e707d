"""A harness we did not write, through our server: lm-eval's `local-completions` model scores a held-out local
multiple-choice task against `python -m internlm2_jax.serve` (one device, and a `tensor=4` mesh over 4 CPU devices)
and gets the same per-choice log-likelihoods as lm-eval's HF backend on the exported directory (within 1e-3,
identical predictions), as a new user would run it: the README's `--model_args`, `add_bos_token=True` included.

lm-eval's API models send token-id prompts without BOS unless told otherwise, while its HF backend adds the
tokenizer's BOS: without `add_bos_token=True` the scores differ (asserted below, so the trap stays documented).
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.model import InternLM2ForCausalLM
from serve_testing import running_server

lm_eval = pytest.importorskip("lm_eval")


README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
NAME = "tiny-served"
WORDS = ("north south east west morning evening apple pear river lake stone wood quick quiet tall short "
         "opens closes carries follows bright pale").split()
SERVERS = {"one_device": [], "tensor4": ["--cpu-devices", "4", "--mesh", "tensor=4"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained, monkeypatch_module):
    """A tiny model in the Llama layout with its HF tokenizer files, and a 12-question task lm-eval has not seen."""
    root = tmp_path_factory.mktemp("lm_eval_server")
    cfg = preset("tiny", vocab_size=trained.vocab_size, max_position_embeddings=512, initializer_range=0.08)
    save_pretrained(InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(11)), root / NAME, layout="llama", tokenizer=trained)
    rng = np.random.RandomState(1)
    rows = [{"q": " ".join(rng.choice(WORDS, rng.randint(3, 9))),
             "options": [" ".join(rng.choice(WORDS, rng.randint(1, 4))) for _ in range(3)],
             "label": int(rng.randint(3))} for _ in range(12)]
    (root / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "held_out_mc.yaml").write_text(
        "task: held_out_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'held_out.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Q: {{q}}\\nA:\"\n"
        "doc_to_choice: \"{{options}}\"\n"
        "doc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n")
    # Offline, as the harness is used here: the task and the tokenizer are local files.
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def evaluate(root, model: str, model_args: str) -> list[list[float]]:
    """Per-choice log-likelihoods of each document, in document order."""
    from lm_eval.tasks import TaskManager

    # Without lm-eval's built-in tasks: indexing them takes about 17 s per call here, and none is used.
    tasks = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["held_out_mc"], task_manager=tasks,
                                  batch_size=1, device="cpu", log_samples=True)
    samples = sorted(out["samples"]["held_out_mc"], key=lambda s: s["doc_id"])
    return [[resp[0][0] for resp in sample["resps"]] for sample in samples]


@pytest.fixture(scope="module")
def hf_scores(exported):
    return evaluate(exported, "hf", f"pretrained={exported / NAME},dtype=float32")


@pytest.fixture(scope="module")
def server(request, exported):
    """`python -m internlm2_jax.serve` in a subprocess (it can hang in native code: a timeout fails the test), with
    the flags of `SERVERS[request.param]`. Programs compile on first use (--no-warmup): lm-eval's one-token requests
    need a few of the engine's shapes, and compiling all of them first took longer than this whole test."""
    with running_server(exported / NAME, exported / f"server_{request.param}.log", "--max-model-len", 128,
                        "--kv-budget-tokens", 2048, "--max-running", 4, "--prefill-chunk", 64, "--log-level",
                        "warning", "--no-warmup", *SERVERS[request.param]) as (base, _):
        yield base


def served_args(exported, base: str, **changes) -> str:
    """The README's `--model_args` for `local-completions`, pointed at this server and directory (one retry only:
    a failing request fails the test rather than backing off)."""
    found = re.search(r"lm-eval run --model local-completions .*?--model_args[\s\\]+(\S+)", README, flags=re.S)
    assert found, "the README shows no `lm-eval run --model local-completions ... --model_args ...` command"
    args = dict(pair.split("=", 1) for pair in found[1].split(","))
    assert {"base_url", "model", "tokenizer"} <= args.keys(), found[1]
    args.update(base_url=f"{base}/v1/completions", model=NAME, tokenizer=str(exported / NAME), max_retries="1",
                **changes)
    return ",".join(f"{key}={value}" for key, value in args.items())


@pytest.mark.parametrize("server", list(SERVERS), indirect=True)
def test_local_completions_through_our_server_scores_as_the_hf_backend(exported, hf_scores, server):
    served = evaluate(exported, "local-completions", served_args(exported, server))
    assert len(served) == len(hf_scores) == 12
    np.testing.assert_allclose(served, hf_scores, atol=1e-3)
    assert [int(np.argmax(s)) for s in served] == [int(np.argmax(h)) for h in hf_scores]


@pytest.mark.parametrize("server", ["one_device"], indirect=True)  # the client's trap, whatever the placement
def test_without_add_bos_token_the_scores_differ(exported, hf_scores, server):
    served = evaluate(exported, "local-completions", served_args(exported, server, add_bos_token="False"))
    assert np.abs(np.asarray(served) - np.asarray(hf_scores)).max() > 0.1  # lm-eval's API models send no BOS
