"""Greedy decode speed with the static KV cache: ours against transformers' `generate` on the same weights.

Both generate exactly --new tokens after a --prompt-token prompt for each of --batch rows (greedy, KV cache), in the
same process, back to back; the table gives the median wall time of --runs calls after a warm-up (compilation
excluded), new tokens/s, and the ratio to transformers. Default: the 57.7M bench shape (V32768 H512 L8 NH8 KV2
I1536) in fp32 on CPU at batch 1 and 16, then the same weights as bf16 and as int8 (weight-only, per-channel
scales; on CPU through the C++ kernel of `kernels/int8_matmul.py`). On a GPU: `--preset internlm2_1_8b --dtype
bfloat16 --no-torch` (the lent machines carry jax but not necessarily torch); `--quick` is a tiny smoke test of the
script on CPU.
`--mesh data=2,tensor=4` adds our row with the model on that mesh (the CPU split into 8 devices sharing its cores:
correctness, not a speed that means anything for an accelerator mesh).
Usage: python benchmarks/decode.py [--batch 1 16] [--prompt 128] [--new 128] [--runs 3] [--quick] [--mesh SPEC]
"""

import argparse
import os
import platform
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import median_seconds, split_cpu_for_mesh  # noqa: E402
from flax import nnx  # noqa: E402

from internlm2_jax.config import preset  # noqa: E402
from internlm2_jax.convert import load_pretrained, save_pretrained  # noqa: E402
from internlm2_jax.decode import generate_ids  # noqa: E402
from internlm2_jax.model import InternLM2ForCausalLM  # noqa: E402
from internlm2_jax.model.kv_heads import shard_for_decoding  # noqa: E402
from internlm2_jax.model.quantize import quantize_int8  # noqa: E402
from internlm2_jax.parallel import inference_mesh  # noqa: E402


def ours(model, prompts: np.ndarray, new: int, runs: int) -> tuple[float, list[list[int]]]:
    graphdef, params = nnx.split(model)
    out = []

    def call():
        out[:] = [c.tokens for c in generate_ids((graphdef, params), prompts.tolist(), max_new_tokens=new, chunk=64)]

    return median_seconds(call, runs), out


def transformers_generate(path, prompts: np.ndarray, new: int, runs: int) -> tuple[float, list[list[int]]]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    x = torch.tensor(prompts)
    out = []

    def call():
        with torch.inference_mode():
            seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        out[:] = seq[:, prompts.shape[1]:].tolist()

    return median_seconds(call, runs), out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    """How many new tokens match the reference's before each row's first difference (lower-precision weights
    drift from fp32 at the first near tie of random weights)."""
    same = [next((i for i, (a, b) in enumerate(zip(row, ref, strict=False)) if a != b), len(ref)) for row, ref in
            zip(tokens, reference, strict=True)]
    return f"{sum(same)}/{sum(len(r) for r in reference)} tokens before a difference"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="ours only (a GPU machine without torch)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, batch 2, 8+8 tokens: a smoke test")
    parser.add_argument("--mesh", help="also ours with the model on this mesh, e.g. data=2,tensor=4 (the CPU is "
                                       "split into as many devices; the other rows run on the first)")
    args = parser.parse_args()
    if args.mesh:  # before anything starts JAX's backends
        split_cpu_for_mesh(parser, args.mesh)
    if args.quick:
        args.preset, args.batch, args.prompt, args.new, args.runs = "tiny", [2], 8, 8, 1
    cfg = preset(args.preset, dtype=args.dtype, max_position_embeddings=max(args.prompt + args.new, 64))
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    print(f"greedy decode, {args.preset} ({cfg.num_params() / 1e6:.1f}M) {args.dtype}, prompt {args.prompt} + "
          f"{args.new} new tokens, {jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cores), "
          f"median of {args.runs}")
    print("| batch | implementation | seconds | new tokens/s | vs transformers | same tokens |")
    print("|---:|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_torch:
            save_pretrained(model, tmp, layout="llama", dtype="float32")
        for batch in args.batch:
            prompts = np.random.RandomState(batch).randint(3, cfg.vocab_size, (batch, args.prompt)).astype(np.int32)
            ours_s, ours_tokens = ours(model, prompts, args.new, args.runs)
            rows = [(f"ours (jax, static KV cache, {args.dtype})", ours_s, "")]
            if args.mesh:
                mesh_s, mesh_tokens = ours(shard_for_decoding(model, inference_mesh(args.mesh)), prompts, args.new,
                                           args.runs)
                rows.append((f"ours on mesh {args.mesh} ({jax.device_count()} CPU devices)", mesh_s,
                             agreement(mesh_tokens, ours_tokens)))
            if not args.no_torch:
                ref_s, ref_tokens = transformers_generate(tmp, prompts, args.new, args.runs)
                rows = [("transformers generate fp32 (baseline)", ref_s, ""),
                        (f"ours (jax, static KV cache, {args.dtype})", ours_s, agreement(ours_tokens, ref_tokens)),
                        *[(name, seconds, same + " (vs ours on one device)") for name, seconds, same in rows[1:]]]
                if args.dtype == "float32":  # the same weights in fewer bytes: bf16, and int8 with fp32 scales
                    _, half = load_pretrained(tmp, dtype="bfloat16", param_dtype="bfloat16")
                    half_s, half_tokens = ours(half, prompts, args.new, args.runs)
                    int8_s, int8_tokens = ours(quantize_int8(model), prompts, args.new, args.runs)
                    rows += [("ours (jax, static KV cache, bf16 weights)", half_s, agreement(half_tokens, ref_tokens)),
                             ("ours (jax, static KV cache, int8 weights)", int8_s, agreement(int8_tokens, ref_tokens))]
            baseline = rows[0][1]
            for name, seconds, same in rows:
                print(f"| {batch} | {name} | {seconds:.3f} | {batch * args.new / seconds:.0f} | "
                      f"{baseline / seconds:.2f}x | {same} |")


if __name__ == "__main__":
    main()
