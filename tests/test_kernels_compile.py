"""The kernels really lower for their hardware, with none here: Mosaic compiles the TPU kernels for v5e, v5p and
v6e topologies (libtpu, ahead of time), the GPU kernels lower to Triton for an abstract H100, and the Hopper kernels
go through Mosaic GPU's lowering (layouts, wgmma and TMA shapes are checked there). InternLM2-7B shapes:
32 query heads, 8 kv heads, head_dim 128, bf16."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding, PartitionSpec

from internlm2_jax.kernels import flash_gpu, flash_mgpu, flash_tpu, paged_gpu, paged_tpu

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _flash_loss(kernel):
    def loss(q, k, v, pos, seg):
        out = kernel(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                     interpret=False)
        return out.astype(jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _flash_args(batch, seq, sharding=None):
    sds = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return (sds(batch, seq, HEADS, HEAD_DIM), sds(batch, seq, KV_HEADS, HEAD_DIM), sds(batch, seq, KV_HEADS, HEAD_DIM),
            sds(batch, seq, dtype=jnp.int32), sds(batch, seq, dtype=jnp.int32))


def _paged_args(batch, chunk, context, page_size, sharding=None):
    sds = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    pages = context // page_size
    return (sds(batch, chunk, HEADS, HEAD_DIM), sds(KV_HEADS, batch * pages, page_size, HEAD_DIM),
            sds(KV_HEADS, batch * pages, page_size, HEAD_DIM), sds(batch, pages, dtype=jnp.int32),
            sds(batch, dtype=jnp.int32))


@pytest.fixture(scope="module", params=["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def tpu(request):
    pytest.importorskip("libtpu", reason="TPU AOT compilation needs the libtpu package (test requirements)")
    # libtpu takes a machine-wide lock file by default; a compile-only client must not fail because another process
    # (a parallel test run, a launcher) has libtpu loaded.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=request.param)


def _custom_calls(compiled):
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


@pytest.mark.parametrize("batch, seq", [(2, 4096), (1, 32768)])
def test_tpu_flash_forward_and_backward_compile(tpu, batch, seq):
    one = jax.sharding.SingleDeviceSharding(tpu.devices[0])
    compiled = jax.jit(_flash_loss(flash_tpu.flash_attention)).lower(*_flash_args(batch, seq, one)).compile()
    assert _custom_calls(compiled) == 3  # forward, dq, dk/dv


def test_tpu_flash_compiles_per_shard_inside_shard_map(tpu):
    """Batch over `data`, heads over `model`: each device runs the kernel on its shard (check_vma=False)."""
    mesh = jax.sharding.Mesh(np.array(tpu.devices).reshape(2, 2), ("data", "model"))
    heads, tokens = PartitionSpec("data", None, "model", None), PartitionSpec("data", None)
    sharded = jax.shard_map(_flash_loss(flash_tpu.flash_attention), mesh=mesh,
                            in_specs=(heads, heads, heads, tokens, tokens),
                            out_specs=(PartitionSpec(), (heads, heads, heads)), check_vma=False)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))
            for a, spec in zip(_flash_args(4, 4096), (heads, heads, heads, tokens, tokens), strict=True)]
    assert _custom_calls(jax.jit(sharded).lower(*args).compile()) == 3


@pytest.mark.parametrize("chunk, context, page_size", [(1, 32768, 128), (64, 4096, 64)])
def test_tpu_paged_decode_and_chunked_prefill_compile(tpu, chunk, context, page_size):
    one = jax.sharding.SingleDeviceSharding(tpu.devices[0])
    fn = lambda *a: paged_tpu.paged_attention(*a, interpret=False)
    assert _custom_calls(jax.jit(fn).lower(*_paged_args(8, chunk, context, page_size, one)).compile()) == 1


H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                                                  num_cores=None, platform="cuda"))


def test_gpu_kernels_lower_to_triton():
    """Lowering runs our kernels through Pallas' Triton lowering (PTX compilation happens on the GPU machine)."""
    with jax.sharding.use_abstract_mesh(H100):
        flash = jax.jit(_flash_loss(flash_gpu.flash_attention)).trace(*_flash_args(1, 4096))
        text = flash.lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv
        paged = jax.jit(lambda *a: paged_gpu.paged_attention(*a, interpret=False)).trace(*_paged_args(8, 1, 32768, 16))
        assert paged.lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("seq, ping_pong", [(4096, False), (32768, False), (4096, True)])
def test_mosaic_gpu_kernels_lower(seq, ping_pong):
    """Pallas' Mosaic GPU lowering runs here through Mosaic's own dialect lowering (the PTX step is on the GPU)."""
    kernel = functools.partial(flash_mgpu.flash_attention, ping_pong=ping_pong)
    with jax.sharding.use_abstract_mesh(H100):
        traced = jax.jit(_flash_loss(kernel)).trace(*_flash_args(1, seq))
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3  # forward, dq, dk/dv
    assert "triton" not in text


def test_mosaic_gpu_kernels_lower_per_shard_inside_shard_map():
    """Four abstract H100s, batch over `data` and kv-head groups over `model`: the Hopper kernel is called on each
    shard through `attention(...)`. (Mosaic GPU's interpret mode simulates one device at a time, so the 2x2 CPU
    shard_map test covers the Triton and TPU kernels only.)"""
    from internlm2_jax.model.attention import attention
    mesh = AbstractMesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                        abstract_device=H100.abstract_device)
    args = _flash_args(4, 4096)

    def loss(q, k, v, pos, seg):
        out = attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                        impl="pallas_gpu", gpu_flash_kernel="mosaic")
        return out.astype(jnp.float32).sum()

    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "sdy.manual_computation" in text or "shard_map" in text
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3
    # The kernel sees one shard: 2 of 4 rows, 16 of 32 query heads.
    assert "tensor<2x4096x16x128xbf16>" in text
