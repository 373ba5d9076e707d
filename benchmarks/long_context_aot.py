"""The 7B long-context train step compiled ahead of time by the TPU compiler (libtpu, abstract chips, no TPU): per-chip
memory for each context length, mesh and context-parallel strategy, and compiled FLOPs per token.

Each case is the real step of `experiments/internlm2_7b_long_context.py` (scanned layers, remat "full", bf16,
Mosaic flash attention, a 4M-token batch) with `--set`-style overrides, compiled as `launch --compile-only
--topology` compiles it (`launch.compile_train_step`). A case whose rows do not split over the mesh must be refused
before compiling (`LayoutError`). Without `--case` every case runs in its own subprocess (a 7B compile takes minutes
and about 2 GiB of host memory) and a markdown table is printed.

`--flops`: compiled FLOPs per token. `compiled.cost_analysis()["flops"]` is the per-device count of the partitioned
program, but the TPU cost model counts a while loop's body once (the scanned layer stack, the chunked loss) and
counts nothing for a Mosaic kernel (the flash attention custom calls carry no cost estimate). So the probes compile
the 7B-wide step unscanned with 1 and 2 layers and one loss chunk per shard on 4 chips; the per-layer difference
times 32 plus the rest is the step's XLA FLOPs per token (remat recompute included), and the causal attention
FLOPs 6*S*h*L per token (forward and backward) are added analytically, in their own column.

Usage: python benchmarks/long_context_aot.py [--case NAME ...] [--topology v5p:4x4x4] [--set a.b=v ...] [--flops]
           [--json rows.jsonl] [--table rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "internlm2_7b_long_context.py"
BATCH_TOKENS = 4 * 1024 * 1024
K = 1024

# name -> (seq_len, fsdp, sequence, strategy, expectation): a 4M-token batch on 64 v5p chips (v5p:4x4x4).
CASES = {
    "4k-fsdp64": (4 * K, 64, 1, "all_gather", "fits"),
    "32k-fsdp64": (32 * K, 64, 1, "all_gather", "fits"),
    "32k-fsdp32-seq2-all_gather": (32 * K, 32, 2, "all_gather", "fits"),
    "32k-fsdp32-seq2-ulysses": (32 * K, 32, 2, "ulysses", "fits"),
    "128k-fsdp64": (128 * K, 64, 1, "all_gather", "refused"),
    "128k-fsdp32-seq2-all_gather": (128 * K, 32, 2, "all_gather", "fits"),
    "128k-fsdp32-seq2-ulysses": (128 * K, 32, 2, "ulysses", "fits"),
    "128k-fsdp16-seq4-all_gather": (128 * K, 16, 4, "all_gather", "fits"),
    "128k-fsdp16-seq4-ulysses": (128 * K, 16, 4, "ulysses", "fits"),
    "128k-fsdp8-seq8-ulysses": (128 * K, 8, 8, "ulysses", "fits"),
    "256k-fsdp16-seq4-all_gather": (256 * K, 16, 4, "all_gather", "fits"),
    "256k-fsdp8-seq8-ulysses": (256 * K, 8, 8, "ulysses", "fits"),
}

# --flops probes: context -> the overrides of a 4-chip (v5p:2x2x1) step with one loss chunk per shard. 128K puts
# the row over 4 sequence shards (one row's fp32 logits, 48 GiB, would not fit one chip).
PROBE_TOPOLOGY = "v5p:2x2x1"
PROBES = {
    4 * K: ["train.batch_size=4", "mesh.fsdp=4", "mesh.sequence=1", f"step.loss_chunk_size={4 * K}"],
    32 * K: ["train.batch_size=4", "mesh.fsdp=4", "mesh.sequence=1", f"step.loss_chunk_size={32 * K}"],
    128 * K: ["train.batch_size=1", "mesh.fsdp=1", "mesh.sequence=4", f"step.loss_chunk_size={32 * K}"],
}


def case_overrides(name: str) -> list[str]:
    seq, fsdp, sequence, strategy, _ = CASES[name]
    return [f"train.seq_len={seq}", f"train.batch_size={BATCH_TOKENS // seq}", f"model.max_position_embeddings={seq}",
            "mesh.data=1", "mesh.tensor=1", f"mesh.fsdp={fsdp}", f"mesh.sequence={sequence}",
            f"model.context_parallel={strategy}"]


def compiled_flops(compiled) -> float | None:
    """Per-device FLOPs of a compiled program (`cost_analysis()` is a dict, or a list of one, by jax version)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def compile_step(overrides: list[str], topology: str) -> dict:
    """The long-context experiment with `overrides`, compiled for `topology`: a row (status "compiled", "refused"
    for a LayoutError, or "error"), with per-chip memory and per-device FLOPs when compiled."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles may hold libtpu's lock
    from internlm2_jax.experiment import load_experiment
    from internlm2_jax.launch import compile_train_step
    from internlm2_jax.overrides import apply_overrides
    from internlm2_jax.parallel.topology import memory_report, topology_hbm, tpu_devices
    from internlm2_jax.train.layout_checks import LayoutError

    exp = apply_overrides(load_experiment(EXPERIMENT).config(), overrides)
    devices = tpu_devices(topology)
    row = {"topology": topology, "chips": len(devices), "seq_len": exp.train.seq_len, "rows": exp.train.batch_size,
           "fsdp": exp.mesh.fsdp, "sequence": exp.mesh.sequence, "strategy": exp.model.context_parallel,
           "layers": exp.model.num_hidden_layers, "hidden": exp.model.hidden_size}
    start = time.perf_counter()
    try:
        compiled = compile_train_step(exp, devices)
    except LayoutError as e:
        return row | {"status": "refused", "message": str(e), "seconds": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - over HBM (RESOURCE_EXHAUSTED) or a compiler error: the row says
        return row | {"status": "error", "message": f"{type(e).__name__}: {str(e).strip()[:2000]}",
                      "seconds": time.perf_counter() - start}
    flops = compiled_flops(compiled)
    return row | memory_report(compiled, topology_hbm(topology)) | {
        "status": "compiled", "seconds": time.perf_counter() - start,
        "flops_per_device": flops,  # the loop bodies (scanned layers, loss chunks) counted once: see --flops
        "mosaic_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"')}


def run_case(name: str, topology: str = "v5p:4x4x4", extra=()) -> dict:
    """One case of CASES (with `extra` overrides after its own), compiled in this process."""
    return {"case": name, "expect": CASES[name][4]} | compile_step(case_overrides(name) + list(extra), topology)


def run_probe(seq: int, layers: int) -> dict:
    """One --flops probe: the 7B-wide step at `seq`, `layers` unscanned layers, on PROBE_TOPOLOGY."""
    row = compile_step([f"train.seq_len={seq}", f"model.max_position_embeddings={seq}", "model.scan_layers=false",
                        f"model.num_hidden_layers={layers}", *PROBES[seq]], PROBE_TOPOLOGY)
    if row["status"] == "compiled":
        row["flops_per_token"] = row["flops_per_device"] * row["chips"] / (row["rows"] * seq)
    return {"probe": f"{seq // K}k-L{layers}"} | row


def markdown(rows: list[dict]) -> str:
    lines = ["| context | rows | mesh | strategy | arguments | temporaries | total per chip | HBM | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = f"fsdp {r['fsdp']}" + (f" x seq {r['sequence']}" if r["sequence"] > 1 else "")
        strategy = r["strategy"] if r["sequence"] > 1 else "-"
        head = f"| {r['seq_len'] // K}K | {r['rows']} | {mesh} | {strategy} |"
        if r["status"] == "compiled":
            lines.append(f"{head} {r['arguments_gib']:.2f} GiB | {r['temporaries_gib']:.1f} GiB | "
                         f"{r['total_gib']:.1f} GiB | {r['hbm_gib']:.0f} GiB | {'yes' if r['fits'] else 'no'} |")
        elif r["status"] == "refused":
            lines.append(f"{head} - | - | - | - | refused before compiling (`LayoutError`: use mesh.sequence) |")
        else:
            over = "RESOURCE_EXHAUSTED" in r.get("message", "")
            lines.append(f"{head} - | - | - | - | {'no (over HBM)' if over else 'compile error'} |")
    return "\n".join(lines)


def flops_table(probes: dict[str, dict], layers: int = 32, hidden: int = 4096, params: int = 7_737_708_544) -> str:
    """GFLOPs per token from the probes: XLA's count extrapolated to `layers`, plus analytic attention."""
    lines = ["| context | XLA per layer | XLA, 32 layers (remat, no attention) | attention 6·S·h·L | "
             "XLA + attention | 6N + 6·S·h·L |", "|---|---|---|---|---|---|"]
    for seq in PROBES:
        one, two = probes.get(f"{seq // K}k-L1"), probes.get(f"{seq // K}k-L2")
        if not (one and two and "flops_per_token" in one and "flops_per_token" in two):
            lines.append(f"| {seq // K}K | probe failed | | | | |")
            continue
        per_layer = two["flops_per_token"] - one["flops_per_token"]
        step = one["flops_per_token"] + (layers - 1) * per_layer
        attention = 6 * seq * hidden * layers
        lines.append(f"| {seq // K}K | {per_layer / 1e9:.3f} | {step / 1e9:.1f} | {attention / 1e9:.1f} | "
                     f"{(step + attention) / 1e9:.1f} | {(6 * params + attention) / 1e9:.1f} |")
    return "\n".join(lines)


def _subprocess(args: list[str], timeout: float, key: str) -> dict:
    command = [sys.executable, __file__, *args, "--in-process"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "message": f"timed out after {timeout} s"}
    found = [line for line in done.stdout.splitlines() if line.startswith(key + " ")]
    return json.loads(found[-1][len(key) + 1:]) if found else {"status": "error", "message": done.stderr[-2000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run these cases (default: all)")
    parser.add_argument("--topology", default="v5p:4x4x4")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="extra override for every case, e.g. --set model.num_hidden_layers=2")
    parser.add_argument("--flops", action="store_true", help="compiled FLOPs per token at 4K/32K/128K (probes)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # "SEQ:LAYERS", one --flops probe
    parser.add_argument("--json", type=Path, help="append each row to this JSON-lines file")
    parser.add_argument("--table", type=Path, help="print the markdown table of a --json file's rows, in CASES order")
    parser.add_argument("--in-process", action="store_true", help="compile here, not in a subprocess per case")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case in its subprocess")
    args = parser.parse_args(argv)

    def record(key: str, row: dict) -> None:
        print(f"{key} " + json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if args.table:
        found = {}
        for line in args.table.read_text().splitlines():
            row = json.loads(line)
            key = row.get("case") or row.get("probe")
            if key and (row["status"] != "error" or key not in found):  # the last run that did not fail
                found[key] = row
        print(markdown([found[name] for name in CASES if name in found]))
        probes = {k: v for k, v in found.items() if k.endswith(("-L1", "-L2"))}
        if probes:
            print("\n" + flops_table(probes))
        return 0
    if args.probe:
        seq, layers = map(int, args.probe.split(":"))
        record("PROBE", run_probe(seq, layers))
        return 0
    if args.flops:
        probes = {}
        for seq in PROBES:
            for layers in (1, 2):
                row = ({"probe": f"{seq // K}k-L{layers}"} |
                       _subprocess(["--probe", f"{seq}:{layers}"], args.timeout, "PROBE"))
                probes[row["probe"]] = row
                record("PROBE", row)
        print(flops_table(probes))
        report_errors(probes.values(), "probe")
        return 0 if all(r["status"] == "compiled" for r in probes.values()) else 1

    rows = []
    for name in args.case or list(CASES):
        if args.in_process:
            row = run_case(name, args.topology, args.set)
        else:
            row = {"case": name, "expect": CASES[name][4]} | _static(name) | _subprocess(
                ["--case", name, "--topology", args.topology, *[f"--set={s}" for s in args.set]], args.timeout, "ROW")
        rows.append(row)
        record("ROW", row)
    if not args.in_process or len(rows) > 1:
        print(markdown(rows))
    report_errors(rows, "case")
    return 0 if all(r["status"] == ("refused" if r["expect"] == "refused" else "compiled") for r in rows) else 1


def report_errors(rows, key: str) -> None:
    """A failed compile is a row of the table ("compile error"); its error goes to stderr whole."""
    for row in rows:
        if row["status"] == "error":
            print(f"{row[key]}: {row['message']}", file=sys.stderr)


def _static(name: str) -> dict:
    seq, fsdp, sequence, strategy, _ = CASES[name]
    return {"seq_len": seq, "rows": BATCH_TOKENS // seq, "fsdp": fsdp, "sequence": sequence, "strategy": strategy}


if __name__ == "__main__":
    sys.exit(main())
