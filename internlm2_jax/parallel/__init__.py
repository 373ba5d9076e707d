"""Device meshes and the rules tables mapping logical axis names to mesh axes."""

from internlm2_jax.parallel.mesh import (AXES, MeshConfig, batch_sharding, batch_shardings,
                                         data_parallel_size, inference_mesh,
                                         make_mesh, mesh_of, parse_mesh, replicated_parameters, state_shardings,
                                         within_mesh_of)
from internlm2_jax.parallel.sharding import (ACTIVATION_RULES, DEFAULT_RULES, ROLLOUT_RULES, constrain,
                                             logical_to_spec, param_sharding)

__all__ = ["ACTIVATION_RULES", "AXES", "DEFAULT_RULES", "MeshConfig", "ROLLOUT_RULES", "batch_sharding",
           "batch_shardings", "constrain",
           "data_parallel_size", "inference_mesh", "logical_to_spec", "make_mesh", "mesh_of", "param_sharding",
           "parse_mesh", "replicated_parameters", "state_shardings", "within_mesh_of"]
