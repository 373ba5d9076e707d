"""Planning a deployment without the hardware: the serving engine's programs compiled ahead of time for abstract
TPU devices (`jax.experimental.topologies`, the `libtpu` package, no TPU), with their per-chip memory.

`plan_deployment` builds a preset's parameters abstractly (bf16 parameters and compute, kv heads repeated up to the
tensor degree as `load_for_decoding` does on a mesh: a repeated-kv model is exactly the GQA model with more kv
heads), places them and a paged KV cache of `sequences x max_model_len` tokens on their shardings over the
topology's chips, and lowers and compiles the engine's own step (`engine_step`, what serving runs) twice: the
largest prefill call (one sequence, `prefill_chunk` tokens) and the decode step of every running sequence at the
widest page table. Nothing runs: the TPU compiler lays the programs out and reports their memory, and refuses a
program that does not fit HBM. What `python -m internlm2_jax.serve --compile-only --topology ...` prints.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from internlm2_jax.config import preset
from internlm2_jax.decode.engine_step import jitted_engine_step
from internlm2_jax.decode.sampling import MAX_BANNED_IDS, SamplingParams
from internlm2_jax.model import model_graphdef
from internlm2_jax.model.kv_cache import sharding_fn
from internlm2_jax.model.kv_heads import kv_head_factor
from internlm2_jax.model.paged_cache import PagedKVCache, init_paged_cache
from internlm2_jax.parallel import MeshConfig, make_mesh, parse_mesh, state_shardings
from internlm2_jax.parallel.topology import memory_report, print_memory_report, topology_hbm, tpu_devices

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Deployment:
    """A preset served on a TPU topology: `sequences` running sequences of up to `max_model_len` tokens each, all
    of them held by the KV cache at once, prompts prefilled `prefill_chunk` tokens per call."""

    preset: str
    topology: str
    mesh: str | None = None  # e.g. "tensor=4" (parse_mesh); default: tensor over every chip
    sequences: int = 16
    max_model_len: int = 32768
    prefill_chunk: int = 2048
    page_size: int = 16
    top_n: int = 20  # the engine's max_top_n
    kv_dtype: str | None = None  # "int8" / "int4": the quantized KV cache (model/kv_quant.py), as --kv-dtype serves

    def mesh_config(self, chips: int) -> MeshConfig:
        return parse_mesh(self.mesh) if self.mesh else MeshConfig(fsdp=1, tensor=chips)


@dataclasses.dataclass
class Plan:
    deployment: Deployment
    mesh_shape: dict[str, int]
    hbm_gib: float | None
    weights_gib: float  # parameters on the fullest chip
    kv_gib: float  # the KV cache on the fullest chip
    kv_factor: int  # how many times each kv head is repeated to split over `tensor`
    # name -> memory_report, or {"error": the compiler's reason, "total_gib" and "usable_gib" read from it}
    programs: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return all(report.get("fits", False) for report in self.programs.values())

    @property
    def peak_gib(self) -> float:
        """The fullest program's per-chip total (as the compiler counted it when it refused the program)."""
        return max(r["total_gib"] for r in self.programs.values())

    def most_sequences(self) -> int:
        """The most sequences of `max_model_len` tokens whose KV cache fits beside the rest of the fullest program
        (weights, activations, code: none of it grows with the cache), in the HBM the compiler said it can use
        (a little under the chip's: 15.75 of v5e's 16 GiB)."""
        usable = min([r["usable_gib"] for r in self.programs.values() if "usable_gib" in r] or [self.hbm_gib])
        per_sequence = self.kv_gib / self.deployment.sequences
        return max(0, math.floor((usable - (self.peak_gib - self.kv_gib)) / per_sequence))


def _placed(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _per_chip_gib(tree) -> float:
    """Bytes of a tree of sharded ShapeDtypeStructs on one chip (the shards of each array are equal)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree)) / GIB


def abstract_model(d: Deployment, mesh):
    """(config, kv head factor, graphdef, parameters as sharded ShapeDtypeStructs) of the preset in bf16."""
    # Unscanned layers, as serving loads them: a scanned stack would also hold a copy of the whole cache.
    cfg = preset(d.preset, param_dtype="bfloat16", dtype="bfloat16")
    factor = kv_head_factor(cfg, dict(mesh.shape)["tensor"])
    cfg = cfg.replace(num_key_value_heads=cfg.num_key_value_heads * factor)
    graphdef, abstract = model_graphdef(cfg)
    return cfg, factor, graphdef, _placed(abstract, state_shardings(abstract, mesh))


def abstract_cache(cfg, d: Deployment, mesh) -> PagedKVCache:
    """The engine's paged cache for `d.sequences` full sequences (plus the null page), on its shardings."""
    num_pages = d.sequences * -(-d.max_model_len // d.page_size) + 1
    cache = jax.eval_shape(lambda: init_paged_cache(cfg, num_pages, d.page_size, kv_dtype=d.kv_dtype))
    to_mesh = sharding_fn(mesh)
    return cache.map_buffers(lambda a, axes: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=to_mesh(a, axes)))


def step_arguments(cfg, d: Deployment, mesh, rows: int, chunk: int) -> tuple:
    """The engine step's arguments after the cache for `rows` x `chunk` tokens at the widest page table, as the
    engine passes them: host arrays and the penalty state, replicated (they are small)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def sds(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    slots = d.sequences + 1  # penalty rows: one per running sequence, and padding rows' scratch
    width = -(-d.max_model_len // d.page_size)
    floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    sampling = SamplingParams(**{f.name: sds((rows,), jnp.float32 if f.name in floats else jnp.int32)
                                 for f in dataclasses.fields(SamplingParams) if f.name not in ("keys", "banned")},
                              keys=sds((rows, 2), jnp.uint32), banned=sds((rows, MAX_BANNED_IDS)))
    # counts, seen, tokens, page_table, lengths, q_lengths, rope_lengths, slots, emit, steps, sampling
    return (sds((slots, cfg.vocab_size)), sds((slots, cfg.vocab_size), jnp.bool_), sds((rows, chunk)),
            sds((rows, width)), sds((rows,)), sds((rows,)), sds((rows,)), sds((rows,)), sds((rows,), jnp.bool_),
            sds((rows,)), sampling)


# The TPU compiler's refusal of a program over HBM, e.g. "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total
# memory required for HLO temporaries (19.90G) exceeds available HBM (15.75G)" (G: GiB, as memory_analysis agrees).
_OUT_OF_HBM = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory on HBM.*?\(([\d.]+)G\).*?available HBM \(([\d.]+)G\)")


def _refusal(error: Exception) -> dict | None:
    """The compiler's reason, the program's total and the usable HBM (GiB) when `error` is a refusal for want of
    HBM; None for any other error (a kernel's scoped VMEM, say: a bug to raise)."""
    first = str(error).strip().splitlines()[0]
    found = _OUT_OF_HBM.search(first)
    return None if found is None else {"error": first, "total_gib": float(found[1]),
                                       "usable_gib": float(found[2])}


def plan_deployment(d: Deployment, devices=None) -> Plan:
    """Compiles `d`'s prefill and decode programs for its topology (or for `devices`) and returns their memory; a
    program the compiler refuses for want of HBM is recorded with the compiler's reason."""
    devices = tpu_devices(d.topology) if devices is None else devices
    mesh = make_mesh(d.mesh_config(len(devices)), devices)
    cfg, factor, graphdef, params = abstract_model(d, mesh)
    cache = abstract_cache(cfg, d, mesh)
    hbm = topology_hbm(d.topology)
    plan = Plan(d, dict(mesh.shape), hbm / GIB if hbm else None, _per_chip_gib(params),
                _per_chip_gib((cache.k, cache.v)), factor)
    step = jitted_engine_step(graphdef)
    calls = {f"prefill step (1 x {d.prefill_chunk} tokens)": (1, d.prefill_chunk),
             f"decode step ({d.sequences} x 1 tokens)": (d.sequences, 1)}
    with jax.set_mesh(mesh):
        for name, (rows, chunk) in calls.items():
            lowered = step.lower(params, cache, *step_arguments(cfg, d, mesh, rows, chunk), top_n=d.top_n)
            try:
                plan.programs[name] = memory_report(lowered.compile(), hbm)
            except jax.errors.JaxRuntimeError as e:
                refusal = _refusal(e)
                if refusal is None:
                    raise
                plan.programs[name] = refusal
    return plan


def print_plan(plan: Plan) -> str:
    """Prints the placement, each program's per-chip memory and the verdict; returns the verdict line."""
    d = plan.deployment
    chips = math.prod(plan.mesh_shape.values())
    repeated = f", kv heads repeated x{plan.kv_factor}" if plan.kv_factor > 1 else ""
    print(f"{d.preset} (bfloat16) on TPU {d.topology}: {chips} chips, mesh {plan.mesh_shape}{repeated}\n"
          f"  weights per chip  {plan.weights_gib:8.3f} GiB\n"
          f"  KV per chip       {plan.kv_gib:8.3f} GiB ({d.sequences} sequences x {d.max_model_len} tokens, pages "
          f"of {d.page_size})", flush=True)
    if plan.hbm_gib is not None:
        print(f"  HBM per chip      {plan.hbm_gib:8.3f} GiB", flush=True)
    for name, report in plan.programs.items():
        if "error" in report:
            print(f"compiled {name} on {d.topology}: refused by the TPU compiler: {report['error']}", flush=True)
        else:
            print_memory_report(report, f"compiled {name} on {d.topology}")
    if plan.hbm_gib is None:
        verdict = f"the HBM of a {d.topology.split(':')[0]} chip is not known here: fit not judged"
    elif plan.fits:
        verdict = f"fits: {d.sequences} sequences of {d.max_model_len} tokens on {d.topology}"
    else:
        verdict = (f"does not fit: {d.sequences} sequences of {d.max_model_len} tokens need {plan.peak_gib:.2f} GiB "
                   f"per chip, over the {plan.hbm_gib:.0f} GiB of HBM; {plan.most_sequences()} such sequences fit "
                   f"on {d.topology} (or use more chips)")
    print(verdict, flush=True)
    return verdict


def compile_only(d: Deployment) -> int:
    """`serve --compile-only`: prints the plan; 0 when it fits (or HBM is unknown), 1 when it does not (with a
    one-line error), 2 for a deployment that cannot be built (a mesh that does not fit the chips, kv heads that do
    not split over `tensor`)."""
    try:
        plan = plan_deployment(d)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdict = print_plan(plan)
    if plan.hbm_gib is not None and not plan.fits:
        print(f"error: {verdict}", file=sys.stderr)
        return 1
    return 0
