"""`python -m internlm2_jax.serve --checkpoint DIR [--port 8000] [options]`: the OpenAI-compatible server.

DIR is a model directory (config.json, safetensors, tokenizer) or an orbax run directory (its latest complete
checkpoint). Binds to 127.0.0.1 unless --host says otherwise; --api-key (or $INTERNLM2_API_KEY) makes /v1/* require
`Authorization: Bearer KEY`. The KV cache is an absolute budget (--kv-budget-tokens or --kv-budget-gb), and
--max-model-len (prompt + completion per request) is independent of the model's max_position_embeddings.
--playground also serves a chat page at / that runs tools, sandboxed Python included, for the browser
(`serve.playground`); on a host other than loopback it needs --api-key.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m internlm2_jax.serve", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", help="a model directory or a run directory (required unless --compile-only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("INTERNLM2_API_KEY"))
    parser.add_argument("--playground", action="store_true",
                        help="serve the browser playground at /: chat with streaming, tool calls run for the page "
                             "(calculator, search_docs, a sandboxed Python session per tab), the raw prompt")
    parser.add_argument("--model-name", help="the id clients send as `model` (default: the directory's name)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--kv-budget-tokens", type=int)
    budget.add_argument("--kv-budget-gb", type=float)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond those (then 429)")
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--cache-dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-dtype", choices=["int8", "int4"],
                        help="store K/V quantized per (token, kv head) with fp32 scales: ~1.9x (int8) or ~3.6x (int4) "
                             "the tokens per GB of the bf16 cache; int8 is near lossless, int4 loses accuracy on "
                             "some models (not with --cache-dtype)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-warmup", action="store_true", help="compile programs on first use, not at start")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--compile-only", action="store_true",
                        help="plan a deployment: compile the engine's largest prefill call (--prefill-chunk tokens) "
                             "and its decode step of --max-running sequences of --max-model-len tokens (the KV cache "
                             "holds all of them) for --topology, print per-chip memory, stop")
    parser.add_argument("--topology", help="with --compile-only: a TPU topology such as v5e:2x2 or v5p:2x2x1 "
                                           "(needs the libtpu package, no TPU)")
    parser.add_argument("--preset", help="with --compile-only: the model preset, e.g. internlm2_7b")
    from internlm2_jax.artifacts import add_placement_arguments, add_weight_arguments

    add_placement_arguments(parser)
    add_weight_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile_only:
        if not (args.topology and args.preset) or args.checkpoint:
            parser.error("--compile-only plans a --preset on a --topology (bf16; no --checkpoint is read)")
        if args.dtype == "float32" or args.int8 or args.int4 or args.cpu_devices is not None:
            parser.error("--compile-only plans bf16 weights on abstract TPU chips: --dtype float32, --int8, --int4 "
                         "and --cpu-devices do not apply")
        from internlm2_jax.decode.deployment import Deployment, compile_only

        return compile_only(Deployment(args.preset, args.topology, mesh=args.mesh, sequences=args.max_running,
                                       max_model_len=args.max_model_len, prefill_chunk=args.prefill_chunk,
                                       page_size=args.page_size, kv_dtype=args.kv_dtype))
    if args.checkpoint is None or args.topology or args.preset:
        parser.error("serving needs --checkpoint; --topology and --preset are for --compile-only")
    if args.playground and not args.api_key and not _loopback(args.host):
        parser.error(f"--playground runs code for whoever reaches the page: on --host {args.host} it needs --api-key "
                     "(or serve on 127.0.0.1)")

    from internlm2_jax.artifacts import (CheckpointMismatch, is_run_directory, load_for_decoding,
                                         placement_from_arguments, placement_summary, quantize_from_arguments)
    from internlm2_jax.chat_template import chat_template_for_directory, get_chat_template
    from internlm2_jax.convert import CheckpointError
    from internlm2_jax.decode.engine import Engine, EngineConfig
    from internlm2_jax.model.paged_cache import bytes_per_token
    from internlm2_jax.paths import absolute

    path = absolute(args.checkpoint)  # local or a URL (gs://...)
    tokens = args.kv_budget_tokens
    if tokens is None and args.kv_budget_gb is None:
        tokens = 8 * args.max_model_len  # room for eight full-length sequences
    config = EngineConfig(max_model_len=args.max_model_len, kv_budget_tokens=tokens, kv_budget_gb=args.kv_budget_gb,
                          page_size=args.page_size, max_running=args.max_running, max_waiting=args.max_waiting,
                          prefill_chunk=args.prefill_chunk, cache_dtype=args.cache_dtype, kv_dtype=args.kv_dtype,
                          prefix_caching=not args.no_prefix_caching)
    try:
        config.validate()
        mesh, dtype = placement_from_arguments(args)
        model, tokenizer = load_for_decoding(path, quantize=quantize_from_arguments(args), mesh=mesh, dtype=dtype)
        print(placement_summary(model), flush=True)
        template = (get_chat_template("internlm2_chat") if is_run_directory(path)
                    else chat_template_for_directory(path))
        engine = Engine(model, tokenizer, config)
    except (CheckpointError, CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    import uvicorn

    from internlm2_jax.serve.app import create_app

    name = args.model_name or path.name
    app = create_app(engine, tokenizer, model_name=name, chat_template=template, api_key=args.api_key,
                     playground=args.playground)
    pages = engine.pool.capacity
    gigabytes = pages * config.page_size * bytes_per_token(engine.model_config, config.cache_dtype,
                                                           config.kv_dtype) / 1e9
    stored = config.kv_dtype or config.cache_dtype or engine.model_config.dtype
    print(f"serving {name!r} on http://{args.host}:{args.port}: KV cache {pages} pages x {config.page_size} tokens "
          f"({gigabytes:.3f} GB, {stored}), max_model_len {config.max_model_len}, up to {config.max_running} "
          f"running + {config.max_waiting} queued", flush=True)
    if config.kv_dtype == "int4":
        print(KV_INT4_WARNING, flush=True)
    if args.playground:
        print(f"playground: http://{args.host}:{args.port}/", flush=True)
    if not args.no_warmup:
        started = time.perf_counter()
        programs = engine.warmup()
        print(f"compiled {programs} programs in {time.perf_counter() - started:.1f} s", flush=True)
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0


# The measured figures are tests/test_kv_quant.py's slow test (a 2-layer model, head_dim 16, trained in the test);
# they bound nothing for a real model.
KV_INT4_WARNING = ("warning: --kv-dtype int4: int4 keys are known to lose accuracy on some models (LMDeploy #2822: a "
                   "math model fell to 0% while int8 stayed lossless); measured on a small trained model: held-out "
                   "perplexity -0.01% (int8 +0.002%), per-token log-probs up to 0.033 nats off (int8 0.003); check "
                   "int4 on your model, or use int8")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


if __name__ == "__main__":
    sys.exit(main())
