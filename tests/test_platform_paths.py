"""CPU-only speed paths (the custom-VJP bf16 matmul, causal attention by query blocks, the C++ int8 and decode
attention kernels, the packed int8 layout) are chosen only when compiling for the CPU: with JAX's backend query
answering "tpu" or "gpu", none of them is traced, and on the CPU each one is."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.kernels import decode_attention, int8_matmul
from internlm2_jax.kernels.platform import compiling_for_cpu, target_platform
from internlm2_jax.kernels.reference import xla_attention
from internlm2_jax.model.attention import attention, decode_reads_pages_in_place
from internlm2_jax.model.layers import dense

F32 = jnp.float32


def traced(fn, *args) -> str:
    """The jaxpr of a fresh trace (make_jaxpr caches by function, so each call wraps `fn` anew)."""
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def cpu_paths() -> dict[str, bool]:
    """For each CPU speed path, whether the current trace chooses it."""
    x, w = jnp.ones((4, 64), jnp.bfloat16), jnp.ones((64, 128), jnp.bfloat16)
    rows, packed, scale = jnp.ones((2, 64), F32), *int8_matmul.pack(jnp.ones((64, 128), jnp.int8), jnp.ones(128))
    q = jnp.ones((1, 256, 4, 16), F32)
    kv = q[:, :, :2]
    pos, seg = jnp.broadcast_to(jnp.arange(256), (1, 256)), jnp.ones((1, 256), jnp.int32)
    one = q[:, :1]
    k_pages = jnp.ones((2, 4, 8, 16), F32)
    page_table, lengths = jnp.ones((1, 2), jnp.int32), jnp.full((1,), 9, jnp.int32)
    mask = jnp.ones((1, 1, 256), bool)
    return {
        "bf16 matmul custom vjp": "custom_vjp" in traced(lambda x, w: dense("be,ef->bf", x, w, "bfloat16"), x, w),
        "causal query blocks": "custom_vjp" in traced(
            lambda q: xla_attention(q, kv, kv, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                    kv_segment_ids=seg), q),
        "int8 kernel": "platform_index" in traced(int8_matmul.int8_matmul, rows, packed, scale),
        "decode attention kernel": "platform_index" in traced(
            lambda q: decode_attention.single_query_attention(q, kv, kv, mask), one),
        "decode through the entry point": "platform_index" in traced(
            lambda q: attention(q, kv, kv, q_positions=pos[:, -1:], kv_positions=pos, q_segment_ids=seg[:, :1],
                                kv_segment_ids=seg, impl="xla"), one),
        "paged decode kernel": "platform_index" in traced(
            lambda q: decode_attention.paged_single_query_attention(q, k_pages, k_pages, page_table, lengths), one),
        "paged kernel applies": decode_attention.paged_kernel_applies(F32, F32),
        "engine reads pages in place": decode_reads_pages_in_place("xla", F32, F32),
    }


@pytest.mark.parametrize("backend", ["tpu", "gpu", "cuda"])
def test_no_cpu_path_is_chosen_for_another_platform(monkeypatch, backend):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert target_platform() in ("tpu", "gpu") and not compiling_for_cpu()
    chosen = [name for name, on in cpu_paths().items() if on]
    assert not chosen, f"CPU-only paths chosen for {backend}: {chosen}"


def test_on_cpu_the_speed_paths_are_chosen():
    from internlm2_jax.kernels.decode_attention import cpu_kernel_available, paged_cpu_kernel_available

    assert jax.default_backend() == "cpu" and compiling_for_cpu()
    kernels = {"int8 kernel": int8_matmul.cpu_kernel_available(),
               "decode attention kernel": cpu_kernel_available(),
               "decode through the entry point": cpu_kernel_available(),
               "paged decode kernel": paged_cpu_kernel_available(),
               "paged kernel applies": paged_cpu_kernel_available(),
               "engine reads pages in place": paged_cpu_kernel_available()}
    for name, on in cpu_paths().items():
        assert on == kernels.get(name, True), name  # a kernel that cannot be built here is XLA's form


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_int8_weights_are_not_packed_for_the_cpu_kernel_on_another_platform(monkeypatch, backend):
    from flax import nnx

    from internlm2_jax.config import preset
    from internlm2_jax.model import InternLM2ForCausalLM
    from internlm2_jax.model.quantize import Int8Weight, quantize_int8

    model = InternLM2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    weight = quantize_int8(model).model.layers[0].feed_forward.w1.get_value()
    assert isinstance(weight, Int8Weight) and weight.values.shape == model.model.layers[0].feed_forward.w1.shape


def test_the_rounded_matmul_gives_the_cpu_forms_values_and_gradients(monkeypatch):
    """TPU/GPU's autodiff form and the CPU's written-out backward agree (bf16 -> fp32 is exact, fp32 accumulation
    on both)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 64), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(1), (64, 96), jnp.bfloat16)

    def run():
        loss = lambda x, w: jnp.sum(dense("bte,ef->btf", x, w, "bfloat16").astype(F32) ** 2)
        return jax.jit(jax.value_and_grad(lambda x, w: loss(x, w), argnums=(0, 1)))(x, w)

    cpu = run()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    other = run()
    for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(np.asarray(a, F32), np.asarray(b, F32))
