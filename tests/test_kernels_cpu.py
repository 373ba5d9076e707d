"""The C++ CPU kernels against their XLA forms: the int8 matmul (and its fallback when it cannot be built, and a
quantized model's logits with and without it) and single-query decode attention (values and gradients)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.kernels import decode_attention
from internlm2_jax.kernels import int8_matmul as kernel
from internlm2_jax.kernels.cpu_build import register_cpu_kernel
from internlm2_jax.kernels.reference import dense_attention, paged_attention_reference
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.layers import contract
from internlm2_jax.model.quantize import quantize_int8

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                                    reason="no C++ compiler here to build the CPU int8 kernel")


def _operands(rows, k, n, seed=0):
    """x, and a [k, n] int8 weight with its scales packed for the kernel."""
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(rows, k).astype(np.float32))
    values = jnp.asarray(rng.randint(-127, 128, (k, n)).astype(np.int8))
    return (x, *kernel.pack(values, jnp.asarray(rng.rand(n).astype(np.float32) + 0.5)))


def test_pack_round_trips_and_refuses_partial_strips():
    values = jnp.asarray(np.random.RandomState(0).randint(-127, 128, (5, 128)).astype(np.int8))
    packed, _ = kernel.pack(values, jnp.ones(128))
    assert packed.shape == (2, 5, kernel.STRIP)
    np.testing.assert_array_equal(np.asarray(kernel.unpack(packed)), np.asarray(values))
    with pytest.raises(ValueError, match="multiples of 64"):
        kernel.pack(values[:, :70], jnp.ones(70))


@needs_compiler
@pytest.mark.parametrize("rows,k,n", [(1, 512, 4096), (4, 64, 128), (7, 33, 192), (16, 96, 64), (3, 5, 64),
                                      (kernel.KERNEL_MAX_ROWS, 40, 256)])
def test_kernel_matches_xla(rows, k, n):
    assert kernel.cpu_kernel_available()
    x, values, scale = _operands(rows, k, n)
    got = jax.jit(kernel.int8_matmul)(x, values, scale)
    want = kernel.int8_matmul_xla(x, values, scale)
    assert kernel.TARGET in jax.jit(kernel.int8_matmul).lower(x, values, scale).as_text()  # not the fallback
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))


def test_without_a_compiler_it_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached build to find
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not register_cpu_kernel.__wrapped__("int8_matmul_cpu.cc", "Int8Matmul", "never_registered")
    monkeypatch.setattr(kernel, "cpu_kernel_available", lambda: False)
    x, values, scale = _operands(2, 16, 64)
    assert kernel.TARGET not in jax.jit(kernel.int8_matmul).lower(x, values, scale).as_text()
    np.testing.assert_allclose(np.asarray(kernel.int8_matmul(x, values, scale)),
                               np.asarray(x @ kernel.unpack(values).astype(jnp.float32) * scale), rtol=1e-6)


@needs_compiler
def test_packed_model_equals_the_unpacked_one_with_and_without_the_kernel(monkeypatch):
    fp32 = InternLM2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    packed, plain = quantize_int8(fp32), quantize_int8(fp32, packed=False)
    head = packed.output.get_value()
    assert head.packed_shape == fp32.output.shape and head.values.ndim == 3
    np.testing.assert_array_equal(np.asarray(head.dequantize()), np.asarray(plain.output.get_value().dequantize()))
    ids = jnp.asarray(np.random.RandomState(1).randint(3, 128, (2, 9)), jnp.int32)
    forward = jax.jit(lambda m, x: m(x))
    assert kernel.TARGET in forward.lower(packed, ids).as_text()
    want = np.asarray(forward(plain, ids))
    np.testing.assert_allclose(np.asarray(forward(packed, ids)), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(kernel, "cpu_kernel_available", lambda: False)  # XLA's matmul of the unpacked strips
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(packed, ids)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("equation,lhs,rhs", [("bthd,hde->bte", (2, 3, 4, 5), (4, 5, 6)),
                                              ("bte,ekgd->btkgd", (2, 3, 4), (4, 2, 3, 5)),
                                              ("bte,hde->bthd", (2, 3, 6), (4, 5, 6)),
                                              ("bthd,bte->hde", (2, 3, 4, 5), (2, 3, 6))])
def test_contract_equals_einsum_and_keeps_the_weight_in_place(equation, lhs, rhs):
    x = jax.random.normal(jax.random.key(0), lhs)
    w = jax.random.normal(jax.random.key(1), rhs)
    np.testing.assert_allclose(np.asarray(contract(equation, x, w)), np.asarray(jnp.einsum(equation, x, w)),
                               rtol=1e-5, atol=1e-5)
    if equation == "bthd,hde->bte":  # einsum contracts (d, h) and XLA transposed the weight to match
        hlo = jax.jit(lambda x, w: contract(equation, x, w)).lower(x[:1, :1], w).compile().as_text()
        assert "transpose" not in hlo


@needs_compiler
@pytest.mark.parametrize("batch,keys,kv_heads,group,head_dim", [(3, 37, 2, 4, 64), (2, 256, 1, 6, 128),
                                                                  (4, 20, 2, 1, 32), (1, 9, 3, 2, 8)])
def test_single_query_attention_matches_the_reference(batch, keys, kv_heads, group, head_dim):
    assert decode_attention.cpu_kernel_available()
    rng = np.random.RandomState(keys)
    q = jnp.asarray(rng.randn(batch, 1, kv_heads * group, head_dim).astype(np.float32))
    k, v = (jnp.asarray(rng.randn(batch, keys, kv_heads, head_dim).astype(np.float32)) for _ in range(2))
    mask = rng.rand(batch, 1, keys) > 0.4
    mask[0] = False  # a row that attends to nothing (padding) gives zeros
    mask = jnp.asarray(mask)
    run = jax.jit(decode_attention.single_query_attention)
    assert decode_attention.TARGET in run.lower(q, k, v, mask).as_text()
    reference = lambda q, k, v: dense_attention(None, q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    got, want = run(q, k, v, mask), reference(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert not np.asarray(got)[0].any()
    grads = jax.grad(lambda q, k, v: (run(q, k, v, mask) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    want_grads = jax.grad(lambda q, k, v: (reference(q, k, v) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_single_query_attention_keeps_the_reference_for_several_queries_or_bf16():
    q = jnp.ones((1, 2, 2, 16))
    k = v = jnp.ones((1, 5, 1, 16))
    mask = jnp.ones((1, 2, 5), bool)
    run = jax.jit(decode_attention.single_query_attention)
    assert decode_attention.TARGET not in run.lower(q, k, v, mask).as_text()
    half = [a[:, :1].astype(jnp.bfloat16) for a in (q, k, v)]
    assert decode_attention.TARGET not in run.lower(*half, mask[:, :1, :1]).as_text()


@needs_compiler
@pytest.mark.parametrize("kv_heads,group,head_dim,page_size", [(2, 4, 64, 16), (1, 3, 32, 5), (3, 2, 16, 8)])
def test_paged_single_query_attention_matches_the_reference(kv_heads, group, head_dim, page_size):
    assert decode_attention.paged_cpu_kernel_available()
    rng = np.random.RandomState(head_dim)
    batch, pages, width = 6, 24, 4
    q = jnp.asarray(rng.randn(batch, 1, kv_heads * group, head_dim).astype(np.float32))
    k_pages, v_pages = (jnp.asarray(rng.randn(kv_heads, pages, page_size, head_dim).astype(np.float32))
                        for _ in range(2))
    page_table = jnp.asarray(rng.randint(1, pages, (batch, width)), jnp.int32)
    lengths = jnp.asarray([1, page_size, page_size + 1, width * page_size, 3, 7], jnp.int32)
    q_lengths = jnp.asarray([1, 1, 1, 1, 0, 1], jnp.int32)  # row 4 is padding: zeros
    args = (q, k_pages, v_pages, page_table, lengths)
    run = jax.jit(lambda *a: decode_attention.paged_single_query_attention(*a, q_lengths=q_lengths))
    assert decode_attention.PAGED_TARGET in run.lower(*args).as_text()
    got, want = run(*args), paged_attention_reference(*args, q_lengths=q_lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert not np.asarray(got)[4].any()
    with pytest.raises(Exception, match="page id out of range"):
        run(q, k_pages, v_pages, page_table.at[3, 2].set(pages), lengths).block_until_ready()
