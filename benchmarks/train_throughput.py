"""Train-step tokens/s and MFU of the 57.7M-parameter bench shape (V32768 H512 L8 NH8 KV2 I1536, B8 T512).

One step is forward + backward + AdamW (global-norm clipping, weight decay), in fp32 and in bf16 compute (bf16
operands, fp32 accumulation, fp32 master weights), against the same shape in transformers' LlamaForCausalLM on torch
with torch.optim.AdamW (fp32, and bf16 autocast over fp32 weights: the same recipe as ours), run in the same process,
back to back. Prints a table of medians over several runs, the ratio to the torch fp32 baseline and the MFU
(conventions: 6 N + causal attention FLOPs per token) against the measured CPU matmul peak of that precision
(`internlm2_jax.train.metrics.PEAK_FLOPS`: cpu_f32, cpu_bf16).
Usage: python benchmarks/train_throughput.py [--batch 8] [--seq 512] [--runs 5] [--quick]
"""

import os
import platform

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from bench_common import median_seconds, shape_arguments  # noqa: E402
import numpy as np  # noqa: E402

from internlm2_jax.config import preset  # noqa: E402
from internlm2_jax.parallel import MeshConfig, make_mesh  # noqa: E402
from internlm2_jax.train import (  # noqa: E402
    OptimizerConfig,
    StepConfig,
    init_train_state,
    jit_train_step,
    lr_schedule,
    make_optimizer,
    make_train_step,
    train_state_shardings,
)
from internlm2_jax.train.metrics import PEAK_FLOPS, mfu, train_flops_per_token  # noqa: E402
from internlm2_jax.model import model_graphdef  # noqa: E402

# Our recipe's AdamW (spec §5.4), warmup short enough that the timed steps take real updates.
OPT = OptimizerConfig(peak_lr=3e-4, warmup_steps=2, total_steps=1000, b1=0.9, b2=0.95, weight_decay=0.1)




def make_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    ids = np.random.RandomState(0).randint(3, vocab, (batch, seq + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.float32)}


def ours(dtype: str, batch: dict, runs: int) -> float:
    cfg = preset("bench", dtype=dtype)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx = make_optimizer(OPT)
    graphdef, _ = model_graphdef(cfg)
    train_step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(OPT), StepConfig()),
                                train_state_shardings(cfg, tx, mesh), mesh)
    holder = {"state": init_train_state(cfg, tx, mesh, seed=0)}

    def step():
        holder["state"], metrics = train_step(holder["state"], batch)  # the state is donated
        jax.block_until_ready(metrics)

    return median_seconds(step, runs)


def torch_llama(dtype: str, batch: dict, runs: int) -> float:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    c = preset("bench")
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()  # fp32 master weights in both rows, as ours
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPT.peak_lr, betas=(OPT.b1, OPT.b2), eps=OPT.eps,
                                  weight_decay=OPT.weight_decay)
    ids, targets = torch.tensor(batch["input_ids"]), torch.tensor(batch["targets"]).long()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.clip_norm)
        optimizer.step()

    return median_seconds(step, runs)


def main():
    args = shape_arguments(__doc__.split("\n\n")[0])
    cfg = preset("bench")
    batch = make_batch(args.batch, args.seq, cfg.vocab_size)
    tokens = args.batch * args.seq
    rows = [  # (name, precision of the MFU peak, median seconds)
        ("torch Llama fp32 (baseline)", "f32", torch_llama("float32", batch, args.runs)),
        ("torch Llama bf16 autocast", "bf16", torch_llama("bfloat16", batch, args.runs)),
        ("ours fp32", "f32", ours("float32", batch, args.runs)),
        ("ours bf16", "bf16", ours("bfloat16", batch, args.runs)),
    ]
    base = rows[0][2]
    print(f"train step (fwd+bwd+AdamW), bench shape ({cfg.num_params() / 1e6:.1f}M params), B{args.batch} "
          f"T{args.seq}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}")
    print(f"MFU against the measured matmul peak of the row's precision: fp32 {PEAK_FLOPS['cpu_f32'] / 1e9:.0f}, "
          f"bf16 {PEAK_FLOPS['cpu_bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'implementation':<30} {'median s':>9} {'tokens/s':>10} {'vs baseline':>12} {'MFU':>7}")
    for name, precision, seconds in rows:
        utilisation = mfu(train_flops_per_token(cfg, args.seq), tokens / seconds, PEAK_FLOPS[f"cpu_{precision}"])
        print(f"{name:<30} {seconds:>9.3f} {tokens / seconds:>10.0f} {base / seconds:>11.2f}x {utilisation:>7.1%}")


if __name__ == "__main__":
    main()
