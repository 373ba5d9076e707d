"""PEFT adapter directories: transformers + peft, which we did not write, load our export and compute our logits."""

import re
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel, get_peft_model_state_dict
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

from internlm2_jax.config import LoraConfig, preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.convert.peft import WEIGHTS_NAME, base_model, load_adapters, save_adapters
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.lora import merge_lora
from lora_testing import set_random_adapters

LORA = LoraConfig(rank=4, alpha=8.0)
TOL = 1e-4


@jax.jit
def run(model, ids):
    return model(ids)


def lora_model(*, scan_layers=False, lora=LORA, seed=0):
    """A tiny model whose adapters are random: B starts at zero, which would make every comparison vacuous."""
    return set_random_adapters(InternLM2ForCausalLM(preset("tiny", lora=lora, scan_layers=scan_layers),
                                                    rngs=nnx.Rngs(seed)), seed)


def random_ids(batch, length, seed=0):
    # The tiny preset's dynamic NTK changes RoPE beyond 64 tokens; HF's Llama recomputes it per call the same way,
    # but staying within keeps this test about the adapters.
    return np.random.RandomState(seed).randint(3, 512, (batch, length)).astype(np.int32)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def adapters_by_layer(model):
    """{(layer, module, adapter, factor): value}, the same for scanned (stacked) and per-layer models."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] in ("lora_a", "lora_b"):
            value = np.asarray(var.get_value())
            if model.cfg.scan_layers:
                out.update({(i, *path[2:]): v for i, v in enumerate(value)})
            else:
                out[path[2:]] = value
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LoRA model, its unmerged base as a Llama directory and its adapters as a PEFT directory."""
    model = lora_model()
    root = tmp_path_factory.mktemp("peft")
    save_pretrained(base_model(model), root / "base", layout="llama")
    save_adapters(model, root / "adapter", layout="llama", base_model_name_or_path=str(root / "base"))
    return model, root


def peft_model(root):
    hf = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    return PeftModel.from_pretrained(hf, root / "adapter").eval()


def test_peft_loads_our_adapter_and_computes_our_logits(exported):
    model, root = exported
    ref = peft_model(root)
    # PEFT's own names for this model's adapters are exactly the tensors we wrote.
    assert set(get_peft_model_state_dict(ref)) == set(load_file(root / "adapter" / WEIGHTS_NAME))
    ids = random_ids(2, 40)
    logits = torch_logits(ref, ids)
    np.testing.assert_allclose(np.asarray(run(model, ids)), logits, atol=TOL, rtol=0)
    with ref.disable_adapter():  # the adapter matters: the base alone computes something else
        assert np.abs(torch_logits(ref, ids) - logits).max() > 1e-2


def test_peft_merge_and_unload_equals_merge_lora(exported):
    model, root = exported
    theirs = peft_model(root).merge_and_unload()
    merged = merge_lora(model)
    save_pretrained(merged, root / "merged", layout="llama")
    ours = load_file(root / "merged" / "model.safetensors")
    state = theirs.state_dict()
    assert set(ours) == set(state)
    for name, value in ours.items():
        np.testing.assert_allclose(value, state[name].numpy(), atol=1e-6, rtol=0, err_msg=name)
    ids = random_ids(2, 24, seed=1)
    np.testing.assert_allclose(np.asarray(run(merged, ids)), torch_logits(theirs, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
@pytest.mark.parametrize("layout", ["llama", "internlm2"])
def test_save_then_load_gives_bit_identical_adapters(tmp_path, layout, scan):
    model = lora_model(scan_layers=scan)
    save_adapters(model, tmp_path, layout=layout)
    fresh = InternLM2ForCausalLM(model.cfg, rngs=nnx.Rngs(1))
    loaded = load_adapters(fresh, tmp_path)
    want = adapters_by_layer(model)
    got = adapters_by_layer(loaded)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))
    # Only the adapters were set: the base weights are still the fresh model's.
    fresh_base = dict(nnx.to_flat_state(nnx.state(base_model(fresh))))
    for path, var in nnx.to_flat_state(nnx.state(base_model(loaded))):
        np.testing.assert_array_equal(var.get_value(), fresh_base[path].get_value(), err_msg=str(path))
    # The directory does not depend on how we lay out layers: the other scan mode loads the same adapters.
    other = InternLM2ForCausalLM(model.cfg.replace(scan_layers=not scan), rngs=nnx.Rngs(1))
    got = adapters_by_layer(load_adapters(other, tmp_path))
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))


def test_a_subset_of_targets_round_trips_and_must_match(tmp_path):
    subset = LoraConfig(rank=4, alpha=8.0, targets=("wqkv", "w2"))
    model = lora_model(lora=subset)
    save_adapters(model, tmp_path, layout="internlm2")
    loaded = load_adapters(InternLM2ForCausalLM(model.cfg, rngs=nnx.Rngs(1)), tmp_path)
    for key, value in adapters_by_layer(model).items():
        np.testing.assert_array_equal(adapters_by_layer(loaded)[key], value)
    with pytest.raises(ValueError, match=re.escape("the adapter's tensors adapt ('wqkv', 'w2')")):
        load_adapters(InternLM2ForCausalLM(preset("tiny", lora=LORA), rngs=nnx.Rngs(1)), tmp_path)


def _layer1(module, factor):
    return f"base_model.model.model.layers.1.{module}.lora_{factor}.weight"


def _drop(tensors):
    del tensors[_layer1("mlp.down_proj", "B")]


def _narrow(tensors):
    tensors[_layer1("self_attn.o_proj", "A")] = tensors[_layer1("self_attn.o_proj", "A")][:3]


def _separate_k(tensors):
    tensors[_layer1("self_attn.k_proj", "A")] = tensors[_layer1("self_attn.k_proj", "A")] + 1.0


ERRORS = {
    "rank": (LoraConfig(rank=8, alpha=16.0), None, "rank: the adapter has r=4, the model cfg.lora.rank=8"),
    "alpha": (LoraConfig(rank=4, alpha=4.0), None, "the adapter has lora_alpha=8.0, the model cfg.lora.alpha=4.0"),
    "no adapters": (None, None, "cfg.lora is None"),
    "missing tensor": (LORA, _drop, f"missing 1 tensors of a llama-layout adapter for 2 layers and targets "
                                    f"('wqkv', 'wo', 'w1', 'w2', 'w3'): {_layer1('mlp.down_proj', 'B')}"),
    "wrong shape": (LORA, _narrow, f"'{_layer1('self_attn.o_proj', 'A')}' has shape [3, 64], but rank 4 and the "
                                   "model's sizes need [4, 64]"),
    "separate q/k/v As": (LORA, _separate_k, "layer 1: self_attn.q_proj, self_attn.k_proj, self_attn.v_proj have "
                                             "different lora_A"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_mismatched_or_broken_adapters_are_refused_with_the_reason(exported, tmp_path, case):
    lora, edit, message = ERRORS[case]
    _, root = exported
    directory = tmp_path / "adapter"
    shutil.copytree(root / "adapter", directory)
    if edit is not None:
        tensors = load_file(directory / WEIGHTS_NAME)
        edit(tensors)
        save_file(tensors, directory / WEIGHTS_NAME)
    model = InternLM2ForCausalLM(preset("tiny", lora=lora), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_adapters(model, directory)
