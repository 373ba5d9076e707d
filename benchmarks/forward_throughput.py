"""Forward tokens/s of the 57.7M-parameter bench shape (V32768 H512 L8 NH8 KV2 I1536, B8 T512).

Ours (jitted, fp32 and bf16 compute) against the same shape in transformers' LlamaForCausalLM on torch, run in the
same process, back to back. Prints a table of medians over several runs and the ratio to the torch fp32 baseline.
Usage: python benchmarks/forward_throughput.py [--batch 8] [--seq 512] [--runs 5] [--quick]
"""

import os
import platform

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from bench_common import median_seconds, shape_arguments  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from internlm2_jax.config import preset  # noqa: E402
from internlm2_jax.model import InternLM2ForCausalLM  # noqa: E402




def ours(dtype: str, ids: np.ndarray, runs: int, return_hidden: bool) -> float:
    model = InternLM2ForCausalLM(preset("bench", dtype=dtype), rngs=nnx.Rngs(0))
    forward = jax.jit(lambda m, x: m(x, return_hidden=return_hidden))
    x = jnp.asarray(ids)
    return median_seconds(lambda: forward(model, x).block_until_ready(), runs)


def torch_llama(dtype: str, ids: np.ndarray, runs: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    c = preset("bench")
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    x = torch.tensor(ids)

    def step():
        with torch.inference_mode():
            model(x, use_cache=False).logits.float()

    return median_seconds(step, runs)


def main():
    args = shape_arguments(__doc__.split("\n\n")[0])
    ids = np.random.RandomState(0).randint(0, preset("bench").vocab_size, (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq
    rows = [
        ("torch Llama fp32 (baseline)", torch_llama("float32", ids, args.runs)),
        ("torch Llama bf16", torch_llama("bfloat16", ids, args.runs)),
        ("ours fp32, logits", ours("float32", ids, args.runs, False)),
        ("ours bf16, logits", ours("bfloat16", ids, args.runs, False)),
        ("ours bf16, hidden states", ours("bfloat16", ids, args.runs, True)),
    ]
    base = rows[0][1]
    print(f"forward, bench shape ({preset('bench').num_params() / 1e6:.1f}M params), B{args.batch} T{args.seq}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}")
    print(f"{'implementation':<30} {'median s':>9} {'tokens/s':>10} {'vs baseline':>12}")
    for name, seconds in rows:
        print(f"{name:<30} {seconds:>9.3f} {tokens / seconds:>10.0f} {base / seconds:>11.2f}x")


if __name__ == "__main__":
    main()
