"""Device meshes and the rules tables mapping logical axis names to mesh axes."""

from internlm2_jax.parallel.mesh import (AXES, MeshConfig, batch_sharding, make_mesh, replicated_parameters,
                                         state_shardings)
from internlm2_jax.parallel.sharding import (ACTIVATION_RULES, DEFAULT_RULES, constrain, logical_to_spec,
                                             param_sharding)

__all__ = ["ACTIVATION_RULES", "AXES", "DEFAULT_RULES", "MeshConfig", "batch_sharding", "constrain",
           "logical_to_spec", "make_mesh", "param_sharding", "replicated_parameters", "state_shardings"]
