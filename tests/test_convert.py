"""HF interop: the wqkv layout, bit-exact round trips, sharded files, meshes, the CLI, and every error path."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import LlamaForCausalLM

from internlm2_jax.config import PRESETS, preset
from internlm2_jax.convert import CheckpointError, load_pretrained, pack_wqkv, save_pretrained, split_wqkv
from internlm2_jax.convert.safetensors_io import CheckpointReader, SafetensorsFile, write_checkpoint
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel


def params_of(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=str(key))


@pytest.fixture(scope="module")
def tiny():
    return InternLM2ForCausalLM(preset("tiny", bias=True), rngs=nnx.Rngs(0))


def test_wqkv_split_then_pack_is_the_identity():
    cfg = preset("tiny")
    rows = cfg.num_key_value_heads * (cfg.q_per_kv + 2) * cfg.head_dim
    fused = np.random.RandomState(0).randn(rows, cfg.hidden_size).astype(np.float32)
    q, k, v = split_wqkv(cfg, fused)
    assert q.shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
    assert k.shape == v.shape == (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)
    np.testing.assert_array_equal(pack_wqkv(cfg, q, k, v), fused)


def test_wqkv_row_layout_matches_spec_11_2_on_a_7b_shaped_tensor():
    cfg = PRESETS["internlm2_7b"]
    fused = np.broadcast_to(np.arange(6144, dtype=np.int32)[:, None], (6144, 4096))  # each row holds its index
    q, k, v = split_wqkv(cfg, fused)
    rows = lambda t: t[:, 0]  # noqa: E731
    # Rows 0-511 are q heads 0-3, 512-639 k head 0, 640-767 v head 0, 768+ q heads 4-7, ...
    np.testing.assert_array_equal(rows(q)[:512], np.arange(512))
    np.testing.assert_array_equal(rows(k)[:128], np.arange(512, 640))
    np.testing.assert_array_equal(rows(v)[:128], np.arange(640, 768))
    np.testing.assert_array_equal(rows(q)[512:1024], np.arange(768, 1280))
    np.testing.assert_array_equal(rows(k)[128 * 7:], np.arange(7 * 768 + 512, 7 * 768 + 640))
    assert (q.shape, k.shape) == ((4096, 4096), (1024, 4096))
    np.testing.assert_array_equal(pack_wqkv(cfg, q, k, v), fused)


@pytest.mark.parametrize("layout", ["internlm2", "llama"])
def test_save_then_load_is_bit_exact(tmp_path, tiny, layout):
    save_pretrained(tiny, tmp_path, layout=layout)
    cfg, again = load_pretrained(tmp_path)
    assert cfg == tiny.cfg
    assert_same_params(tiny, again)
    expected_arch = "InternLM2ForCausalLM" if layout == "internlm2" else "LlamaForCausalLM"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [expected_arch]


def test_scanned_model_round_trips_through_unscanned_files(tmp_path, tiny):
    save_pretrained(tiny, tmp_path / "a", layout="internlm2")
    _, scanned = load_pretrained(tmp_path / "a", scan_layers=True)
    assert scanned.model.layers.attention.wqkv.shape[0] == tiny.cfg.num_hidden_layers
    save_pretrained(scanned, tmp_path / "b", layout="internlm2")
    _, again = load_pretrained(tmp_path / "b")
    assert_same_params(tiny, again)


def test_sharded_files_with_an_index_round_trip(tmp_path, tiny):
    save_pretrained(tiny, tmp_path, layout="llama", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert_same_params(tiny, load_pretrained(tmp_path)[1])


def test_transformers_loads_our_llama_export_and_agrees(tmp_path):
    model = InternLM2ForCausalLM(preset("tiny", rope_scaling=None), rngs=nnx.Rngs(3))
    save_pretrained(model, tmp_path, layout="llama")
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(3, 512, (2, 20))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(model, ids)), expected, atol=1e-4, rtol=0)


def test_bf16_export_states_the_conversion_and_loads_back(tmp_path, tiny, caplog):
    with pytest.warns(UserWarning, match="from float32 to bfloat16"):
        load_pretrained(save_pretrained(tiny, tmp_path / "f32"), param_dtype="bfloat16")
    save_pretrained(tiny, tmp_path / "bf16", dtype="bfloat16")
    reader = CheckpointReader(tmp_path / "bf16")
    assert {reader.dtype(k).name for k in reader.keys()} == {"bfloat16"}
    with caplog.at_level("INFO", logger="internlm2_jax.convert"):
        _, widened = load_pretrained(tmp_path / "bf16")
    assert "from bfloat16 to float32" in caplog.text
    w = params_of(widened)[("output",)]
    np.testing.assert_allclose(w, params_of(tiny)[("output",)], rtol=1e-2, atol=1e-3)


def test_loading_onto_a_mesh_places_each_parameter_on_its_sharding(tmp_path, tiny):
    save_pretrained(tiny, tmp_path)
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    _, sharded = load_pretrained(tmp_path, mesh=mesh)
    assert sharded.model.layers[0].attention.wqkv[...].sharding.spec == P("fsdp", None, None, None)  # kv_heads=2
    assert sharded.model.layers[0].feed_forward.w1[...].sharding.spec == P("fsdp", "tensor")
    assert sharded.output[...].sharding.spec == P("fsdp", "tensor")
    ids = np.random.RandomState(1).randint(3, 512, (2, 16))
    forward = jax.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(forward(sharded, ids)), np.asarray(forward(tiny, ids)), atol=1e-5)


def test_reward_model_round_trip(tmp_path):
    rm = InternLM2ForRewardModel(preset("tiny"), rngs=nnx.Rngs(0))
    save_pretrained(rm, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["InternLM2ForRewardModel"]
    assert "v_head.weight" in CheckpointReader(tmp_path) and "output.weight" not in CheckpointReader(tmp_path)
    _, again = load_pretrained(tmp_path)
    assert isinstance(again, InternLM2ForRewardModel)
    assert_same_params(rm, again)


# ---- bad input -------------------------------------------------------------------------------------------------

def test_model_directory_names_its_chat_template(tmp_path, tiny, trained):
    from internlm2_jax.chat_template import chat_template_for_directory, get_chat_template

    with pytest.raises(KeyError, match="unknown chat template 'nope'"):
        save_pretrained(tiny, tmp_path / "nope", tokenizer=trained, chat_template="nope")
    assert not (tmp_path / "nope").exists()  # refused before anything is written
    save_pretrained(tiny, tmp_path / "model", tokenizer=trained)
    assert chat_template_for_directory(tmp_path / "model") is get_chat_template("internlm2_chat")


def test_unknown_architecture_is_named(tmp_path, tiny):
    save_pretrained(tiny, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, architectures=["MistralForCausalLM"])))
    with pytest.raises(CheckpointError, match="unsupported architectures \\['MistralForCausalLM'\\]"):
        load_pretrained(tmp_path)


def test_missing_config_and_missing_weights_are_named(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
    save_pretrained(tiny, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_pretrained(tmp_path)


def test_missing_tensors_are_listed(tmp_path, tiny):
    save_pretrained(tiny, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=3)))
    with pytest.raises(CheckpointError, match="missing tensors .* 3 layers: model.layers.2.attention_norm.weight"):
        load_pretrained(tmp_path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, tiny):
    save_pretrained(tiny, tmp_path, layout="llama")
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, intermediate_size=128)))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[160, 64\] in the "
                                              r"checkpoint, but config.json implies \[128, 64\]"):
        load_pretrained(tmp_path)


def test_unexpected_tensors_are_refused_unless_not_strict(tmp_path, tiny):
    save_pretrained(tiny, tmp_path)
    stray = np.zeros((3,), np.float32)
    write_checkpoint(tmp_path / "extra", [("model.layers.9.stray.weight", (3,), stray.dtype, lambda: stray)])
    (tmp_path / "extra" / "model.safetensors").rename(tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="1 tensors that this model does not use: model.layers.9.stray"):
        load_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="stray"):
        _, model = load_pretrained(tmp_path, strict=False)
    assert_same_params(tiny, model)


def test_a_causal_lm_checkpoint_read_as_a_reward_model_names_the_missing_head(tmp_path, tiny):
    save_pretrained(tiny, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, architectures=["InternLM2ForRewardModel"])))
    with pytest.raises(CheckpointError, match="missing tensors for a internlm2 reward model.*v_head.weight"):
        load_pretrained(tmp_path, strict=False)


def test_truncated_safetensors_file_is_detected(tmp_path, tiny):
    save_pretrained(tiny, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="too short"):
        load_pretrained(tmp_path)


def test_cli_converts_between_layouts(tmp_path, tiny):
    save_pretrained(tiny, tmp_path / "src", layout="internlm2")
    cmd = [sys.executable, "-m", "internlm2_jax.convert", str(tmp_path / "src"), str(tmp_path / "dst"),
           "--layout", "llama"]
    # Loaded onto a tensor=4 mesh: the model written is the source's, its 2 kv heads not repeated.
    done = subprocess.run(cmd + ["--cpu-devices", "8", "--mesh", "tensor=4"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "on mesh {'data': 1, 'fsdp': 1, 'tensor': 4, 'sequence': 1}" in done.stderr
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["num_key_value_heads"] == 2
    assert_same_params(tiny, load_pretrained(tmp_path / "dst")[1])
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "nowhere"), str(tmp_path / "x"), "--layout", "llama"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "does not exist" in bad.stderr
