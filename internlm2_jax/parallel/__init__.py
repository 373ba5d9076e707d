"""Device meshes and the one rules table mapping logical axis names to mesh axes."""

from internlm2_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec, param_sharding

__all__ = ["DEFAULT_RULES", "logical_to_spec", "param_sharding"]
