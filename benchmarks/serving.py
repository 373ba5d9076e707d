"""Continuous batching against static batching on one trace of requests arriving as a Poisson process.

The trace: --requests requests with uniform random prompt and output lengths (greedy, fixed max_tokens each),
arriving at --rate requests/s. Both servers see the same arrivals, in the same process, back to back:
- static batching (the baseline): whenever it is free it takes up to --batch arrived requests, pads them to one
  shape (the trace's longest prompt and output) and runs `generate_ids` until the whole batch is done, as a server on
  HF `generate` does. Its programs are compiled before timing, as ours are (warm-up).
- ours: the continuous-batching engine with the same KV memory, --batch x (longest prompt + longest output) tokens,
  in pages: since a sequence holds only the pages it has filled, that memory runs up to --max-running sequences at
  once (preempting the newest when pages run out), which is the point of paging.
- with --mesh (e.g. data=2,tensor=4), ours again with the model on that mesh, the CPU split into as many devices
  (the one-device rows then run on the first of them): the engine on a mesh, checked like ours; on a CPU the devices
  share its cores, so its speed says nothing about an accelerator mesh.
The table gives completed tokens/s, request latency p50/p99 and time to first token. Then every request's output
is checked against the same request run alone (the engine with one running sequence on one device), with the
conventions' tolerance rule (tokens equal up to the first step where the solo run's top-2 log-prob gap is under
1e-3, log-probs within 1e-4 before it).
Usage: python benchmarks/serving.py [--requests 200] [--rate 20] [--batch 16] [--max-running 64] [--mesh SPEC]
                                    [--quick]
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import split_cpu_for_mesh  # noqa: E402
from flax import nnx  # noqa: E402

from internlm2_jax.config import preset  # noqa: E402
from internlm2_jax.decode import generate_ids  # noqa: E402
from internlm2_jax.decode.engine import Engine, EngineConfig  # noqa: E402
from internlm2_jax.decode.streaming import completion_from_events  # noqa: E402
from internlm2_jax.decode.requests import Request  # noqa: E402
from internlm2_jax.model import InternLM2ForCausalLM  # noqa: E402
from internlm2_jax.model.kv_heads import shard_for_decoding  # noqa: E402
from internlm2_jax.parallel import inference_mesh  # noqa: E402


def make_trace(args, vocab: int):
    rng = np.random.RandomState(args.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
    requests = [Request(tuple(rng.randint(3, vocab, rng.randint(args.prompt[0], args.prompt[1] + 1)).tolist()),
                        int(rng.randint(args.output[0], args.output[1] + 1)), top_n=2)
                for _ in range(args.requests)]
    return arrivals, requests


def run_engine(engine: Engine, arrivals, requests):
    """Replays the trace against the engine; returns (makespan, per-request completions, finish and first-token
    times relative to the start)."""
    events = {}
    first, finish = {}, {}
    start = time.perf_counter()
    submitted = 0
    while submitted < len(requests) or not engine.idle:
        now = time.perf_counter() - start
        while submitted < len(requests) and arrivals[submitted] <= now:
            i = submitted

            def on_event(event, i=i):
                events.setdefault(i, []).append(event)
                first.setdefault(i, time.perf_counter() - start)
                if event.finished:
                    finish[i] = time.perf_counter() - start

            engine.submit(requests[i], on_event)
            submitted += 1
        if not engine.step() and submitted < len(requests):
            time.sleep(max(0.0, arrivals[submitted] - (time.perf_counter() - start)))
    makespan = time.perf_counter() - start
    return makespan, [completion_from_events(events[i]) for i in range(len(requests))], first, finish


def run_static(model, arrivals, requests, batch: int, cache_dtype=None):
    """The static-batching server: one fixed shape per batch, every batch runs until its last row is done."""
    max_new = max(r.max_new_tokens for r in requests)

    def call(prompts):
        rows = [list(p) for p in prompts] + [[3]] * (batch - len(prompts))  # a short batch is padded to the shape
        return generate_ids(model, rows, max_new_tokens=max_new, chunk=64, cache_dtype=cache_dtype)[:len(prompts)]

    # Warm-up: generate_ids pads prompts to a power of two (>= 16); compile every such length the trace can hit.
    longest = max(len(r.prompt_ids) for r in requests)
    for size in sorted({max(16, 1 << (n - 1).bit_length()) for n in range(1, longest + 1)}):
        call([[3] * size])
    finish = {}
    start = time.perf_counter()
    done = 0
    while done < len(requests):
        now = time.perf_counter() - start
        if arrivals[done] > now:
            time.sleep(arrivals[done] - now)
            now = time.perf_counter() - start
        ready = [i for i in range(done, min(done + batch, len(requests))) if arrivals[i] <= now]
        call([requests[i].prompt_ids for i in ready])
        for i in ready:
            finish[i] = time.perf_counter() - start
        done += len(ready)
    return time.perf_counter() - start, finish


def check_against_solo(model, requests, completions, cache_dtype=None) -> tuple[int, int]:
    """(requests equal to their solo run under the tolerance rule, tokens compared before a near tie)."""
    alone = Engine(model, None, EngineConfig(max_model_len=4096, kv_budget_tokens=8192, max_running=1,
                                             cache_dtype=cache_dtype))
    good, compared = 0, 0
    for request, got in zip(requests, completions, strict=True):
        ref = alone.generate([request])[0]
        ok, tie = True, False
        for step, token in enumerate(ref.tokens):
            top = sorted(ref.top_logprobs[step].values())
            if top[1] - top[0] < 1e-3:
                tie = True
                break
            if step >= len(got.tokens) or got.tokens[step] != token or \
                    abs(got.logprobs[step] - ref.logprobs[step]) > 1e-4:
                ok = False
                break
            compared += 1
        good += ok and (tie or got.tokens == ref.tokens)
    return good, compared


def on_mesh(model, spec: str):
    """`model` placed on the mesh `spec` (first devices), its kv heads fitted to the tensor degree, as
    `load_for_decoding` places a served model."""
    return shard_for_decoding(model, inference_mesh(spec))


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--prompt", type=int, nargs=2, default=[8, 256], help="prompt length range")
    parser.add_argument("--output", type=int, nargs=2, default=[8, 256], help="max_tokens range")
    parser.add_argument("--batch", type=int, default=16, help="static batch; KV memory of both servers")
    parser.add_argument("--max-running", type=int, default=64, help="the engine's running sequences")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the engine's prompt tokens per prefill call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dtype", choices=["float32", "bfloat16"], help="KV cache dtype of both servers "
                        "(default: the model's compute dtype)")
    parser.add_argument("--no-check", action="store_true", help="skip the check against solo runs")
    parser.add_argument("--mesh", help="also run the engine with the model on this mesh, e.g. data=2,tensor=4 "
                                       "(the CPU is split into as many devices)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 24 short requests: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.requests, args.prompt, args.output, args.batch, args.max_running = \
            "tiny", 24, [2, 40], [2, 24], 4, 8
    if args.mesh:  # before anything starts JAX's backends
        split_cpu_for_mesh(parser, args.mesh)
    cfg = preset(args.preset)
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    arrivals, requests = make_trace(args, cfg.vocab_size)
    max_len = args.prompt[1] + args.output[1]
    config = EngineConfig(max_model_len=max_len, kv_budget_tokens=args.batch * max_len,
                          max_running=args.max_running, prefill_chunk=args.prefill_chunk if not args.quick else 32,
                          cache_dtype=args.cache_dtype)
    engine = Engine(model, None, config)
    started = time.perf_counter()
    programs = engine.warmup()
    warmup = time.perf_counter() - started
    makespan, completions, first, finish = run_engine(engine, arrivals, requests)
    if args.mesh:
        sharded = Engine(on_mesh(model, args.mesh), None, config)
        started = time.perf_counter()
        sharded_programs = sharded.warmup()
        sharded_warmup = time.perf_counter() - started
        mesh_makespan, mesh_completions, mesh_first, mesh_finish = run_engine(sharded, arrivals, requests)
    static_makespan, static_finish = run_static(model, arrivals, requests, args.batch, args.cache_dtype)

    tokens = sum(len(c.tokens) for c in completions)
    print(f"{args.requests} requests, Poisson {args.rate}/s, prompts {args.prompt[0]}-{args.prompt[1]}, outputs "
          f"{args.output[0]}-{args.output[1]} tokens ({tokens} in all), preset {args.preset} "
          f"({cfg.dtype}, KV cache {args.cache_dtype or cfg.dtype}); static batch {args.batch}, KV memory "
          f"{args.batch * max_len} tokens for both, engine up to "
          f"{args.max_running} running; {platform.node()} ({os.cpu_count()} cores, "
          f"{jax.devices()[0].platform} x {jax.device_count()}), {time.strftime('%Y-%m-%d')}")
    print(f"engine warm-up: {programs} programs in {warmup:.1f} s; stats {engine.stats()}")
    if args.mesh:
        print(f"engine on mesh {args.mesh} warm-up: {sharded_programs} programs in {sharded_warmup:.1f} s; "
              f"stats {sharded.stats()}")
    print()
    latency = [finish[i] - arrivals[i] for i in range(len(requests))]
    static_latency = [static_finish[i] - arrivals[i] for i in range(len(requests))]
    ttft = [first[i] - arrivals[i] for i in range(len(requests))]
    print("| server | makespan s | tokens/s | vs static | latency p50 s | latency p99 s | first token p50 s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| static batching (baseline) | {static_makespan:.1f} | {tokens / static_makespan:.0f} | 1.00x | "
          f"{percentile(static_latency, 50):.2f} | {percentile(static_latency, 99):.2f} | "
          f"{percentile(static_latency, 50):.2f} |")
    engine_row("continuous batching (ours)", makespan, tokens, static_makespan, latency, ttft)
    if args.mesh:
        engine_row(f"continuous batching on mesh {args.mesh} ({jax.device_count()} CPU devices)", mesh_makespan,
                   sum(len(c.tokens) for c in mesh_completions), static_makespan,
                   [mesh_finish[i] - arrivals[i] for i in range(len(requests))],
                   [mesh_first[i] - arrivals[i] for i in range(len(requests))])
    if not args.no_check:
        print()
        for name, outputs in [("", completions), *([(f" (mesh {args.mesh})", mesh_completions)] if args.mesh
                                                    else [])]:
            good, compared = check_against_solo(model, requests, outputs, args.cache_dtype)
            print(f"equal to the same request run alone{name}: {good}/{len(requests)} requests "
                  f"({compared} tokens compared before a near tie)")


def engine_row(name, makespan, tokens, static_makespan, latency, ttft):
    print(f"| {name} | {makespan:.1f} | {tokens / makespan:.0f} | {static_makespan / makespan:.2f}x | "
          f"{percentile(latency, 50):.2f} | {percentile(latency, 99):.2f} | {statistics.median(ttft):.2f} |")


if __name__ == "__main__":
    main()
