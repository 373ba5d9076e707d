"""The one attention entry point of the codebase (conventions.md); back ends are chosen by `impl`."""

import jax

from internlm2_jax.config import ATTENTION_IMPLS
from internlm2_jax.kernels.reference import xla_attention


def resolve_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        # The Pallas kernels land in their own issue; until then every backend uses the XLA reference.
        return "xla"
    return impl


def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True, impl="auto",
              scale=None) -> jax.Array:
    """Causal grouped-query attention over packed rows.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] (never repeated to all heads).
    Positions and segment ids are int32 [batch, len]. Segment id 0 is padding and attends to nothing; a token attends
    only within its own segment and, if causal, to key positions <= its own.
    """
    impl = resolve_impl(impl)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if impl == "xla":
        return xla_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, scale=scale)
    raise NotImplementedError(f"attention impl {impl!r} is not available yet; use impl='xla' or 'auto'")
