"""The plain-XLA attention that every kernel is checked against.

Grouped-query attention without materialising repeated K/V: queries are viewed as [kv_heads, q_per_kv] so each KV
head is read once. Masking is by positions and segment ids rather than array indices, which is what lets packed
documents (positions restart at 0, one segment id each) and cached decoding share one definition.
"""

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a fully masked row gives zeros instead of NaNs


def attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal: bool):
    """[batch, q_len, kv_len] boolean: same non-padding segment and, if causal, key position <= query position."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


def xla_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, scale=None):
    """q [B, T, H, D]; k, v [B, S, KV, D]; returns [B, T, H, D] in q's dtype. Softmax in fp32."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    # Head-major operands ([batch, kv_heads, group, seq, head_dim]) make both matmuls plain batched GEMMs; the
    # sequence-major einsum ran 4x slower on XLA:CPU at the bench shape.
    qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, kt, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal)[:, None, None]
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, vt, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)
