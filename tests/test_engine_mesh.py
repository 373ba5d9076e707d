"""The continuous-batching engine on a mesh (8 fake CPU devices, tests/conftest.py): every request of a batched trace
equals the same request run alone on one device, the paged cache holds each kv head's pages on its tensor shard and
keeps that layout from call to call (donated), and an engine step that loses the cache rebuilds it on the mesh."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from internlm2_jax.config import preset
from internlm2_jax.decode.engine import Engine, EngineConfig
from internlm2_jax.decode.requests import Request
from internlm2_jax.decode.sampling import SamplingConfig
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.kv_heads import shard_for_decoding
from internlm2_jax.parallel import inference_mesh

CFG = preset("tiny")  # 4 query heads, 2 kv heads
# Few programs: pages of 16 tokens for sequences of 32 (one page-table width), one prefill shape, decode rows 1, 2.
CONFIG = EngineConfig(max_model_len=32, kv_budget_tokens=128, page_size=16, max_running=2, prefill_chunk=16,
                      max_prefill_rows=1)


@pytest.fixture(scope="module")
def model():
    return InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0))


def trace():
    """Four requests of different lengths (one prefilled in two chunks), two sampled with seeds, two at a time."""
    rng = np.random.RandomState(0)
    shapes = [(5, 8, SamplingConfig()), (13, 6, SamplingConfig(temperature=0.9, seed=3)), (2, 10, SamplingConfig()),
              (20, 7, SamplingConfig(temperature=1.0, top_k=20, seed=5))]
    return [Request(tuple(rng.randint(3, CFG.vocab_size, n).tolist()), new, top_n=2, sampling=sampling)
            for n, new, sampling in shapes]


@pytest.fixture(scope="module")
def alone(model):
    engine = Engine(model, None, CONFIG)
    return [engine.generate([request])[0] for request in trace()]


def on_mesh(model, spec):
    return shard_for_decoding(model, inference_mesh(spec))


@pytest.mark.parametrize("spec", ["tensor=4", "data=2,tensor=4", "fsdp=2,tensor=2"])
def test_every_request_on_the_mesh_equals_itself_alone_on_one_device(model, alone, spec):
    engine = Engine(on_mesh(model, spec), None, CONFIG)
    before = engine._step._cache_size()  # engines of one structure share the jitted step (other meshes' programs)
    layout = engine.cache.k[0].sharding
    # tensor=4 over 2 kv heads: each is repeated twice, one head's pages per shard, whole on every data replica.
    assert engine.cache.k[0].shape[0] == (4 if "tensor=4" in spec else 2)
    assert layout.spec == PartitionSpec("tensor") and layout.mesh.shape["tensor"] == engine.cache.k[0].shape[0]
    assert engine.counts.sharding.is_fully_replicated and engine.seen.sharding.is_fully_replicated
    assert engine.programs.decode_rows == ([2] if "data=2" in spec or "fsdp=2" in spec else [1, 2])
    out = engine.generate(trace())
    for request, got, ref in zip(trace(), out, alone, strict=True):
        assert got.tokens == ref.tokens, request
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)
    assert engine.cache.k[0].sharding == layout and engine.cache.v[-1].sharding == layout  # donated, same layout
    compiled = engine._step._cache_size()
    assert compiled - before == len(engine.shapes)  # each shape compiled once: the new cache has the step's layout
    engine.generate(trace()[:1])  # programs already run: no new compile, whatever the cache's layout came back as
    assert engine._step._cache_size() == compiled and len(engine.shapes) <= len(engine.programs.all_programs())


def test_a_lost_cache_is_rebuilt_on_the_mesh(model, monkeypatch):
    engine = Engine(on_mesh(model, "tensor=4"), None, CONFIG)
    request = trace()[0]
    expected = engine.generate([request])[0]
    layout, compiled = engine.cache.k[0].sharding, engine._step._cache_size()

    def lost(params, cache, *args, **kwargs):  # as a step that failed after its donated buffers were taken
        for leaf in jax.tree.leaves(cache):
            leaf.delete()
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine, "_step", lost)
    failed = []
    engine.submit(request, failed.append)
    engine.step()
    assert "device fell over" in failed[-1].error and engine.idle
    monkeypatch.undo()
    assert engine.cache.k[0].sharding == layout and engine.counts.sharding.is_fully_replicated
    assert engine.generate([request])[0].tokens == expected.tokens
    assert engine._step._cache_size() == compiled
