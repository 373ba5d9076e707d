"""What a pod run must not do silently: compute MFU against the wrong peak or count padding, let one skipped step
turn a log window into NaN, run a batch that does not split over the data axes, accept a `sequence` axis nothing
implements, or leave parameters replicated on every chip. Plus periodic held-out evaluation."""

import json
import math
import warnings

import numpy as np
import pytest
from test_train import CFG, OPT, RandomTokens

from internlm2_jax.config import preset
from internlm2_jax.parallel import MeshConfig, make_mesh, state_shardings
from internlm2_jax.train import StepConfig
from internlm2_jax.train.layout_checks import LayoutError, check_layout
from internlm2_jax.train.loop import TrainConfig, train, window_summary
from internlm2_jax.train.metrics import PEAK_FLOPS, matmul_params, peak_flops_key, train_flops_per_token
from internlm2_jax.train.objectives import LM, dpo_objective, reward_objective
from internlm2_jax.model import model_graphdef


@pytest.mark.parametrize("platform, kind, key", [
    ("tpu", "TPU v4", "tpu_v4"), ("tpu", "TPU v5 lite", "tpu_v5e"), ("tpu", "TPU v5", "tpu_v5p"),
    ("tpu", "TPU v5p", "tpu_v5p"), ("tpu", "TPU v6 lite", "tpu_v6e"), ("gpu", "NVIDIA H100 80GB HBM3", "h100"),
    ("gpu", "NVIDIA H100 PCIe", "h100_pcie"), ("gpu", "NVIDIA H200", "h200"), ("gpu", "NVIDIA A100-SXM4-80GB", "a100"),
    ("gpu", "NVIDIA B200", "b200"), ("cpu", "cpu", "cpu_f32"),
])
def test_the_peak_comes_from_the_exact_device_kind(platform, kind, key):
    assert peak_flops_key(platform, kind, "float32") == key


def test_an_unknown_accelerator_gives_no_mfu_and_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert peak_flops_key("tpu", "TPU v9 hyper", "bfloat16") is None
        assert peak_flops_key("tpu", "TPU v9 hyper", "bfloat16") is None
    assert len([w for w in caught if "TPU v9 hyper" in str(w.message)]) == 1
    assert peak_flops_key("cpu", "cpu", "bfloat16") == "cpu_bf16"  # CPU peaks only on the CPU platform


def test_step_flops_follow_what_the_step_computes():
    cfg = preset("internlm2_7b")
    n, seq = matmul_params(cfg), 4096
    attention = 12 * 32 * seq * 32 * 128 / 2
    assert LM.flops_per_token(cfg, seq) == 6 * n + attention
    lora = 20_000_000  # frozen base: activations' gradients flow through it, its weights get none
    assert LM.flops_per_token(cfg, seq, trainable_params=lora) == 4 * n + 2 * lora + attention
    trunk = matmul_params(cfg, head=False)
    assert reward_objective().flops_per_token(cfg, seq) == 6 * trunk + attention
    # DPO adds the reference's forward pass (2 N and a third of the attention)
    assert dpo_objective().flops_per_token(cfg, seq) == 8 * n + attention * 4 / 3
    assert train_flops_per_token(cfg, seq) == LM.flops_per_token(cfg, seq)


def test_a_skipped_step_does_not_poison_the_window():
    def metrics(loss, skipped, tokens=10.0):
        return {"loss": loss, "grad_norm": 1.0 if not skipped else math.nan, "lr": 0.1, "tokens": tokens,
                "skipped": skipped, "real_tokens": 12}

    out = window_summary([metrics(2.0, False), metrics(math.nan, True), metrics(4.0, False, tokens=30.0)])
    assert out["loss"] == pytest.approx((2 * 10 + 4 * 30) / 40) and out["grad_norm"] == 1.0
    assert out["skipped"] == 1 and out["tokens"] == 40 and out["real_tokens"] == 36
    assert math.isnan(window_summary([metrics(math.nan, True)])["loss"])


def layout(mesh_cfg, batch_size=8, micro_batches=1, model=CFG, tolerance=0.05, seq_len=512):
    mesh = make_mesh(mesh_cfg)
    _, abstract = model_graphdef(model)
    check_layout(model, TrainConfig(batch_size=batch_size, seq_len=seq_len, max_replicated_fraction=tolerance),
                 StepConfig(micro_batches=micro_batches), mesh, abstract, state_shardings(abstract, mesh))


def test_shapes_that_do_not_split_over_the_mesh_are_refused_by_name():
    layout(MeshConfig(data=2, fsdp=4), batch_size=16, micro_batches=2)
    with pytest.raises(LayoutError, match=r"train.batch_size=12 .* mesh.data x mesh.fsdp = 2 x 4 = 8"):
        layout(MeshConfig(data=2, fsdp=4), batch_size=12)
    with pytest.raises(LayoutError, match="step.micro_batches=4 gives micro-batches of 2 rows"):
        layout(MeshConfig(data=2, fsdp=4), batch_size=8, micro_batches=4)
    with pytest.raises(LayoutError, match=r"mesh.data x mesh.fsdp = 2 x 4 = 8 chips: .* move chips from mesh.fsdp "
                                          "to mesh.sequence"):
        layout(MeshConfig(data=2, fsdp=4), batch_size=4)


def test_rows_and_heads_that_do_not_split_over_sequence_are_refused_by_name():
    layout(MeshConfig(fsdp=4, sequence=2), batch_size=4)
    layout(MeshConfig(fsdp=2, sequence=4), batch_size=2, model=CFG.replace(context_parallel="ulysses"), seq_len=36)
    with pytest.raises(LayoutError, match=r"context_parallel='all_gather': a zigzag layout over mesh.sequence=4 "
                                          r"cuts each row into 2 x mesh.sequence = 8 chunks, but rows have 36 tokens"):
        layout(MeshConfig(fsdp=2, sequence=4), batch_size=2, seq_len=36)
    with pytest.raises(LayoutError, match=r"context_parallel='ulysses': .* query heads per tensor shard \(4\)"):
        layout(MeshConfig(fsdp=1, sequence=8), batch_size=1, model=CFG.replace(context_parallel="ulysses"))


def test_parameters_left_replicated_beyond_the_tolerance_are_refused():
    odd = CFG.replace(hidden_size=63 * 2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                      vocab_size=510, intermediate_size=162)  # nothing divides 4
    layout(MeshConfig(data=8, fsdp=1), model=odd)  # pure data parallelism replicates by design
    with pytest.raises(LayoutError, match=r"leaves 100.0% of the parameters fully replicated"):
        layout(MeshConfig(data=2, fsdp=4), model=odd)
    layout(MeshConfig(data=2, fsdp=4), model=odd, tolerance=1.0)  # told otherwise


def test_periodic_evaluation_and_real_token_throughput(tmp_path):
    class Padded(RandomTokens):
        def __next__(self):
            batch = super().__next__()
            batch["segment_ids"][:, 24:] = 0  # a quarter of every row is padding
            return batch

    cfg = TrainConfig(steps=4, batch_size=8, seq_len=32, log_every=2, checkpoint_every=4, eval_every=2,
                      run_dir=str(tmp_path))
    train(CFG, OPT, StepConfig(), MeshConfig(data=2, fsdp=4), cfg, Padded(), metadata={}, progress=False,
          eval_batches=lambda: iter([next(RandomTokens(seed=9))]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    logged = [r for r in rows if "loss" in r]
    for r in logged:  # throughput counts the 24 real tokens of each row, MFU uses the CPU peak
        np.testing.assert_allclose(r["tokens_per_s"] * r["step_time_s"] * 1, 8 * 24, rtol=1e-6)
        np.testing.assert_allclose(r["mfu"], LM.flops_per_token(CFG, 32) * r["tokens_per_s"]
                                   / (PEAK_FLOPS["cpu_f32"] * 8), rtol=1e-6)
