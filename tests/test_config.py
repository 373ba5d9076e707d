"""ModelConfig: presets, exact parameter counts (spec §1.10), HF config.json in both forms, validation."""

import jax
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import PRESETS, ConfigError, ModelConfig, RopeScaling, preset
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.model.layers import dynamic_ntk_base, rotary_tables

SPEC_COUNTS = {"internlm2_1_8b": 1_889_110_016, "internlm2_7b": 7_737_708_544, "internlm2_20b": 19_861_149_696}


def abstract_count(cfg, cls=InternLM2ForCausalLM) -> int:
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))  # shapes only: no allocation
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(SPEC_COUNTS))
def test_released_parameter_counts_match_the_spec_exactly(name):
    cfg = PRESETS[name]
    assert cfg.num_params() == SPEC_COUNTS[name]
    assert abstract_count(cfg) == SPEC_COUNTS[name]
    assert abstract_count(cfg.replace(scan_layers=True)) == SPEC_COUNTS[name]


def test_closed_form_count_matches_the_built_module_for_variants():
    for cfg in (preset("tiny", bias=True), preset("tiny", tie_word_embeddings=True), preset("bench")):
        assert abstract_count(cfg) == cfg.num_params()
    assert abstract_count(preset("tiny"), InternLM2ForRewardModel) == preset("tiny").num_params(reward_head=True)
    assert preset("bench").num_params() == 57_680_384  # the benchmark shape of issue 2 ("57.7M")


def test_preset_shapes_follow_the_spec_table():
    c = PRESETS["internlm2_7b"]
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (92544, 4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.q_per_kv) == (32, 8, 128, 4)
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-5 and not c.bias and not c.tie_word_embeddings
    assert PRESETS["internlm2_20b"].q_per_kv == 6 and PRESETS["internlm2_1_8b"].q_per_kv == 2
    tiny = PRESETS["tiny"]
    assert tiny.rope_scaling == RopeScaling("dynamic", 2.0)  # so tests exercise dynamic NTK beyond 64 tokens


RELEASED_7B_CONFIG = {  # the form of the released InternLM2 config.json
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 92544,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rms_norm_eps": 1e-05, "bias": False,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}


def test_from_hf_config_reads_the_released_internlm2_form():
    cfg = ModelConfig.from_hf_config(RELEASED_7B_CONFIG)
    assert cfg == PRESETS["internlm2_7b"]
    assert ModelConfig.from_hf_config(cfg.to_hf_config("internlm2")) == cfg


def test_from_hf_config_reads_the_current_transformers_form():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "attention_bias": True,
          "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}}
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.head_dim == 32 and cfg.bias and cfg.rope_theta == 5e5
    assert cfg.rope_scaling == RopeScaling("linear", 4.0)
    assert ModelConfig.from_hf_config(cfg.to_hf_config("llama")) == cfg
    plain = dict(hf, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert ModelConfig.from_hf_config(plain).rope_scaling is None


@pytest.mark.parametrize("change, field", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_scaling=RopeScaling("yarn", 2.0)), "rope_scaling.type"),
    (dict(rope_scaling=RopeScaling("dynamic", 0.5)), "rope_scaling.factor"),
    (dict(dtype="float8"), "dtype"),
    (dict(remat="sometimes"), "remat"),
    (dict(head_dim=15), "head_dim"),
])
def test_impossible_configs_are_rejected_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        preset("tiny", **change)


def test_hf_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf_config(dict(RELEASED_7B_CONFIG, rope_scaling={"type": "yarn", "factor": 2.0}))
    with pytest.raises(ConfigError, match="'hidden_size'"):
        ModelConfig.from_hf_config({k: v for k, v in RELEASED_7B_CONFIG.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_hf_config(dict(RELEASED_7B_CONFIG, hidden_act="gelu"))
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("internlm3")


def test_rope_inverse_frequencies_match_spec_11_4():
    cfg = PRESETS["internlm2_7b"]
    positions = np.ones((1, 1), np.int32)  # at position 1 the angle equals inv_freq
    cos, sin = rotary_tables(cfg, positions, positions)
    angles = np.arctan2(np.asarray(sin), np.asarray(cos))[0, 0, :64]
    np.testing.assert_allclose(angles[:4], [1.0, 0.805842, 0.649382, 0.523299], rtol=2e-6)
    np.testing.assert_allclose(angles[63], 1.24094e-6, rtol=1e-5)


@pytest.mark.parametrize("length, base", [(32768, 1.000000e6), (32769, 1.000062e6), (65536, 3.052774e6),
                                          (131072, 7.219586e6), (200000, 1.164526e7), (262144, 1.565883e7)])
def test_dynamic_ntk_base_matches_spec_11_5(length, base):
    np.testing.assert_allclose(float(dynamic_ntk_base(1e6, 2.0, 32768, 128, length)), base, rtol=2e-6)


def test_dynamic_ntk_base_for_the_1m_variant():
    np.testing.assert_allclose(float(dynamic_ntk_base(5e7, 2.5, 262144, 128, 1_048_576)), 4.39685e8, rtol=2e-6)
