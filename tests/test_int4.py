"""Int4 weight-only decoding (W4A16) and AWQ checkpoints (issue 23; shared doc §2.3, §2.5 tests 10, 14, 15).

The format's round trip (within half a step, zeros in range, constant and all-zero groups), nibble packing, a tiny
model's logits with int4 projections (the dequantized model's exactly, close to the float model's, further from them
than int8's), decoding on a data x fsdp x tensor mesh equal to one device, AWQ checkpoints built by an independent
packer (AutoAWQ's loop, from random codes) loading to the same (q - z) * s as the float path reads, in both layouts
(a wrong nibble order fails by the full range), save -> load bit-exact, and the errors: a group that does not divide,
an unsupported quantization_config, an unknown mode, training on int4 weights. The benchmark script runs (test 15's
numbers are in benchmarks/RESULTS.md).
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.artifacts import load_model
from internlm2_jax.config import preset
from internlm2_jax.convert import CheckpointError, load_pretrained, save_pretrained
from internlm2_jax.convert.safetensors_io import CheckpointReader, write_checkpoint
from internlm2_jax.decode import generate_ids
from internlm2_jax.model import InternLM2ForCausalLM, layers
from internlm2_jax.model.int4 import Int4Weight, pack_nibbles, quantize_int4, unpack_nibbles
from internlm2_jax.model.kv_heads import shard_for_decoding
from internlm2_jax.model.quantize import quantize_int4_model, quantize_int8
from internlm2_jax.parallel import inference_mesh
from internlm2_jax.train.step import check_differentiable

ROOT = Path(__file__).resolve().parents[1]
# hidden 64, 4 heads of 16 over 2 kv heads, MLP 96: group 32 divides every projection's inputs, and every output
# width is whole int32 words of 8 codes, as AWQ needs.
CFG = preset("tiny", vocab_size=128, intermediate_size=96, initializer_range=0.1, max_position_embeddings=256)
GROUP = 32
IDS = np.random.RandomState(0).randint(3, 128, (2, 16)).astype(np.int32)
forward = jax.jit(lambda models, ids: [model(ids) for model in models])  # one compile for several models


def leaves_of(model):
    return [(path, leaf) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
            for leaf in jax.tree.leaves(var.get_value())]


def dequantized(model):
    """A float copy of an int4 model: each Int4Weight replaced by its dequantized weight."""
    model = nnx.clone(model)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and isinstance(var.get_value(), Int4Weight):
            var.set_value(var.get_value().dequantize())
    return model


# ---- the format (test 10) ----------------------------------------------------------------------------------------

def test_round_trip_is_within_half_a_step_with_zeros_in_range_and_the_range_used():
    ranges = jnp.exp(jax.random.normal(jax.random.key(1), (1, 1, 48)))  # channels of different ranges
    w = jax.random.normal(jax.random.key(0), (3, 256, 48)) * ranges + 0.3 * ranges  # a stack of 3, off-centre
    q = quantize_int4(w, 64)
    assert q.codes.shape == (3, 128, 48) and q.scales.shape == q.zeros.shape == (3, 4, 48)
    assert q.codes.dtype == q.zeros.dtype == jnp.uint8 and q.scales.dtype == jnp.float16
    codes, zeros = np.asarray(unpack_nibbles(q.codes)), np.asarray(q.zeros)
    assert zeros.min() >= 0 and zeros.max() <= 15 and codes.max() <= 15
    step = np.repeat(np.asarray(q.scales, np.float32), 64, axis=1)
    error = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    # Half a step, widened by the fp16 rounding of the stored scale (relative 2^-11 over up to 15 steps).
    assert (error <= step * (0.5 + 2**-7)).all()
    assert error.max() > 0.4 * step.max() / 2  # it is rounding, not exact
    groups = codes.reshape(3, 4, 64, 48)
    assert (groups.min(axis=2) == 0).mean() > 0.99 and (groups.max(axis=2) == 15).mean() > 0.99
    assert abs(quantize_int4(jnp.ones((1024, 1024)), 128).bits_per_param() - (4 + 16 / 128 + 8 / 128)) < 1e-9


def test_constant_and_all_zero_groups():
    w = jnp.zeros((64, 8)).at[:32, 0].set(0.37).at[:32, 1].set(-1.7).at[:32, 2].set(1e-6)
    q = quantize_int4(w, 32)
    values = np.asarray(q.dequantize())
    np.testing.assert_allclose(values[:32, :2], np.asarray(w)[:32, :2], rtol=2**-11, atol=0)  # fp16 scale rounding
    # A range under AutoAWQ's floor of 1e-5 gets the floor's step: within half of it, not exact.
    assert np.abs(values[:32, 2] - 1e-6).max() <= 0.5e-5 / 15
    assert np.isfinite(values).all() and (values[32:] == 0).all() and (values[:, 3:] == 0).all()
    assert np.isfinite(np.asarray(q.scales, np.float32)).all() and (np.asarray(q.scales) > 0).all()


def test_nibbles_pack_two_inputs_to_a_byte_high_first_and_round_trip():
    q = np.random.RandomState(0).randint(0, 16, (3, 10, 7)).astype(np.uint8)
    packed = np.asarray(pack_nibbles(q))
    assert packed.shape == (3, 5, 7) and packed[0, 0, 0] == (q[0, 0, 0] << 4) | q[0, 1, 0]
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(packed)), q)


def test_a_group_that_does_not_divide_names_the_weights_and_one_that_does():
    # Shapes are all it checks, before anything is computed: inputs 64 (embed, heads x head_dim) and 160.
    model = nnx.eval_shape(lambda: InternLM2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"int4 group 128 does not divide .*feed_forward/w2 \(160 inputs, 64 outputs\).*"
                                         r"group=32 divides every projection"):
        quantize_int4_model(model)
    with pytest.raises(ValueError, match="positive even"):
        quantize_int4(jnp.ones((64, 8)), 3)


# ---- the model ----------------------------------------------------------------------------------------------------

@functools.cache
def float_and_int4(scan: bool):
    model = InternLM2ForCausalLM(CFG.replace(scan_layers=scan), rngs=nnx.Rngs(0))
    return model, quantize_int4_model(model, GROUP)


@pytest.fixture(params=[False, True], ids=["layers", "scanned"])
def models(request):
    return float_and_int4(request.param)


def test_projections_are_int4_and_the_rest_stays_float(models):
    model, int4 = models
    kinds = {"/".join(map(str, p)): type(v.get_value()).__name__ for p, v in nnx.to_flat_state(nnx.state(int4))}
    quantized = {p for p, kind in kinds.items() if kind == "Int4Weight"}
    assert {p.split("/")[-1] for p in quantized} == {"wqkv", "wo", "w1", "w3", "w2"}
    assert kinds["output"] == kinds["model/tok_embeddings"] == "ArrayImpl"  # the head and embedding stay float
    stacked = "model/layers/attention/wqkv" in kinds
    assert len(quantized) == 5 * (1 if stacked else CFG.num_hidden_layers)
    assert leaves_of(model)[0][1].dtype == jnp.float32  # the original is left as it was (a copy is quantized)


def test_logits_are_the_dequantized_models_and_close_to_float_further_than_int8(models):
    model, int4 = models
    full, quant, dequant, int8 = (np.asarray(x) for x in forward(
        (model, int4, dequantized(int4), quantize_int8(model, packed=False)), IDS))
    np.testing.assert_allclose(quant, dequant, atol=1e-4 * np.abs(dequant).max(), rtol=0)  # the dense path itself
    rms = lambda x: float(np.sqrt(np.mean(x**2)))  # noqa: E731
    int4_error, int8_error = rms(quant - full) / rms(full), rms(int8 - full) / rms(full)
    assert int4_error < 0.3 and int8_error < int4_error / 3, (int4_error, int8_error)


def test_a_sharded_int4_model_decodes_as_on_one_device(tmp_path):
    model, int4 = float_and_int4(True)  # scanned: the stacked leaves are the harder case to shard
    prompts = [[5, 9, 33, 2, 8, 71, 100], [100, 7], [42, 43, 44, 45]]
    expected = generate_ids(int4, prompts, max_new_tokens=4, top_n=2)
    mesh = inference_mesh("data=2,fsdp=2,tensor=2")
    save_pretrained(int4, tmp_path / "int4")
    quantized_on_mesh = quantize_int4_model(shard_for_decoding(model, mesh), GROUP)
    _, loaded_on_mesh, _ = load_model(tmp_path / "int4", mesh=mesh, fit_kv_heads=True,
                                      scan_layers=int4.cfg.scan_layers)
    for placed in (quantized_on_mesh, loaded_on_mesh):
        codes = placed.model.layers.attention.wqkv.get_value().codes  # [layers, embed/2, kv_heads*slots*head_dim]
        assert codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        for want, got in zip(expected, generate_ids(placed, prompts, max_new_tokens=4, top_n=2), strict=True):
            assert got.tokens == want.tokens
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4, rtol=0)


def test_int4_weights_cannot_be_trained():
    int4 = quantize_int4_model(InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0)), GROUP)
    with pytest.raises(ValueError, match=r"quantized \(integer\) and cannot be trained"):
        check_differentiable(nnx.state(int4, nnx.Param))
    weight = int4.model.layers[0].feed_forward.w1.get_value()
    x = jnp.ones((1, 2, CFG.hidden_size))
    with pytest.raises(TypeError, match="decoding only.*quantize_base='nf4'"):  # nor can anything through them
        jax.grad(lambda x: layers.dense("bte,ei->bti", x, weight, jnp.float32).sum())(x)
    wo = int4.model.layers[0].attention.wo.get_value()  # [heads, head_dim, embed]: contracts two dimensions
    with pytest.raises(ValueError, match="contracts x's trailing dimensions in order"):
        layers.dense("btdh,hde->bte", jnp.ones((1, 2, CFG.head_dim, CFG.num_attention_heads)), wo, jnp.float32)


# ---- model directories: AWQ import (test 14), save -> load, errors -----------------------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's WQLinear_GEMM.from_linear: nibble i holds column AWQ_ORDER[i]


def autoawq_pack(values: np.ndarray, order=AWQ_ORDER) -> np.ndarray:
    """int32 [rows, cols / 8] of 4-bit values [rows, cols], written as AutoAWQ's packing loop writes them."""
    words = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
    for col in range(words.shape[1]):
        for i in range(8):
            words[:, col] |= values[:, col * 8 + order[i]].astype(np.uint32) << (4 * i)
    return words.view(np.int32)


def awq_directory(tmp_path, layout, order=AWQ_ORDER, quantization=None):
    """(AWQ model directory, float model directory of the same weights): random codes, zeros and fp16 scales for
    every projection, written by `autoawq_pack`; the float directory holds (q - z) * s as HF `.weight`s."""
    model = InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "float", layout=layout)
    reader, rng = CheckpointReader(tmp_path / "float"), np.random.RandomState(1)
    awq, reference = {}, {}
    for name in reader.keys():
        weight = np.array(reader.read(name))
        projection = name.split(".")[-2] in ("wqkv", "wo", "w1", "w2", "w3", "q_proj", "k_proj", "v_proj",
                                             "o_proj", "gate_proj", "up_proj", "down_proj")
        if not projection:
            awq[name] = reference[name] = weight
            continue
        n_out, n_in = weight.shape
        q = rng.randint(0, 16, (n_in, n_out))
        z = rng.randint(0, 16, (n_in // GROUP, n_out))
        s = (rng.uniform(0.5, 2.0, (n_in // GROUP, n_out)) * 0.01).astype(np.float16)
        base = name.removesuffix(".weight")
        awq |= {f"{base}.qweight": autoawq_pack(q, order), f"{base}.qzeros": autoawq_pack(z, order),
                f"{base}.scales": s}
        full = (q - np.repeat(z, GROUP, axis=0)) * np.repeat(s.astype(np.float32), GROUP, axis=0)
        reference[name] = full.T.astype(np.float32)  # the HF [out, in] weight
    for directory, tensors in (("awq", awq), ("reference", reference)):
        write_checkpoint(tmp_path / directory, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
        config = json.loads((tmp_path / "float" / "config.json").read_text())
        if directory == "awq":
            config["quantization_config"] = quantization or {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                                             "zero_point": True, "version": "gemm"}
        (tmp_path / directory / "config.json").write_text(json.dumps(config))
    return tmp_path / "awq", tmp_path / "reference"


@pytest.mark.parametrize("layout", ["internlm2", "llama"])
def test_an_autoawq_checkpoint_loads_to_the_same_weights_in_our_layout(tmp_path, layout):
    awq_dir, reference_dir = awq_directory(tmp_path, layout)
    _, model, _ = load_model(awq_dir)
    _, reference = load_pretrained(reference_dir)
    int4 = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    assert sum(isinstance(v, Int4Weight) for v in int4.values()) == 5 * CFG.num_hidden_layers
    for path, var in nnx.to_flat_state(nnx.state(reference)):
        value = int4[path]
        got = value.dequantize() if isinstance(value, Int4Weight) else value
        np.testing.assert_allclose(np.asarray(got), np.asarray(var.get_value()), rtol=1e-6, atol=1e-7,
                                   err_msg=str(path))
    logits, reference_logits = forward((model, reference), IDS)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference_logits), atol=1e-4, rtol=1e-4)


def test_the_convert_command_carries_an_awq_checkpoint_to_the_other_layout_unchanged(tmp_path):
    from internlm2_jax.convert.__main__ import main

    awq_dir, _ = awq_directory(tmp_path, "internlm2")
    assert main([str(awq_dir), str(tmp_path / "llama"), "--layout", "llama"]) == 0
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["quantization_config"]["group_size"] == GROUP and config["torch_dtype"] == "float32"
    (_, original, _), (_, converted, _) = load_model(awq_dir), load_model(tmp_path / "llama")
    for (path, a), (_, b) in zip(leaves_of(original), leaves_of(converted), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), path


def test_a_wrong_nibble_order_fails_by_the_full_range(tmp_path):
    awq_dir, reference_dir = awq_directory(tmp_path, "internlm2", order=list(range(8)))  # no AWQ reordering
    _, model, _ = load_model(awq_dir)
    _, reference = load_pretrained(reference_dir)
    got = np.asarray(model.model.layers[0].feed_forward.w1.get_value().dequantize())
    want = np.asarray(reference.model.layers[0].feed_forward.w1.get_value())
    assert np.abs(got - want).max() > 0.5 * (want.max() - want.min())


@pytest.mark.parametrize("layout", ["internlm2", "llama"])
def test_an_int4_model_saves_as_awq_and_loads_back_bit_exactly(models, tmp_path, layout):
    model, int4 = models
    save_pretrained(int4, tmp_path / "int4", layout=layout)
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                             "zero_point": True, "version": "gemm"}
    reader = CheckpointReader(tmp_path / "int4")
    qweight = "model.layers.0.attention.wqkv.qweight" if layout == "internlm2" else \
        "model.layers.0.self_attn.q_proj.qweight"
    assert reader.dtype(qweight) == np.int32 and not any(k.endswith("wqkv.weight") for k in reader.keys())
    _, back = load_pretrained(tmp_path / "int4", scan_layers=int4.cfg.scan_layers)
    saved = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(int4))}
    for path, var in nnx.to_flat_state(nnx.state(back)):
        for a, b in zip(jax.tree.leaves(saved[path]), jax.tree.leaves(var.get_value()), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), path
    with pytest.raises(ValueError, match=r"quantized already \(Int4Weight\)"):
        load_model(tmp_path / "int4", quantize="int8")
    with pytest.raises(ValueError, match="a model directory holds floating-point or AWQ int4"):
        save_pretrained(quantize_int8(model, packed=False), tmp_path / "int8")


@pytest.mark.parametrize("quantization, message", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 32}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "awq", "bits": 8, "group_size": 32, "version": "gemv"}, r"bits 8 \(only 4\); version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": -1}, "group_size -1"),
    ({"quant_method": "awq", "bits": 4, "group_size": 16}, "'model.layers.0.attention.wqkv.qzeros' is int32 \\[2, "),
])
def test_unsupported_quantization_configs_are_refused_naming_the_setting(tmp_path, quantization, message):
    awq_dir, _ = awq_directory(tmp_path, "internlm2", quantization=quantization)
    with pytest.raises(CheckpointError, match=message):
        load_model(awq_dir)


def test_load_model_quantizes_to_int4_in_groups_of_128_and_refuses_what_it_cannot(tmp_path):
    wide = CFG.replace(hidden_size=128, head_dim=32, intermediate_size=256)  # every projection 128 or 256 inputs
    save_pretrained(InternLM2ForCausalLM(wide, rngs=nnx.Rngs(0)), tmp_path / "wide")
    _, model, _ = load_model(tmp_path / "wide", quantize="int4")
    assert {v.get_value().group for _, v in nnx.to_flat_state(nnx.state(model))
            if isinstance(v.get_value(), Int4Weight)} == {128}
    save_pretrained(InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0)), tmp_path / "narrow")
    with pytest.raises(ValueError, match="int4 group 128 does not divide .*group=32 divides every projection"):
        load_model(tmp_path / "narrow", quantize="int4")
    with pytest.raises(ValueError, match="quantize must be one of 'int8', 'int4'"):
        load_model(tmp_path / "narrow", quantize="int3")


def test_the_benchmark_script_runs():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantized_matmul.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| int4 g128 (XLA) |" in done.stdout and "| fp32 (XLA) |" in done.stdout
