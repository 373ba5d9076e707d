"""Device meshes with the project's four axes, and placing pytrees of parameters onto them.

Axes (conventions): `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded,
ZeRO-3 style), `tensor` (heads and MLP columns), `sequence` (stays 1 until sequence-parallel attention lands).
Axis types are Auto, so XLA propagates shardings from the inputs (jax.make_mesh defaults to Explicit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internlm2_jax.parallel.sharding import DEFAULT_RULES, Rules, param_sharding

AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes; one of them may be -1, meaning "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.tensor, self.sequence]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1 (the rest), got {dict(zip(AXES, sizes, strict=True))}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(AXES, sizes, strict=True))}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed axes of total size "
                                 f"{known} ({dict(zip(AXES, sizes, strict=True))})")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
                             f"but {num_devices} are available")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays: batch over the data-parallel axes, sequence over `sequence`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sequence"))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """The shardings of `state`'s variables, from their `logical_axes` metadata, in a tree of the same structure.

    Each variable keeps its place and holds its NamedSharding as value, so the result serves directly as
    `in_shardings`/`out_shardings` for the state and as the `rest` tree of `optax.tree_map_params`.
    """

    def one(variable: nnx.Variable) -> nnx.Variable:
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        return variable.replace(param_sharding(axes, variable.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_parameters(state: nnx.State, shardings: nnx.State, *, min_size: int = 1 << 20) -> list[str]:
    """Paths of parameters with at least `min_size` elements that `shardings` leave fully replicated.

    On a multi-device mesh that is almost always a mistake: a missing rule, or a dimension that does not divide.
    """
    found = []
    flat_shardings = dict(nnx.to_flat_state(shardings))
    for path, variable in nnx.to_flat_state(state):
        sharding = flat_shardings[path].get_value()
        if math.prod(variable.shape) >= min_size and sharding.is_fully_replicated and sharding.mesh.size > 1:
            found.append("/".join(map(str, path)))
    return found
