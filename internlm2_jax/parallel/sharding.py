"""Logical axis names -> mesh axes. The model names axes (`embed`, `mlp`, ...); only these tables name the mesh.

Mesh axes are `data`, `fsdp`, `tensor`, `sequence` (conventions). A rule whose mesh axes are absent from the mesh,
already used by another dimension of the same array, or do not divide the dimension, leaves that dimension
replicated, so one table serves every mesh shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Parameters: FSDP shards the embedding dimension of every matrix, tensor parallelism heads / MLP / vocab. The
# sequence shards hold different tokens of the same rows, so they shard the parameters and optimizer state too
# (ZeRO-3 over fsdp x sequence): without it each chip's state would grow with mesh.sequence.
DEFAULT_RULES: Rules = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv_group", None),
    ("head_dim", None),
    ("mlp", "tensor"),
)

# Decoding weights (RL rollouts): whole over the data-parallel axes, split by tensor parallelism only. FSDP weights
# would be all-gathered layer by layer at every generated token; one reshard per rollout gathers them once.
ROLLOUT_RULES: Rules = tuple((name, None if name == "embed" else axes) for name, axes in DEFAULT_RULES)

# Activations: the batch is split over both data-parallel axes; the embedding dimension stays whole.
ACTIVATION_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, size in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n in mesh_shape and mesh_shape[n] > 1 and n not in used)
        ways = 1
        for n in names:
            ways *= mesh_shape[n]
        if not names or size % ways:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def param_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, dict(mesh.shape), rules))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = ACTIVATION_RULES) -> jax.Array:
    """Pins an activation's sharding under the mesh set by `jax.set_mesh`; a no-op without one.

    Model code calls this with logical names only, so it runs unchanged on one device or a pod.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, dict(mesh.shape), rules))
