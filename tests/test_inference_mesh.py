"""Decoding on a device mesh equals decoding on one device: mesh specs, KV caches on their shardings, kv heads
repeated up to the tensor degree, greedy and sampled generation, int8 weights, in fp32 (logits within 1e-4)."""

import jax
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.decode import SamplingConfig, generate_ids
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.kv_cache import init_cache
from internlm2_jax.model.kv_heads import kv_head_factor, replicate_kv_heads, shard_for_decoding
from internlm2_jax.model.paged_cache import init_paged_cache
from internlm2_jax.model.quantize import quantize_int8
from internlm2_jax.parallel import MeshConfig, inference_mesh, parse_mesh

PROMPTS = [[5, 9, 33, 2, 8, 71, 300], [100, 7], [42, 43, 44, 45]]  # three rows: padding on every data degree
MESHES = ["tensor=4", "data=2,tensor=4", "fsdp=2,tensor=2"]


@pytest.fixture(scope="module")
def model():
    cfg = preset("tiny", max_position_embeddings=256, initializer_range=0.1)  # 4 heads over 2 kv heads
    return InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(3))


def on_mesh(model, spec):
    mesh = inference_mesh(spec)
    return shard_for_decoding(model, mesh), mesh


def assert_same(expected, got):
    for e, g in zip(expected, got, strict=True):
        assert g.tokens == e.tokens
        np.testing.assert_allclose(g.logprobs, e.logprobs, atol=1e-4, rtol=0)
        for e_top, g_top in zip(e.top_logprobs, g.top_logprobs, strict=True):
            assert list(g_top) == list(e_top)


def test_mesh_specs_parse_and_refuse_clearly():
    assert parse_mesh("data=2,tensor=4") == MeshConfig(data=2, fsdp=1, tensor=4, sequence=1)
    assert parse_mesh("tensor=-1") == MeshConfig(data=1, fsdp=1, tensor=-1, sequence=1)
    assert inference_mesh("tensor=4").devices.size == 4  # the first four of the eight
    assert dict(inference_mesh("data=2,tensor=-1").shape)["tensor"] == 4
    with pytest.raises(ValueError, match="'tensr=4' is not AXIS=SIZE"):
        parse_mesh("tensr=4")
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        parse_mesh("data=-1,tensor=-1")
    with pytest.raises(ValueError, match="needs 16 devices, but 8 are available"):
        inference_mesh("data=4,tensor=4")
    with pytest.raises(ValueError, match="not the sequence: got sequence=2"):
        inference_mesh("sequence=2,tensor=2")


def test_kv_heads_are_repeated_up_to_the_tensor_degree_not_to_all_query_heads(model):
    cfg = model.cfg
    assert kv_head_factor(cfg, 1) == kv_head_factor(cfg, 2) == 1 and kv_head_factor(cfg, 4) == 2
    with pytest.raises(ValueError, match="does not fit 2 kv heads of 2 query heads each"):
        kv_head_factor(cfg, 8)  # each kv head would need to split its two query heads four ways
    with pytest.raises(ValueError, match="must divide"):
        kv_head_factor(preset("tiny", num_attention_heads=6, num_key_value_heads=3), 2)
    wide = replicate_kv_heads(model, 2)
    assert wide.cfg.num_key_value_heads == 4 and wide.cfg.num_attention_heads == 4
    ids = np.asarray([PROMPTS[0]])
    np.testing.assert_allclose(wide(ids), model(ids), atol=1e-5, rtol=0)  # the same function


@pytest.mark.parametrize("spec", MESHES)
def test_generation_on_a_mesh_equals_one_device(model, spec):
    sampled = [SamplingConfig(), SamplingConfig(temperature=0.9, top_k=20, seed=7), SamplingConfig()]
    expected = generate_ids(model, PROMPTS, max_new_tokens=10, top_n=3, sampling=sampled)
    placed, mesh = on_mesh(model, spec)
    tensor = dict(mesh.shape)["tensor"]
    assert placed.cfg.num_key_value_heads == max(2, tensor)
    assert_same(expected, generate_ids(placed, PROMPTS, max_new_tokens=10, top_n=3, sampling=sampled))


def test_caches_are_created_on_their_shardings(model):
    placed, mesh = on_mesh(model, "data=2,tensor=4")
    cache = init_cache(placed.cfg, 4, 32, mesh=mesh)
    assert cache.k[0].sharding.spec == jax.sharding.PartitionSpec(("data",), "tensor")
    assert cache.positions.sharding.spec == jax.sharding.PartitionSpec(("data",))
    paged = init_paged_cache(placed.cfg, 9, 16, mesh=mesh)
    assert paged.k[0].sharding.spec == jax.sharding.PartitionSpec("tensor")
    assert paged.k[0].addressable_shards[0].data.shape == (1, 9, 16, 16)  # one of the four kv heads per shard


def test_int8_weights_decode_on_a_mesh_as_on_one_device(model):
    expected = generate_ids(quantize_int8(model, packed=False), PROMPTS, max_new_tokens=8, top_n=2)
    placed, _ = on_mesh(model, "data=2,tensor=4")
    assert_same(expected, generate_ids(quantize_int8(placed), PROMPTS, max_new_tokens=8, top_n=2))
