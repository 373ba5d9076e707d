"""`python -m internlm2_jax.generate CHECKPOINT --prompt TEXT [--prompt TEXT ...] [--chat] [options]`.

CHECKPOINT is a model directory (config.json, safetensors, tokenizer) or an orbax run directory (its latest complete
checkpoint, with the tokenizer the run was trained with). Prompts are completed as plain text (BOS + text, stopping
at `</s>`), or with `--chat` sent as user messages through the InternLM2 chat template (stopping at `</s>` or
`<|im_end|>`). Prints each completion with its finish reason, and with `--logprobs` its tokens' log-probabilities.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm2_jax.generate", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", help="a model directory or a run directory")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
    parser.add_argument("--chat", action="store_true", help="send each prompt as a user message")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    from internlm2_jax.artifacts import (CheckpointMismatch, add_placement_arguments, add_weight_arguments,
                                         load_for_decoding, placement_from_arguments, placement_summary,
                                         quantize_from_arguments)

    add_placement_arguments(parser)
    add_weight_arguments(parser)
    args = parser.parse_args(argv)

    from internlm2_jax.convert import CheckpointError
    from internlm2_jax.decode import SamplingConfig, generate

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    try:
        sampling.validate()
        mesh, dtype = placement_from_arguments(args)
        model, tokenizer = load_for_decoding(args.checkpoint, quantize=quantize_from_arguments(args), mesh=mesh,
                                             dtype=dtype)
        print(placement_summary(model), file=sys.stderr, flush=True)
        prompts = [[{"role": "user", "content": p}] for p in args.prompt] if args.chat else args.prompt
        completions = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                               stop_strings=args.stop)
    except (CheckpointError, CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prompt, completion in zip(args.prompt, completions, strict=True):
        print(f"### {prompt!r} ({completion.finish_reason}, {len(completion.tokens)} tokens)\n{completion.text}")
        if args.logprobs:
            pieces = [f"{tokenizer.decode([t])!r}:{lp:.3f}" for t, lp in zip(completion.tokens, completion.logprobs,
                                                                             strict=True)]
            print("logprobs: " + " ".join(pieces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
