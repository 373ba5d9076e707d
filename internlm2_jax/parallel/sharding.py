"""Logical axis names -> mesh axes. The model names axes (`embed`, `mlp`, ...); only this table names the mesh.

Mesh axes are `data`, `fsdp`, `tensor`, `sequence` (conventions). A rule whose mesh axis is absent from the mesh, is
already used by another dimension of the same array, or does not divide the dimension, leaves that dimension
replicated, so one table serves every mesh shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | None]]

DEFAULT_RULES: Rules = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv_group", None),
    ("head_dim", None),
    ("mlp", "tensor"),
)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = table.get(name) if name is not None else None
        if (mesh_axis is None or mesh_axis not in mesh.shape or mesh_axis in used
                or size % mesh.shape[mesh_axis] != 0):
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))
