"""The CPU int8 matmul kernel against XLA's form of the same product, its fallback when it cannot be built, and
the projections that reach it (a quantized model's logits with and without the kernel)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.kernels import int8_matmul as kernel
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
        assert not kernel.cpu_kernel_available.__wrapped__()
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
