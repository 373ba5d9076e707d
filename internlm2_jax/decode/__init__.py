"""Decoding: cached generation over a static KV cache (`prefill`, `decode_step`, `generate`), sampling, and
cache-free greedy decoding (the recomputation reference); the continuous-batching engine over the paged cache is
`decode.engine`. All of it runs on the mesh the parameters are placed on (`artifacts.load_for_decoding(..., mesh=)`,
`model.kv_heads.shard_for_decoding`)."""

from internlm2_jax.decode.generate import Completion, decode_step, generate, generate_ids, prefill
from internlm2_jax.decode.greedy import greedy_generate
from internlm2_jax.decode.sampling import SamplingConfig

__all__ = ["Completion", "SamplingConfig", "decode_step", "generate", "generate_ids", "greedy_generate", "prefill"]
