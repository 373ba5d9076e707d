"""QLoRA: `LoraConfig(quantize_base="nf4")` puts the frozen base projections in NF4 (model/nf4.py) under LoRA.

Configuration and its errors, the NF4 base built per layer (stacked for scan), logits of a fresh adapter equal the
dequantized model's exactly, a train step moves the adapters only (base codes bitwise unchanged, moments for the
adapters only), sharded over 8 fake devices equals unsharded, merging goes into the *dequantized* base (a naive merge
into the float weights fails the same check), the PEFT export, XTuner's bf16 base with fp32 adapters (fp32 gradients
and moments, merged and exported weights in bf16), float weights streamed into a QLoRA model one projection stack at
a time (train.init_weights), and the custom gradient rule keeps the dequantized weights out of what the backward saves
(traced here). With -m slow: the compiled temporaries per layer with and without the rule, and the 7B step compiled for
one v5e chip. Checkpoints of a QLoRA state: test_qlora_checkpoint.py.

The test model has hidden 256, two 128-wide heads over one KV head and MLP 512, so bitsandbytes' blocks (64 inputs,
256 absmax codes) divide every projection; the `tiny` preset's do not, which is the configuration error tested.
"""

import dataclasses
import gc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import ConfigError, LoraConfig, preset
from internlm2_jax.model import InternLM2ForCausalLM, model_graphdef
from internlm2_jax.model import layers
from internlm2_jax.model.lora import EQUATIONS, dequantized_base, merge_lora
from internlm2_jax.model.nf4 import NF4Weight, quantize_projection
from internlm2_jax.overrides import OverrideError, apply_overrides
from internlm2_jax.parallel import MeshConfig, make_mesh, replicated_parameters, state_shardings
from internlm2_jax.train import (OptimizerConfig, StepConfig, init_train_state, jit_train_step, lr_schedule,
                                 make_optimizer, make_train_step, train_state_shardings)
from internlm2_jax.train.objectives import LM
from internlm2_jax.train.state import abstract_train_state, split_trainable
from lora_testing import set_random_adapters

QLORA = LoraConfig(rank=8, alpha=16.0, quantize_base="nf4")
CFG = preset("tiny", hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
             intermediate_size=512, lora=QLORA)
TRAINED = ("lora_",)
IDS = np.random.RandomState(0).randint(3, 500, (2, 24)).astype(np.int32)
forward = jax.jit(lambda models, ids: [model(ids) for model in models])  # one compile for several models
decode = jax.jit(lambda weight: weight.dequantize())  # eagerly each op of the decode would compile on its own


def base_weights(model):
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), NF4Weight)}


# ---- configuration ---------------------------------------------------------------------------------------------

def test_quantize_base_is_set_from_the_command_line_and_bad_values_name_the_field_or_weight():
    cfg = apply_overrides(CFG.replace(lora=None), ["lora.quantize_base=nf4", "lora.rank=4"])
    assert cfg.lora == LoraConfig(rank=4, quantize_base="nf4")
    assert apply_overrides(cfg, ["lora.quantize_base=None"]).lora.quantize_base is None
    with pytest.raises(OverrideError, match="quantize_base must be one of"):
        apply_overrides(cfg, ["lora.quantize_base=int4"])
    with pytest.raises(ConfigError, match="nf4_block must be a positive even"):
        LoraConfig(quantize_base="nf4", nf4_block=63)
    # The tiny preset's MLP has 160 inputs to w2: no silent fallback to a float weight, an error naming it.
    with pytest.raises(ConfigError, match=r"w2 \[in=160, out=64\]: lora.nf4_block=64 does not divide its 160"):
        nnx.eval_shape(lambda: InternLM2ForCausalLM(preset("tiny", lora=QLORA), rngs=nnx.Rngs(0)))
    assert preset("tiny", lora=LoraConfig(quantize_base=None)).lora.nf4_errors(preset("tiny")) == []


def test_adapter_dtype_is_set_from_the_command_line_and_a_bad_one_names_the_field():
    cfg = apply_overrides(CFG, ["param_dtype=bfloat16", "lora.adapter_dtype=float32"])
    assert (cfg.param_dtype, cfg.lora.adapter_dtype) == ("bfloat16", "float32")
    assert apply_overrides(cfg, ["lora.adapter_dtype=None"]).lora.adapter_dtype is None  # param_dtype's
    with pytest.raises(OverrideError, match=r"lora.adapter_dtype must be None \(the model's param_dtype\) or one "
                                            r"of \('float32', 'bfloat16', 'float16'\), got 'fp32'"):
        apply_overrides(cfg, ["lora.adapter_dtype=fp32"])
    with pytest.raises(ConfigError, match="lora.adapter_dtype must be None"):
        LoraConfig(adapter_dtype="int8")


# ---- the quantized base ------------------------------------------------------------------------------------------

def test_every_projection_is_nf4_quantized_per_layer_the_head_stays_float(trained):
    unrolled = nnx.eval_shape(lambda: InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0)))
    assert sorted(p[2:] for p in base_weights(unrolled)) == sorted(
        (layer, module, name) for layer in range(2) for module, names in
        (("attention", ("wqkv", "wo")), ("feed_forward", ("w1", "w2", "w3"))) for name in names)
    weights = {p: v.get_value() for p, v in nnx.to_flat_state(trained[0].params)
               if isinstance(v.get_value(), NF4Weight)}  # the scanned model's initial state, on its own device
    assert sorted(p[-1] for p in weights) == sorted(EQUATIONS)
    # The float LoRA model draws the same weights (quantizing draws nothing); the head stays float, as in QLoRA.
    float_model = InternLM2ForCausalLM(CFG.replace(scan_layers=True, lora=LoraConfig(rank=8, alpha=16.0)),
                                       rngs=nnx.Rngs(0))
    float_weights = dict(nnx.to_flat_state(nnx.state(float_model)))
    assert ("output",) in float_weights and ("output",) not in weights
    for path, weight in weights.items():
        w = float_weights[path].get_value()
        assert weight.shape == w.shape and weight.codes.dtype == jnp.uint8 and weight.double_quant
        assert weight.codes.shape[0] == weight.absmax_offset.shape[0] == CFG.num_hidden_layers
        error = np.abs(np.asarray(decode(weight)) - np.asarray(w))
        assert 0 < error.mean() < 0.1 * np.abs(np.asarray(w)).mean()  # NF4's ~7% (test_nf4), in the right places
    # Each layer of the stack is quantized on its own (its own scales and absmax mean), as an unstacked one is.
    wo = weights[("model", "layers", "attention", "wo")]
    one = quantize_projection(float_weights[("model", "layers", "attention", "wo")].get_value()[1], 2)
    assert one.shape == (2, 128, 256) and one.matrix_shape == (256, 256)
    assert np.array_equal(wo.codes[1], one.codes) and np.array_equal(wo.absmax[1], one.absmax)
    np.testing.assert_allclose(wo.absmax_offset[1], one.absmax_offset, rtol=1e-6)  # a batched mean


def test_a_fresh_adapter_gives_the_dequantized_models_logits_exactly():
    model = InternLM2ForCausalLM(CFG.replace(scan_layers=True, dtype="bfloat16"), rngs=nnx.Rngs(0))
    # B = 0: the adapter adds exactly zero. The reference dequantizes in the same jit (XLA fuses the absmax decode
    # into a multiply-add, one float32 ulp away from the eager decode).
    logits, reference = jax.jit(lambda m, ids: (m(ids), dequantized_base(m)(ids)))(model, IDS)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(reference))


def test_a_dense_weight_that_contracts_out_of_order_is_an_error():
    weight = quantize_projection(0.02 * jax.random.normal(jax.random.PRNGKey(0), (2, 128, 256)), 2)
    x = jnp.ones((1, 3, 128, 2))
    with pytest.raises(ValueError, match="contracts x's trailing dimensions in order"):
        layers.dense("btdh,hde->bte", x, weight, jnp.float32)


# ---- training ----------------------------------------------------------------------------------------------------

def train(cfg, shape, steps=3, trainable=TRAINED, seed=0):
    """`steps` steps of the LM objective on `shape` (data, fsdp, tensor, sequence) devices; adapters random."""
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, total_steps=20, weight_decay=0.0, trainable=trainable)
    mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
    tx = make_optimizer(opt)
    graphdef, _ = model_graphdef(cfg)
    shardings = train_state_shardings(cfg, tx, mesh, trainable=trainable)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(opt), StepConfig(), trainable=trainable),
                          shardings, mesh)
    state = init_train_state(cfg, tx, mesh, seed=seed, trainable=trainable)
    state = state.replace(params=nnx.state(set_random_adapters(nnx.merge(graphdef, state.params))))
    state = jax.device_put(state, shardings)
    rng = np.random.RandomState(3)
    before, losses = jax.tree.map(np.asarray, state), []
    for _ in range(steps):
        ids = rng.randint(3, 120, (8, 33)).astype(np.int32)
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((8, 32), np.int32),
                 "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy(),
                 "loss_mask": np.ones((8, 32), np.float32)}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return before, state, losses, graphdef, shardings


@pytest.fixture(scope="module")
def trained():
    return train(CFG.replace(scan_layers=True), (1, 1, 1, 1))


def test_a_step_trains_the_adapters_only_and_leaves_the_nf4_codes_bitwise_unchanged(trained):
    before, state, losses, _, _ = trained
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    after = jax.tree.map(np.asarray, state.params)
    for (path, old), (_, new) in zip(nnx.to_flat_state(before.params), nnx.to_flat_state(after), strict=True):
        name = "/".join(map(str, path))
        old_leaves, new_leaves = jax.tree.leaves(old.get_value()), jax.tree.leaves(new.get_value())
        same = all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(old_leaves, new_leaves, strict=True))
        assert same == ("lora_" not in name), name  # adapters move; codes, scales, head and norms do not
    trained_size = sum(v.get_value().size for p, v in nnx.to_flat_state(before.params) if "lora_" in str(p))
    assert sum(x.size for x in jax.tree.leaves(split_trainable(before.params, TRAINED)[0])) == trained_size
    assert sum(leaf.size for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0) == 2 * trained_size


def test_training_the_quantized_base_is_refused_with_the_way_out():
    opt = OptimizerConfig(warmup_steps=1, total_steps=2)  # every parameter trainable: the NF4 codes too
    tx = make_optimizer(opt)
    graphdef, _ = model_graphdef(CFG)
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    state = abstract_train_state(CFG, tx, mesh)
    batch = {k: jax.ShapeDtypeStruct((1, 8), jnp.int32) for k in ("input_ids", "targets", "positions",
                                                                    "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((1, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"quantized \(integer\) and cannot be trained.*optimizer.trainable"):
        jax.eval_shape(make_train_step(graphdef, tx, lr_schedule(opt)), state, batch)


def test_a_sharded_qlora_step_equals_the_unsharded_one_with_the_nf4_leaves_sharded(trained):
    _, one, losses, _, _ = trained
    _, eight, sharded_losses, _, shardings = train(CFG.replace(scan_layers=True), (2, 2, 2, 1))
    np.testing.assert_allclose(losses, sharded_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        if jnp.issubdtype(a.dtype, jnp.integer):
            assert np.array_equal(a, b)
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    wqkv = dict(nnx.to_flat_state(eight.params))[("model", "layers", "attention", "wqkv")].get_value()
    # [layers, embed/2, kv_heads*groups*head_dim]: FSDP over the inputs, tensor parallelism over the outputs
    assert wqkv.codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert wqkv.absmax.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert replicated_parameters(eight.params, shardings.params) == []


# ---- merging, exporting, loading -----------------------------------------------------------------------------------

def test_merge_goes_into_the_dequantized_base_and_a_naive_merge_into_the_float_weights_does_not(trained):
    _, state, _, graphdef, _ = trained
    model = nnx.merge(graphdef, jax.device_get(state.params))  # trained adapters, B far from zero
    merged = merge_lora(model)
    assert merged.cfg.lora is None and not base_weights(merged)
    logits, merged_logits = (np.asarray(x) for x in forward((model, merged), IDS))
    tolerance = 1e-4 * np.abs(logits).max()  # fp32 here; the bf16 bar is 1e-2
    assert np.abs(merged_logits - logits).max() <= tolerance
    # The same adapters merged into the float weights the base was quantized from: QLoRA's classic merge bug.
    float_model = InternLM2ForCausalLM(model.cfg.replace(lora=LoraConfig(rank=8, alpha=16.0)), rngs=nnx.Rngs(0))
    adapters = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model)) if "lora_" in str(p)]
    nnx.update(float_model, nnx.from_flat_state(adapters))
    naive = np.asarray(forward([merge_lora(float_model)], IDS)[0])
    assert np.abs(naive - logits).max() > 100 * tolerance


def test_peft_export_is_the_trained_adapters_over_the_dequantized_base(trained, tmp_path):
    from internlm2_jax.convert import save_pretrained
    from internlm2_jax.convert.peft import base_model, load_adapters, save_adapters

    _, state, _, graphdef, _ = trained
    model = nnx.merge(graphdef, jax.device_get(state.params))
    save_adapters(model, tmp_path / "adapter")  # the adapters alone: the same files as for a float base
    loaded = load_adapters(InternLM2ForCausalLM(model.cfg, rngs=nnx.Rngs(1)), tmp_path / "adapter")
    ours, back = (dict(nnx.to_flat_state(nnx.state(m))) for m in (model, loaded))
    adapters = [p for p in ours if "lora_" in str(p)]
    assert adapters and all(np.array_equal(ours[p].get_value(), back[p].get_value()) for p in adapters)
    # The base a PEFT user applies them to is the dequantized NF4 base, saved as float weights.
    base = base_model(model)  # dequantizes the NF4 base itself
    save_pretrained(base, tmp_path / "base")
    assert not base_weights(base) and (tmp_path / "base" / "config.json").exists()
    reference = dict(nnx.to_flat_state(nnx.state(base_model(dequantized_base(model)))))
    assert all(np.array_equal(v.get_value(), reference[p].get_value()) for p, v in nnx.to_flat_state(nnx.state(base)))


# ---- XTuner's setting: a bf16 base (embedding, head, norms) with fp32 adapters --------------------------------------

XTUNER = CFG.replace(scan_layers=True, param_dtype="bfloat16", lora=dataclasses.replace(QLORA, adapter_dtype="float32"))


@pytest.fixture(scope="module")
def trained_fp32_adapters():
    return train(XTUNER, (1, 1, 1, 1), steps=2)


def test_fp32_adapters_beside_a_bf16_base_get_fp32_gradients_and_moments(trained_fp32_adapters):
    before, state, losses, _, _ = trained_fp32_adapters
    assert np.isfinite(losses).all()
    dtypes = {}
    for (path, old), (_, new) in zip(nnx.to_flat_state(before.params), nnx.to_flat_state(state.params), strict=True):
        name, value = "/".join(map(str, path)), new.get_value()
        kind = "adapter" if "lora_" in name else "nf4" if isinstance(value, NF4Weight) else "float base"
        dtypes.setdefault(kind, set()).update(str(leaf.dtype) for leaf in jax.tree.leaves(value))
        moved = not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old.get_value()),
                                                           jax.tree.leaves(value), strict=True))
        assert moved == (kind == "adapter"), name
    # The embedding, head and norms stay in param_dtype; the adapters (updated in fp32) stay fp32.
    assert dtypes == {"adapter": {"float32"}, "float base": {"bfloat16"}, "nf4": {"uint8", "float32"}}
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
    assert moments and {str(m.dtype) for m in moments} == {"float32"}
    loss, (trained, frozen, batch) = adapter_loss(XTUNER.replace(dtype="bfloat16"))  # bf16 products, as on chips
    grads = jax.eval_shape(jax.grad(loss), trained, frozen, batch)  # as the step differentiates it
    assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}
    assert {str(f.dtype) for f in jax.tree.leaves(frozen)} == {"bfloat16", "uint8", "float32"}  # NF4 scales fp32


def test_fp32_adapters_merge_and_export_into_weights_in_the_bf16_param_dtype(trained_fp32_adapters, tmp_path):
    from internlm2_jax.convert.peft import base_model, load_adapters, save_adapters

    _, state, _, graphdef, _ = trained_fp32_adapters
    # Computed in fp32, the logits differ by the merge alone: W + (alpha / r) A B rounded to the bf16 param_dtype.
    model = nnx.merge(graphdef, jax.device_get(state.params))
    merged, base = merge_lora(model), base_model(model)
    for exported in (merged, base):
        assert {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(exported))} == {"bfloat16"}
    logits, merged_logits = (np.asarray(x) for x in forward((model, merged), IDS))
    assert np.abs(merged_logits - logits).max() <= 1e-2 * np.abs(logits).max()  # the bf16 bar
    save_adapters(model, tmp_path / "adapter")
    loaded = load_adapters(InternLM2ForCausalLM(model.cfg, rngs=nnx.Rngs(1)), tmp_path / "adapter")
    ours, back = (dict(nnx.to_flat_state(nnx.state(m))) for m in (model, loaded))
    adapters = [p for p in ours if "lora_" in str(p)]
    assert adapters and all(back[p].get_value().dtype == jnp.float32 for p in adapters)
    assert all(np.array_equal(ours[p].get_value(), back[p].get_value()) for p in adapters)


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def test_float_weights_stream_into_a_qlora_model_one_projection_stack_at_a_time(tmp_path, monkeypatch):
    """train.init_weights from a float model directory: each projection's layers are read, stacked, placed and
    quantized before the next projection is read. The result is what quantizing the whole float model gives
    (rebuilt here from the source's weights), and neither the bytes read between two quantizations nor the live
    device bytes ever hold more than one float projection stack beyond the loaded parameters (loading the float
    model whole first, as before, reads every projection before the first quantization)."""
    from internlm2_jax.convert import save_pretrained
    from internlm2_jax.train import init_weights

    cfg = CFG.replace(scan_layers=True, num_hidden_layers=4)
    source = InternLM2ForCausalLM(cfg.replace(lora=None, scan_layers=False), rngs=nnx.Rngs(7))
    save_pretrained(source, tmp_path / "base")
    weights = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(source))}
    del source
    read_since_quantize, peak = [0], {"read": 0, "live": 0}
    read, quantize = init_weights.ModelDirectorySource.__getitem__, init_weights.quantize_like

    def counted_read(self, path):
        value = read(self, path)
        read_since_quantize[0] += value.nbytes
        return value

    def measured_quantize(w, like):
        out = quantize(w, like)  # here the float stack and its NF4 are both alive
        peak["read"], read_since_quantize[0] = max(peak["read"], read_since_quantize[0]), 0
        peak["live"] = max(peak["live"], live_bytes() - baseline)
        return out

    monkeypatch.setattr(init_weights.ModelDirectorySource, "__getitem__", counted_read)
    monkeypatch.setattr(init_weights, "quantize_like", measured_quantize)
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2), jax.devices()[:4])
    gc.collect()
    baseline = live_bytes()
    params = init_weights.initial_params(tmp_path / "base", cfg, InternLM2ForCausalLM, mesh, seed=5)

    expected_adapters = jax.jit(lambda: {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(
        InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(5)))) if "lora_" in str(p)})()
    float_base = cfg.replace(lora=dataclasses.replace(QLORA, quantize_base=None))
    float_shardings = dict(nnx.to_flat_state(state_shardings(model_graphdef(float_base)[1], mesh)))
    stacks = []
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        layers_of = [("model", "layers", i, *path[2:]) for i in range(cfg.num_hidden_layers)]
        if isinstance(value, NF4Weight):  # the float stack quantized whole, as the model itself quantizes it
            stack = np.stack([weights[p] for p in layers_of])
            stacks.append(stack.nbytes)
            # placed as the float parameter is (the absmax mean is reduced over its shards)
            expected = quantize_projection(jax.device_put(stack, float_shardings[path].get_value()),
                                           value.contracted, 1)
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(expected),
                                                            strict=True)), path
        elif "lora_" in str(path):  # the source has none: as a fresh model of the same seed draws them
            assert np.array_equal(value, expected_adapters[path]), path
        else:
            assert np.array_equal(value, np.stack([weights[p] for p in layers_of]) if path[:2] == ("model", "layers")
                                  else weights[path]), path
    wo = dict(nnx.to_flat_state(params))[("model", "layers", "attention", "wo")].get_value()
    # [layers, heads*head_dim/2, embed] placed as the model's own NF4 weight: heads on tensor, embed on fsdp
    assert wo.codes.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    params_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    others = sum(v.get_value().nbytes for p, v in nnx.to_flat_state(params)  # norms, embedding, head
                 if not isinstance(v.get_value(), NF4Weight) and "lora_" not in str(p))
    print(f"float projection stacks {sum(stacks) / 2**20:.2f} MiB (largest {max(stacks) / 2**20:.2f}); read between "
          f"quantizations at most {peak['read'] / 2**20:.2f} MiB; live at most {peak['live'] / 2**20:.2f} MiB over "
          f"loaded parameters of {params_bytes / 2**20:.2f} MiB")
    assert len(stacks) == 5 and 0 < peak["read"] <= max(stacks) + others < sum(stacks)
    assert 0 < peak["live"] <= params_bytes + max(stacks)


# ---- the custom gradient rule at the model's scale ------------------------------------------------------------------

def plain_nf4_dense(x, weight):
    """nf4_dense without its custom_vjp: autodiff through the dequantization (the negative control)."""
    return jnp.dot(x, weight.dequantize_matrix(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def adapter_loss(cfg, seq=32):
    """The LM loss as a function of (adapters, frozen base, batch), as the train step differentiates it, and
    abstract arguments for it."""
    graphdef, params = model_graphdef(cfg)
    trained, frozen = split_trainable(params, TRAINED)
    batch = {k: jax.ShapeDtypeStruct((1, seq), jnp.int32) for k in ("input_ids", "targets", "positions",
                                                                      "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((1, seq), jnp.float32)

    def loss(trained, frozen, batch):
        return LM.loss(graphdef, nnx.merge_state(trained, frozen), batch, None, 1024)[0]

    return loss, (trained, frozen, batch)


def saved_float_residuals(cfg):
    """Shapes of the floating-point residuals the backward of the adapters' gradient keeps (traced only)."""
    loss, (trained, frozen, batch) = adapter_loss(cfg)
    saved = jax.eval_shape(lambda t, f, b: jax.vjp(lambda t: loss(t, f, b), t)[1], trained, frozen, batch)
    return {leaf.shape for leaf in jax.tree.leaves(saved) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def test_the_backward_keeps_the_packed_base_not_the_stacked_dequantized_weights(monkeypatch):
    cfg = CFG.replace(scan_layers=True, remat="none", dtype="bfloat16", num_hidden_layers=3)
    dequantized = {(3, 256, 512), (3, 512, 256), (3, 256, 256)}  # wqkv/w1/w3, w2, wo as [layers, in, out]
    assert not dequantized & saved_float_residuals(cfg)
    monkeypatch.setattr(layers, "nf4_dense", plain_nf4_dense)
    assert dequantized <= saved_float_residuals(cfg)  # the check bites: autodiff keeps every layer's copy


@pytest.mark.slow  # four CPU compiles of the QLoRA gradient: ~80 s on 2 loaded cores (~20 s idle)
def test_compiled_temporaries_grow_by_activations_per_layer_not_by_the_dequantized_weights(monkeypatch):
    def temp_bytes(layers_count):
        cfg = preset("tiny", hidden_size=512, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                     intermediate_size=1536, num_hidden_layers=layers_count, scan_layers=True, remat="none",
                     dtype="bfloat16", lora=QLORA)
        loss, args = adapter_loss(cfg)
        return jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis().temp_size_in_bytes

    layer_bytes = 2 * (512 * 768 + 512 * 512 + 3 * 512 * 1536)  # one layer's projections in bf16
    with_rule = (temp_bytes(4) - temp_bytes(2)) / 2
    monkeypatch.setattr(layers, "nf4_dense", plain_nf4_dense)
    without_rule = (temp_bytes(4) - temp_bytes(2)) / 2
    print(f"temporaries per layer: {with_rule / 2**20:.2f} MiB with the rule, {without_rule / 2**20:.2f} MiB "
          f"without; one layer's bf16 projections {layer_bytes / 2**20:.2f} MiB")
    assert with_rule < 0.5 * layer_bytes  # the saved activations of a 32-token row, no weights
    assert without_rule - with_rule > 0.9 * layer_bytes  # each layer's dequantized copy, kept for the backward


# ---- the 7B step on one v5e chip (the TPU compiler, no TPU) ------------------------------------------------------

@pytest.mark.slow  # ~3.5 min per case on 2 cores (7 loaded): the 7B step compiled by libtpu for an abstract chip
@pytest.mark.parametrize("rank, adapter_dtype, budget_gib", [(8, "None", 8.0), (64, "None", 9.5),
                                                             (8, "float32", 8.0), (64, "float32", 11.5)])
def test_the_7b_qlora_step_compiles_for_one_v5e_chip_within_budget(rank, adapter_dtype, budget_gib):
    """experiments/internlm2_7b_qlora.py (XTuner's settings: 2048 tokens, 16 accumulated micro-batches, remat full,
    bf16 compute; the frozen embedding, head and norms in bf16 (param_dtype)) at `rank`, with the adapters and
    their Adam moments in fp32 (XTuner's) or in param_dtype (`None`), compiled for one chip. Prints the per-chip
    memory. Measured with fp32 adapters: 7.44 GiB at rank 8, 11.01 at rank 64 (fp32 gradients accumulated over the
    micro-batches and the Adam update of 151M adapter parameters: 4.49 GiB of temporaries), so XTuner's rank 64
    does not fit 8 GiB (nor the 9.5 of bf16 adapters)."""
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) provides the TPU compiler")
    import os

    from internlm2_jax.experiment import load_experiment
    from internlm2_jax.launch import compile_train_step
    from internlm2_jax.overrides import apply_overrides
    from internlm2_jax.parallel.topology import memory_report, print_memory_report, tpu_devices

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    exp = load_experiment(Path(__file__).parents[1] / "experiments" / "internlm2_7b_qlora.py").config()
    exp = apply_overrides(exp, [f"model.lora.rank={rank}", f"model.lora.adapter_dtype={adapter_dtype}",
                                "mesh.fsdp=1"])
    assert exp.model.lora.quantize_base == "nf4" and exp.optimizer.trainable == TRAINED
    report = memory_report(compile_train_step(exp, tpu_devices("v5e:2x2")[:1]), 16 << 30)  # one chip of four
    print_memory_report(report, f"7B QLoRA step, rank {rank}, adapters {adapter_dtype}, one v5e chip")
    assert report["fits"] and report["total_gib"] <= budget_gib
