"""Multiple-choice evaluation speed: ours (PPL inferencer, lm-eval's rule) against lm-eval's HF backend on the same
exported model and the same local task, in the same process, back to back.

The model: the bench shape (H512 L8 NH8 KV2 I1536) with a small trained tokenizer's vocabulary, random weights,
exported in the Llama layout with its HF tokenizer files; the task: --questions 4-option questions with few-shot
style contexts of about --context words. The table gives questions/s (median of --runs after a warm-up run, which
for ours includes compiling) and checks that both pick the same options. `--quick` is a smoke test (tiny model).
Usage: python benchmarks/eval_throughput.py [--questions 200] [--context 150] [--runs 2] [--quick]
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from bench_common import median_seconds  # noqa: E402
from flax import nnx  # noqa: E402

from internlm2_jax.config import preset  # noqa: E402
from internlm2_jax.convert import load_pretrained, save_pretrained  # noqa: E402
from internlm2_jax.data.corpus import stdlib_corpus  # noqa: E402
from internlm2_jax.eval.tasks import Prompt, Reader, Task, run_ppl  # noqa: E402
from internlm2_jax.model import InternLM2ForCausalLM  # noqa: E402
from internlm2_jax.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_eval_lm_eval_parity import WORDS, write_task  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--context", type=int, default=150, help="words of context per question")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.context, args.runs = 8, 20, 1
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    texts = (doc.text for doc in stdlib_corpus(max_bytes=3_000_000))
    tokenizer = train_tokenizer(texts, 4096, output_path=root / "tok.model")
    cfg = preset("tiny" if args.quick else "bench", vocab_size=tokenizer.vocab_size, max_position_embeddings=4096)
    save_pretrained(InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(0)), root / "model", layout="llama",
                    tokenizer=tokenizer)
    rng = np.random.RandomState(0)
    rows = [{"question": " ".join(rng.choice(WORDS, args.context)),
             "choices": [" ".join(rng.choice(WORDS, rng.randint(1, 6))) for _ in range(4)],
             "answer": int(rng.randint(4))} for _ in range(args.questions)]
    data = write_task(root, rows)

    lm = HFLM(pretrained=str(root / "model"), dtype="float32", add_bos_token=True, batch_size=16, device="cpu")
    manager = TaskManager(include_path=str(root / "tasks"))
    theirs = {}

    def run_theirs():
        out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager, log_samples=True)
        theirs["samples"] = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])

    _, model = load_pretrained(root / "model")
    task = Task("tiny_mc", Reader(str(data)), Prompt(bos=True))
    ours = {}

    def run_ours():
        ours.update(run_ppl(model, Tokenizer.from_pretrained(root / "model"), task))

    started = time.perf_counter()
    run_ours()
    first = time.perf_counter() - started
    ours_s = median_seconds(run_ours, args.runs)
    theirs_s = median_seconds(run_theirs, args.runs)
    same = sum(d["prediction"] == int(np.argmax([r[0][0] for r in s["resps"]]))
               for d, s in zip(ours["details"], theirs["samples"], strict=True))
    print(f"{args.questions} questions x 4 options, ~{args.context}-word contexts; preset "
          f"{'tiny' if args.quick else 'bench'} fp32, vocab {tokenizer.vocab_size}; {platform.node()} "
          f"({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}\n")
    print("| harness | seconds | questions/s | vs lm-eval |")
    print("|---|---:|---:|---:|")
    print(f"| lm-eval 0.4 HF backend, batch 16 (baseline) | {theirs_s:.2f} | {args.questions / theirs_s:.1f} | "
          f"1.00x |")
    print(f"| ours, PPL inferencer (warm) | {ours_s:.2f} | {args.questions / ours_s:.1f} | "
          f"{theirs_s / ours_s:.2f}x |")
    print(f"| ours, first run (compiling included) | {first:.2f} | {args.questions / first:.1f} | "
          f"{theirs_s / first:.2f}x |")
    print(f"\nsame predictions: {same}/{args.questions}")


if __name__ == "__main__":
    main()
