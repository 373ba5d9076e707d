"""Device meshes with the project's four axes, and placing pytrees of parameters onto them.

Axes (conventions): `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded,
ZeRO-3 style), `tensor` (heads and MLP columns), `sequence` (context parallelism: each chip holds a slice of every
row, model/context_parallel.py).
Axis types are Auto, so XLA propagates shardings from the inputs (jax.make_mesh defaults to Explicit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internlm2_jax.parallel.sequence_layout import EXAMPLE_FIELDS
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
    # What jax.make_mesh does, but free to split a physical torus axis over two mesh axes: it allows that on v5e
    # only, and fsdp 32 x sequence 2 on a v5p 4x4x4 needs it (sequence, the last axis, then stays innermost).
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def parse_mesh(spec: str) -> MeshConfig:
    """`"data=2,tensor=4"` -> MeshConfig(data=2, fsdp=1, tensor=4, sequence=1): the command-line form of an
    inference mesh. Axes not named are 1; one axis may be -1 (all remaining devices)."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(AXES)} "
                             "(e.g. --mesh data=2,tensor=4)")
        sizes[name] = int(value)
    config = MeshConfig(**sizes)
    config.shape(math.prod(abs(s) for s in sizes.values()))  # sizes must be positive or one -1
    return config


def split_cpu(devices: int) -> None:
    """Splits the CPU into `devices` devices (a mesh on a CPU machine); before anything starts JAX's backends."""
    if devices < 1:
        raise ValueError(f"--cpu-devices must be at least 1, got {devices}")
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:
        raise ValueError("--cpu-devices must be set before JAX starts its backends (this process already "
                         "did)") from None
    if jax.default_backend() != "cpu":
        raise ValueError(f"--cpu-devices is for the CPU platform, but JAX runs on {jax.default_backend()} here (set "
                         "JAX_PLATFORMS=cpu to run on the CPU)")


def inference_mesh(config: MeshConfig | str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a model is loaded onto for decoding, scoring or serving: `config`'s axes over the first devices it
    needs (all of them when an axis is -1); one device when `config` is None."""
    devices = list(devices) if devices is not None else jax.devices()
    config = parse_mesh(config) if isinstance(config, str) else config or MeshConfig(fsdp=1)
    if config.sequence != 1:  # decoding appends one token at a time: nothing to split over `sequence`
        raise ValueError(f"an inference mesh splits rows (data, fsdp) and heads (tensor), not the sequence: got "
                         f"sequence={config.sequence} (context parallelism is for training long rows)")
    sizes = [getattr(config, a) for a in AXES]
    if -1 not in sizes:
        needed = math.prod(sizes)
        if needed > len(devices):
            raise ValueError(f"mesh {dict(zip(AXES, sizes, strict=True))} needs {needed} devices, but "
                             f"{len(devices)} are available")
        devices = devices[:needed]
    return make_mesh(config, devices)


def mesh_of(tree) -> Mesh | None:
    """The mesh a pytree of arrays is placed on (its first array's), or None for arrays on one unnamed device."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def within_mesh_of(tree):
    """A context that sets the mesh `tree`'s arrays are placed on (`jax.set_mesh`), so the model's constraints and
    per-shard kernels see it while a step is traced; does nothing for arrays on one unnamed device."""
    mesh = mesh_of(tree)
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def data_parallel_size(mesh: Mesh | None) -> int:
    """How many ways the batch splits on `mesh` (its data-parallel axes)."""
    return 1 if mesh is None else math.prod(dict(mesh.shape).get(a, 1) for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays: batch over the data-parallel axes, sequence over `sequence`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sequence"))


def global_rows(mesh: Mesh, local) -> jax.Array:
    """This process's rows (axis 0) -> one array of every process's rows on `mesh`, rows over the data-parallel axes
    (process order; the inverse of `local_rows`). A jax.Array is already global: it is only placed."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    if isinstance(local, jax.Array):
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def local_rows(array: jax.Array) -> np.ndarray:
    """The rows (axis 0) of a global array that this process holds, in order (all of them in one process): what a
    host-side step (a rule reward, a sample dump) reads of a multi-host batch without gathering it."""
    if jax.process_count() == 1 or array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    if not isinstance(array.sharding, NamedSharding):
        raise ValueError(f"local_rows needs an array on a named mesh; this one's sharding is {array.sharding}")
    mesh = array.sharding.mesh
    rows = jax.device_put(array, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))  # whatever it was: rows by process
    return np.asarray(multihost_utils.global_array_to_host_local_array(rows, mesh, rows.sharding.spec))


def process_row_degree(mesh: Mesh | None) -> int:
    """How many ways this process's rows split (its share of the data-parallel shards); a batch of local rows must
    divide by it. Multi-host needs the data-parallel shards to split evenly over the processes."""
    degree, processes = data_parallel_size(mesh), jax.process_count()
    if degree % processes:
        raise ValueError(f"the mesh's {degree} data-parallel shards do not split over {processes} processes: each "
                         "process must hold whole rows")
    return degree // processes


def batch_shardings(mesh: Mesh, fields) -> dict[str, NamedSharding]:
    """Per field of a training batch: per-token fields as `batch_sharding`, per-example ones ([batch, pairs]:
    `sequence_layout.EXAMPLE_FIELDS`) over the data-parallel axes only."""
    examples = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return {k: examples if k in EXAMPLE_FIELDS else batch_sharding(mesh) for k in fields}


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """The shardings of `state`'s variables, from their `logical_axes` metadata, in a tree of the same structure.

    Each variable keeps its place and holds its NamedSharding as value, so the result serves directly as
    `in_shardings`/`out_shardings` for the state and as the `rest` tree of `optax.tree_map_params`.
    """

    def one(variable: nnx.Variable) -> nnx.Variable:
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        value = variable.get_value()
        if hasattr(value, "leaf_axes"):  # a struct of arrays (an NF4 weight): each leaf by its own logical axes
            leaves, treedef = jax.tree.flatten(value)
            shardings = [param_sharding(leaf_axes, leaf.shape, mesh, rules)
                         for leaf_axes, leaf in zip(value.leaf_axes(axes), leaves, strict=True)]
            return variable.replace(jax.tree.unflatten(treedef, shardings))
        return variable.replace(param_sharding(axes, variable.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_parameters(state: nnx.State, shardings: nnx.State, *, min_size: int = 1 << 20) -> list[str]:
    """Paths of parameters with at least `min_size` elements that `shardings` leave fully replicated.

    On a multi-device mesh that is almost always a mistake: a missing rule, or a dimension that does not divide.
    """
    found = []
    flat_shardings = dict(nnx.to_flat_state(shardings))
    for path, variable in nnx.to_flat_state(state):
        leaves = jax.tree.leaves(flat_shardings[path].get_value())  # several for a struct (an NF4 weight)
        replicated = all(s.is_fully_replicated for s in leaves)
        if math.prod(variable.shape) >= min_size and replicated and leaves[0].mesh.size > 1:
            found.append("/".join(map(str, path)))
    return found
