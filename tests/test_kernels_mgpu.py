"""The Hopper (Mosaic GPU) flash kernels, forward, dq and dk/dv, in Mosaic GPU's interpret mode: a CPU simulation of
the warpgroups, shared memory, TMA copies, wgmma and mbarriers that also refuses a barrier phase some thread never
observed. Each case spans several q and kv blocks so the producers' slot rings wrap and the masked and unmasked loops
both run. (The simulation runs each wgmma to completion at once, so a missing wgmma wait would not show here.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from kernels_testing import assert_matches_reference, packed_case, tiny_model_loss_and_grads

from internlm2_jax.config import ConfigError, preset
from internlm2_jax.kernels import flash_mgpu, mgpu_pipeline
from internlm2_jax.kernels.reference import attention_mask
from internlm2_jax.kernels.tiling import BlockSizes

BLOCKS = BlockSizes(128, 64)
MOSAIC = functools.partial(flash_mgpu.flash_attention, block_sizes=BLOCKS, interpret=True)


@pytest.mark.parametrize("heads, kv_heads, causal, q_len, kv_len, ping_pong", [
    (4, 2, True, 200, None, False),  # packed row with a document starting mid-block, padding, ragged length
    (6, 1, False, 136, 264, False),  # GQA 6, keys beyond the queries (prefill after a cache), not causal
    (2, 2, True, 320, None, True),  # long single document: whole visible blocks take the unmasked loop; ping-pong
])
def test_mosaic_flash_matches_reference(heads, kv_heads, causal, q_len, kv_len, ping_pong):
    case = packed_case(heads * 10 + kv_heads, heads=heads, kv_heads=kv_heads, head_dim=64, q_len=q_len,
                       kv_len=kv_len, dtype=jnp.bfloat16)
    assert_matches_reference(functools.partial(MOSAIC, ping_pong=ping_pong), case, causal)


def _brute_force_ranges_hold(q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv):
    ranges = np.asarray(mgpu_pipeline.mask_ranges(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal))
    mask = np.asarray(attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal))  # [batch, q, kv]
    batch, q_len, kv_len = mask.shape
    tiles = mask.reshape(batch, q_len // block_q, block_q, kv_len // block_kv, block_kv)
    any_visible, all_visible = tiles.any((2, 4)), tiles.all((2, 4))
    unmasked = 0
    for b in range(batch):
        for t in range(q_len // block_q):
            lo, f_lo, f_hi, hi = ranges[b, t]
            assert 0 <= lo <= f_lo <= f_hi <= hi <= kv_len // block_kv
            outside = np.r_[0:lo, hi:kv_len // block_kv]
            assert not any_visible[b, t, outside].any(), (b, t, ranges[b, t])
            assert all_visible[b, t, f_lo:f_hi].all(), (b, t, ranges[b, t])
            unmasked += f_hi - f_lo
    return unmasked


def test_mask_ranges_skip_only_hidden_blocks_and_drop_masks_only_where_all_visible():
    rng = np.random.default_rng(0)
    length, block = 512, 64
    one_doc = np.broadcast_to(np.arange(length, dtype=np.int32), (2, length))
    assert _brute_force_ranges_hold(one_doc, one_doc, np.ones_like(one_doc), np.ones_like(one_doc), True, 128,
                                    block) > 0
    for seed in range(6):
        cuts = np.sort(rng.choice(np.arange(1, length), 5, replace=False))
        doc = np.searchsorted(cuts, np.arange(length), side="right")
        pos, seg = (np.arange(length) - np.r_[0, cuts][doc]).astype(np.int32), (doc + 1).astype(np.int32)
        seg[length - rng.integers(1, 100):] = 0
        pos, seg = np.stack([pos, one_doc[0]]), np.stack([seg, np.ones(length, np.int32)])
        if seed % 2:  # positions that do not grow with the index (a tree or reordered rows)
            pos = rng.permutation(pos, axis=1)
        _brute_force_ranges_hold(pos, pos, seg, seg, bool(seed % 3), 128, block)


@pytest.mark.parametrize("ping_pong", [False, True])
def test_mosaic_kernels_have_no_shared_memory_races(ping_pong, capsys):
    """Forward, dq and dk/dv with the race detector on (a GQA group of 2, so dk/dv streams two heads' blocks; more
    steps than slots, so every ring wraps). The detector prints each race it finds, in any of the three kernels
    (its `races_found` flag only describes the last kernel run)."""
    case = packed_case(1, heads=2, kv_heads=1, head_dim=64, q_len=256, batch=1, dtype=jnp.bfloat16)
    kernel = functools.partial(flash_mgpu.flash_attention, block_sizes=BLOCKS, ping_pong=ping_pong,
                               interpret=plgpu.InterpretGPUParams(detect_races=True))
    masks = {k: case[k] for k in ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")}
    loss = lambda q, k, v: jnp.sum(kernel(q, k, v, **masks).astype(jnp.float32) * case["cotangent"])
    jax.block_until_ready(jax.grad(loss, argnums=(0, 1, 2))(case["q"], case["k"], case["v"]))
    assert "RACE DETECTED" not in capsys.readouterr().out


def test_constraints_are_named():
    case = packed_case(0, heads=2, kv_heads=1, head_dim=64)
    masks = {k: case[k] for k in ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")}
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        flash_mgpu.flash_attention(case["q"], case["k"], case["v"], **masks, interpret=True)
    bf = {k: case[k].astype(jnp.bfloat16) for k in ("q", "k", "v")}
    with pytest.raises(ValueError, match="head_dim to be a multiple of 64"):
        flash_mgpu.flash_attention(bf["q"][..., :32], bf["k"][..., :32], bf["v"][..., :32], **masks, interpret=True)
    with pytest.raises(ValueError, match="block_q to be a multiple of 128"):
        flash_mgpu.flash_attention(**bf, **masks, block_sizes=BlockSizes(64, 64), interpret=True)
    with pytest.raises(ConfigError, match="gpu_flash_kernel must be one of"):
        preset("tiny", gpu_flash_kernel="cutlass")


def test_tiny_model_with_the_mosaic_kernel_matches_xla():
    """The bf16 model (head_dim 64) with attention_impl="pallas_gpu", gpu_flash_kernel="mosaic" against "xla"."""
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(3, 512, (2, 150)), jnp.int32)
    segments = jnp.asarray([[1] * 70 + [2] * 75 + [0] * 5, [1] * 150], jnp.int32)
    positions = jnp.asarray([list(range(70)) + list(range(75)) + [0] * 5, list(range(150))], jnp.int32)
    shape = dict(head_dim=64, dtype="bfloat16", max_position_embeddings=256)
    want_loss, want = tiny_model_loss_and_grads("xla", ids, positions, segments, **shape)
    got_loss, got = tiny_model_loss_and_grads("pallas_gpu", ids, positions, segments, gpu_flash_kernel="mosaic",
                                              **shape)
    np.testing.assert_allclose(got_loss, want_loss, rtol=2e-3)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=3e-2 * max(1e-3, np.abs(b).max()), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2), (6, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len, kv_len", [(200, None), (136, 264), (328, None)])
def test_mosaic_flash_matches_reference_full_matrix(heads, kv_heads, causal, q_len, kv_len):
    case = packed_case(200 + heads * 10 + kv_heads, heads=heads, kv_heads=kv_heads, head_dim=64, q_len=q_len,
                       kv_len=kv_len, dtype=jnp.bfloat16)
    assert_matches_reference(MOSAIC, case, causal)


@pytest.mark.slow
def test_mosaic_flash_matches_reference_at_internlm2_head_dim():
    case = packed_case(9, heads=4, kv_heads=1, head_dim=128, q_len=200, dtype=jnp.bfloat16)
    assert_matches_reference(MOSAIC, case, True)
