"""NF4 with double quantization (the QLoRA base): the code book, the error figures of bitsandbytes' own tests, byte
parity with bitsandbytes when it is installed, 4.127 bits per parameter, and `nf4_dense`'s custom VJP (the value and
dx of autodiff, without the dequantized weight among the saved residuals)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.model.nf4 import (DYNAMIC8_CODE, NF4_CODE, NF4_MIDPOINTS, NF4Weight, nf4_dense, nf4_encode,
                                     quantize_nf4)

# QLoRA appendix E / bitsandbytes `get_4bit_type("nf4")`, as printed in the report (long_context_and_quantization.md).
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
# bitsandbytes' CUDA `dQuantizeNF4` thresholds (csrc/kernels.cu), index of the midpoint: value.
CUDA_THRESHOLDS = {7: 0.03979014977812767, 14: 0.8614784181118011, 0: -0.8480964004993439, 6: -0.045525018125772476}
# bitsandbytes tests/test_functional.py `test_4bit_quant` on randn(1024, 1024), mean over 200 samples (RTX 4090):
# block -> (mean abs error, its std over samples, mean relative error).
BNB_ERRORS = {32: (0.067746, 0.000069, 0.189726), 64: (0.072798, 0.000074, 0.203339),
              128: (0.076831, 0.000091, 0.215237)}


def normal(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_code_book_is_bitsandbytes():
    published = np.array(PUBLISHED_NF4, np.float32)
    assert NF4_CODE.dtype == np.float32 and np.array_equal(NF4_CODE.view(np.uint32), published.view(np.uint32))
    for index, threshold in CUDA_THRESHOLDS.items():  # within one float32 ulp of the CUDA tree's constants
        assert abs(NF4_MIDPOINTS[index] - threshold) <= abs(np.spacing(np.float32(threshold)))
    assert DYNAMIC8_CODE.shape == (256,) and np.all(np.diff(DYNAMIC8_CODE) > 0)
    assert DYNAMIC8_CODE[-1] == 1.0 and 0.0 in DYNAMIC8_CODE and DYNAMIC8_CODE[0] > -1.0
    # Ties go to the lower code, values just above a midpoint to the upper one.
    above = np.nextafter(NF4_MIDPOINTS, np.float32(2))
    assert np.array_equal(nf4_encode(jnp.asarray(NF4_MIDPOINTS)), np.arange(15))
    assert np.array_equal(nf4_encode(jnp.asarray(above)), np.arange(1, 16))


@pytest.mark.parametrize("block", [32, 64, 128])
def test_error_on_a_normal_tensor_matches_bitsandbytes(block):
    w = normal((1024, 1024))
    q = quantize_nf4(w, block=block, double_quant=False)
    error = jnp.abs(q.dequantize() - w)
    relative = error / (jnp.abs(w) + 1e-8)  # bitsandbytes' definition
    # Blocks are independent draws, so the spread of the per-block means over sqrt(blocks) is the standard error of
    # the overall mean: an honest sigma for one 1024x1024 sample, comparable with bnb's spread over 200 samples.
    blocks = 1024 * 1024 // block
    per_block = error.reshape(1024 // block, block, 1024).mean(axis=1)
    sigma = float(per_block.std()) / np.sqrt(blocks)
    rel_sigma = float(relative.reshape(1024 // block, block, 1024).mean(axis=1).std()) / np.sqrt(blocks)
    mean_abs, bnb_sigma, mean_rel = BNB_ERRORS[block]
    assert 0.5 * bnb_sigma < sigma < 2 * bnb_sigma
    assert abs(float(error.mean()) - mean_abs) < 4 * sigma
    assert abs(float(relative.mean()) - mean_rel) < 4 * rel_sigma
    if block == 64:  # bnb's std over its samples: 0.000340
        assert 0.5 * 0.000340 < rel_sigma < 2 * 0.000340
    half_gap = np.diff(NF4_CODE).max() / 2  # nearest-code rounding: no element errs by more than this x its absmax
    assert bool((error.reshape(1024 // block, block, 1024) <= half_gap * q.absmax[:, None, :] * (1 + 1e-6)).all())


def test_bits_per_parameter():
    shape = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)  # shapes only: nothing is quantized
    with_dq = jax.eval_shape(quantize_nf4, shape)
    assert abs(with_dq.bits_per_param() - 4.127) < 0.001  # 4 + 8/64 + 32/(64*256), QLoRA's 0.127
    assert jax.eval_shape(lambda w: quantize_nf4(w, double_quant=False), shape).bits_per_param() == 4.5
    assert with_dq.codes.shape == (2048, 4096) and with_dq.absmax.dtype == jnp.uint8
    assert with_dq.absmax_scale.shape == (64, 16) and with_dq.absmax_offset.shape == ()


def test_double_quant_and_zero_blocks():
    w = normal((512, 256)).at[64:128, :].set(0.0)  # one all-zero block per output column
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    assert dq.double_quant and not plain.double_quant
    for q in (plain, dq):
        out = q.dequantize()
        assert bool(jnp.isfinite(out).all()) and bool((out[64:128] == 0).all())
    nonzero = plain.absmax > 0
    absmax_error = jnp.abs(dq.block_absmax() - plain.absmax) / jnp.where(nonzero, plain.absmax, 1)
    assert float(jnp.where(nonzero, absmax_error, 0).max()) < 0.02  # the dynamic map's step near 1 is < 1.6%
    assert float(jnp.abs(dq.dequantize() - w).mean()) < 1.01 * float(jnp.abs(plain.dequantize() - w).mean())
    assert isinstance(dq[...], NF4Weight) and dq.shape == (512, 256)


def test_bad_inputs_raise():
    w = normal((128, 256))
    with pytest.raises(ValueError, match="divide the input"):
        quantize_nf4(normal((96, 256)))
    with pytest.raises(ValueError, match="divide the output"):
        quantize_nf4(normal((128, 192)))
    with pytest.raises(ValueError, match="even"):
        quantize_nf4(w, block=63)
    with pytest.raises(ValueError, match=r"\[in, out\]"):
        quantize_nf4(normal((2, 64, 256)))
    with pytest.raises(TypeError, match="floating"):
        quantize_nf4(jnp.ones((128, 256), jnp.int8))
    q = quantize_nf4(w)
    with pytest.raises(ValueError, match="does not match"):
        nf4_dense(normal((3, 64)), q)
    with pytest.raises(TypeError, match="floating"):
        nf4_dense(jnp.ones((3, 128), jnp.int32), q)
    with pytest.raises(TypeError, match="read whole"):
        q[0]


def reference(x, weight):
    return jnp.dot(x, weight.dequantize(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def test_nf4_dense_value_and_input_gradient():
    weight = quantize_nf4(normal((128, 256), 1) * 0.02)
    x, probe = normal((2, 3, 128), 2), normal((2, 3, 256), 3)
    assert np.array_equal(nf4_dense(x, weight), x @ weight.dequantize())
    loss = jax.jit(jax.grad(lambda x, f: jnp.sum(f(x, weight) * probe), argnums=0), static_argnums=1)
    np.testing.assert_allclose(loss(x, nf4_dense), loss(x, reference), rtol=1e-6, atol=1e-7)
    half = x.astype(jnp.bfloat16)
    assert nf4_dense(half, weight).dtype == jnp.bfloat16
    np.testing.assert_array_equal(nf4_dense(half, weight), reference(half, weight))


def test_nf4_dense_saves_the_packed_weight_not_its_dequantized_copy():
    weight, x = quantize_nf4(normal((128, 256), 1)), normal((4, 128), 2)

    def float_residuals(product):  # what `jax.vjp` keeps for the backward, traced only
        pullback = jax.eval_shape(lambda x: jax.vjp(lambda x: product(x, weight), x)[1], x)
        return [leaf.shape for leaf in jax.tree.leaves(pullback) if jnp.issubdtype(leaf.dtype, jnp.floating)]

    assert (128, 256) in float_residuals(reference)  # plain autodiff keeps the dequantized weight: the check bites
    saved = float_residuals(nf4_dense)
    assert (128, 256) not in saved and (256, 128) not in saved
    assert all(np.prod(shape) <= weight.absmax.size for shape in saved)  # only the packed weight's small scales


def test_packed_bytes_and_absmax_equal_bitsandbytes():
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    w = normal((1024, 512), 4) * 0.02  # ours [in, out]; bitsandbytes quantizes the HF [out, in] transpose
    w_hf = torch.from_numpy(np.asarray(w).T.copy())
    ours = quantize_nf4(w, double_quant=False)
    packed, state = functional.quantize_4bit(w_hf, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert np.array_equal(np.asarray(ours.absmax).T.reshape(-1), state.absmax.numpy())
    assert np.array_equal(NF4_CODE, state.code.numpy())
    # Our [in/2, out] bytes in bitsandbytes' flat row-major [out, in/2] order. A code may differ only on a near-tie
    # (a value within 1e-6 of a midpoint after scaling): bnb multiplies by 1/absmax as we do, so expect none.
    theirs, mine = packed.numpy().reshape(-1), np.asarray(ours.codes).T.reshape(-1)
    differ = np.nonzero(theirs != mine)[0]
    assert differ.size <= 1e-4 * theirs.size
    scaled = (np.asarray(w).T.reshape(512, 16, 64) / state.absmax.numpy().reshape(512, 16, 1)).reshape(-1)
    for byte in differ:
        pair = scaled[2 * byte: 2 * byte + 2]
        assert np.abs(pair[:, None] - NF4_MIDPOINTS[None]).min() < 1e-6
    # Their dequantization (code value times absmax, fp32), rebuilt from their outputs, is ours.
    nibbles = np.stack([theirs >> 4, theirs & 0xF], axis=1).reshape(512, 16, 64)
    theirs_dense = (NF4_CODE[nibbles] * state.absmax.numpy().reshape(512, 16, 1)).reshape(512, 1024)
    assert np.array_equal(theirs_dense.T, np.asarray(ours.dequantize()))


def test_double_quant_error_matches_bitsandbytes():
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    assert np.array_equal(DYNAMIC8_CODE, functional.create_dynamic_map().numpy())
    w = normal((1024, 1024), 5)
    w_hf = torch.from_numpy(np.asarray(w).T.copy())
    packed, state = functional.quantize_4bit(w_hf, blocksize=64, quant_type="nf4", compress_statistics=True)
    exact = quantize_nf4(w, double_quant=False).absmax.T.reshape(-1)  # bnb's flat [out, in/64] order
    # bnb's double-quantized absmax, decoded from its own tables: code[q] * scale per 256 + offset.
    second = state.state2
    their_absmax = (second.code.numpy()[state.absmax.numpy()].reshape(-1, 256) * second.absmax.numpy()[:, None]
                    ).reshape(-1) + state.offset.item()
    ours = quantize_nf4(w)
    our_absmax = np.asarray(ours.block_absmax()).T.reshape(-1)
    their_error = np.mean(np.abs(their_absmax - exact) / exact)
    assert np.mean(np.abs(our_absmax - exact) / exact) <= 1.1 * their_error
    nibbles = np.stack([packed.numpy().reshape(-1) >> 4, packed.numpy().reshape(-1) & 0xF], axis=1)
    their_dense = (NF4_CODE[nibbles.reshape(1024, 16, 64)] * their_absmax.reshape(1024, 16, 1)).reshape(1024, 1024)
    their_mae = np.mean(np.abs(their_dense.T - np.asarray(w)))
    assert abs(float(jnp.abs(ours.dequantize() - w).mean()) / their_mae - 1) < 0.01
