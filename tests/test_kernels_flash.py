"""TPU and GPU flash kernels (interpret mode) against the XLA reference: forward and dq/dk/dv.

TPU interpret mode costs seconds per case, so the default run covers each feature once (GQA 1/2/4/6, causal and
not, packing with a segment starting mid-block, padding, lengths off the block grid, q_len != kv_len, bf16) and the
full matrix runs with `-m slow`.
"""

import functools
import itertools

import jax.numpy as jnp
import pytest
from kernels_testing import assert_matches_reference, packed_case

from internlm2_jax.kernels import flash_gpu, flash_tpu
from internlm2_jax.kernels.tiling import BlockSizes

# 16-wide blocks make 40-token rows span three blocks, the last one partial.
TPU = functools.partial(flash_tpu.flash_attention, block_sizes=BlockSizes(16, 16), interpret=True)
GPU = functools.partial(flash_gpu.flash_attention, block_sizes=BlockSizes(16, 16), interpret=True)

DEFAULT = [  # (heads, kv_heads, causal, dtype, kv_len)
    (4, 2, True, jnp.float32, None),
    (6, 1, False, jnp.float32, 56),
    (4, 4, True, jnp.bfloat16, None),
    (8, 2, True, jnp.float32, 56),
]
FULL = [(h, kv, causal, dtype, kv_len) for (h, kv), causal, dtype, kv_len in itertools.product(
    [(4, 4), (4, 2), (8, 2), (6, 1)], [True, False], [jnp.float32, jnp.bfloat16], [None, 56])]


@pytest.mark.parametrize("kernel", [TPU, GPU], ids=["tpu", "gpu"])
@pytest.mark.parametrize("heads, kv_heads, causal, dtype, kv_len", DEFAULT)
def test_flash_matches_reference(kernel, heads, kv_heads, causal, dtype, kv_len):
    case = packed_case(heads * 10 + kv_heads, heads=heads, kv_heads=kv_heads, dtype=dtype, kv_len=kv_len)
    assert_matches_reference(kernel, case, causal)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [TPU, GPU], ids=["tpu", "gpu"])
@pytest.mark.parametrize("heads, kv_heads, causal, dtype, kv_len", FULL)
def test_flash_matches_reference_full_matrix(kernel, heads, kv_heads, causal, dtype, kv_len):
    case = packed_case(100 + heads * 10 + kv_heads, heads=heads, kv_heads=kv_heads, dtype=dtype, kv_len=kv_len)
    assert_matches_reference(kernel, case, causal)


def test_default_blocks_shrink_to_short_sequences():
    """With the 512 (TPU) and 128 x 64 (GPU) defaults a 40-token row is one padded block, still exact."""
    case = packed_case(7, heads=4, kv_heads=2)
    assert_matches_reference(functools.partial(flash_tpu.flash_attention, interpret=True), case, True)
    assert_matches_reference(functools.partial(flash_gpu.flash_attention, interpret=True), case, True)


def test_constraint_violations_name_the_constraint():
    case = packed_case(0, heads=2, kv_heads=1, head_dim=24)
    masks = {k: case[k] for k in ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")}
    with pytest.raises(ValueError, match="head_dim to be a power of two"):
        flash_gpu.flash_attention(case["q"], case["k"], case["v"], **masks, interpret=True)
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 8"):
        BlockSizes(block_q=100)
