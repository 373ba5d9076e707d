"""Decoding. Today: cache-free greedy decoding for demos and tests; the KV-cache engine comes with its issue."""

from internlm2_jax.decode.greedy import greedy_generate

__all__ = ["greedy_generate"]
