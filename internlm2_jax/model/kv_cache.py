"""A static-shape KV cache for batched generation: what the decoder reads instead of recomputing the prefix.

It holds K and V of the kv heads only (never repeated to all query heads), after RoPE: a cached key keeps the
rotation it was written with, as HF and LMDeploy do, which is what dynamic NTK beyond `max_position_embeddings`
means for cached decoding (conventions). Slots are written at a cursor shared by the batch; each slot also records
the position it holds and a segment id (1 written, 0 empty or padding, which attends to nothing and is attended by
nothing), so left- and right-padded prompts, and rows of different lengths, need no special cases in attention.
Segment 1 is also a shared prefix: tokens written with segment ids 2, 3, ... each see it and their own segment only,
so a row can branch into several continuations of one cached prompt (a tree mask: multiple-choice options scored
side by side).

With `kv_dtype="int8"` or `"int4"` K and V are stored quantized (`model/kv_quant.py`: uint8 codes with an fp32
scale and zero per (token, kv head)), quantized as they are written. The model reads a layer with `astype`, which
dequantizes the whole layer in XLA; attention then runs on floats (for one query on CPU, the fp32 C++ kernel): the
quantized CPU kernel is the paged cache's only.

On a mesh the cache carries logical axes (`map_cache`): rows over the data-parallel axes, kv heads over `tensor`,
by the activation rules table; `init_cache(..., mesh=)` creates it in place on its shardings and the model pins them
after every write (`constrain_cache`), so a donated cache keeps its layout from call to call.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internlm2_jax.config import ModelConfig
from internlm2_jax.model.kv_quant import QuantizedKV, check_kv_dtype, kv_zeros, map_kv, stored_as, vector_bytes
from internlm2_jax.parallel.sharding import ACTIVATION_RULES, constrain, logical_to_spec

SHARED_SEGMENT = 1


@struct.dataclass
class KVCache:
    # [layers, batch, kv_heads, max_len, head_dim], head-major as attention reads it: one array for a scanned layer
    # stack (indexed by the scan's traced layer), else a tuple of one array per layer, which a decode step's
    # attention kernel reads in place (a slice of one stacked array is a copy: 4 MB per layer per step at batch 16).
    # Quantized: a `QuantizedKV` of the same layout, or a tuple of one per layer.
    k: jax.Array | QuantizedKV | tuple[jax.Array | QuantizedKV, ...]
    v: jax.Array | QuantizedKV | tuple[jax.Array | QuantizedKV, ...]
    positions: jax.Array  # [batch, max_len] int32: the position of the token held by each slot
    segments: jax.Array  # [batch, max_len] int32: 1 for a written token, 0 for an empty or padding slot
    cursor: jax.Array  # [] int32: the next slot to write, the same for every row
    lengths: jax.Array  # [batch] int32: tokens of each sequence so far, i.e. the position of its next token

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def write(self, positions: jax.Array, segment_ids: jax.Array) -> KVCache:
        """The cache with [batch, T] new tokens' positions and segments recorded at the cursor (the layers write
        their K/V there, then `advance` moves the cursor). Writing past `max_len` is the caller's to prevent: under
        jit, `dynamic_update_slice` would clamp, not fail."""
        at = self.cursor
        return self.replace(positions=jax.lax.dynamic_update_slice_in_dim(self.positions, positions, at, axis=1),
                            segments=jax.lax.dynamic_update_slice_in_dim(self.segments, segment_ids, at, axis=1))

    def write_layer(self, layer, k_new: jax.Array, v_new: jax.Array) -> KVCache:
        """`layer`'s new K/V [batch, T, kv_heads, head_dim] written at the cursor in place (only T slots), quantized
        first for a quantized cache."""
        def update(cache, new):
            new = stored_as(cache[0], new.swapaxes(1, 2))
            if isinstance(cache, tuple):
                at = (0, 0, self.cursor, 0)
                written = jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice(c, n, at), cache[layer], new)
                return replace_layer(cache, layer, written)
            at = (layer, 0, 0, self.cursor, 0)
            return jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice(c, n[None], at), cache, new)

        return self.replace(k=update(self.k, k_new), v=update(self.v, v_new))


def layer_buffers(cfg: ModelConfig, shape, dtype, kv_dtype: str | None = None):
    """Zeros of `shape` for every layer (quantized K/V buffers with `kv_dtype`): stacked [layers, *shape] for a
    scanned layer stack (which indexes it with a traced layer), else a tuple of one buffer per layer. Fresh buffers
    on every call: caches are donated, and one buffer can't be donated twice."""
    def zeros(shape):
        return jnp.zeros(shape, dtype) if kv_dtype is None else kv_zeros(shape, kv_dtype)

    if cfg.scan_layers:
        return zeros((cfg.num_hidden_layers, *shape))
    return tuple(zeros(shape) for _ in range(cfg.num_hidden_layers))


def replace_layer(buffers: tuple, layer: int, value) -> tuple:
    return (*buffers[:layer], value, *buffers[layer + 1:])


def map_layers(fn: Callable, buffers, axes: tuple[str | None, ...]):
    """`fn(array, logical axes)` on each layer's K or V buffer (stacked: with a leading `layers` axis), on the codes
    and on the scales of a quantized one (`map_kv`)."""
    if isinstance(buffers, tuple):
        return tuple(map_kv(fn, b, axes) for b in buffers)
    return map_kv(fn, buffers, ("layers", *axes))


def map_cache(fn: Callable, cache: KVCache) -> KVCache:
    """The cache with `fn(array, logical axes)` applied to each of its arrays. The cached sequence stays whole on
    every device (`cache_length` has no rule): decoding appends to it."""
    kv_axes = ("batch", "kv_heads", "cache_length", "head_dim")
    return cache.replace(k=map_layers(fn, cache.k, kv_axes), v=map_layers(fn, cache.v, kv_axes),
                         positions=fn(cache.positions, ("batch", "cache_length")),
                         segments=fn(cache.segments, ("batch", "cache_length")), cursor=fn(cache.cursor, ()),
                         lengths=fn(cache.lengths, ("batch",)))


def sharding_fn(mesh: Mesh) -> Callable:
    """`fn(array, logical axes)` -> the array's NamedSharding on `mesh` by the activation rules.

    Specs are written without trailing Nones, as jit writes its outputs': jit tells P('tensor', None) from
    P('tensor'), so a donated cache created in the long form would compile its first program twice."""

    def sharding(a, axes):
        spec = list(logical_to_spec(axes, a.shape, dict(mesh.shape), ACTIVATION_RULES))
        while spec and spec[-1] is None:
            spec.pop()
        return NamedSharding(mesh, PartitionSpec(*spec))

    return sharding


def constrain_cache(cache):
    """Pins a (static or paged) cache's layout under the mesh set by `jax.set_mesh`; a no-op without one."""
    if isinstance(cache, KVCache):
        return map_cache(constrain, cache)
    return cache.map_buffers(constrain)


def on_mesh(make: Callable, mapper: Callable, mesh: Mesh | None):
    """`make()` (a cache), created directly on its shardings over `mesh` (a big cache never passes through one
    device); plain `make()` without a mesh."""
    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=mapper(sharding_fn(mesh), jax.eval_shape(make)))()


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, mesh: Mesh | None = None,
               kv_dtype: str | None = None) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens, K/V in `dtype` (default: compute dtype) or
    quantized to `kv_dtype` ("int8" or "int4"), on `mesh` by the activation rules when given."""
    dtype = check_cache_dtypes(cfg, dtype, kv_dtype, "init_cache")
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)

    def make():
        return KVCache(k=layer_buffers(cfg, shape, dtype, kv_dtype), v=layer_buffers(cfg, shape, dtype, kv_dtype),
                       positions=jnp.zeros((batch, max_len), jnp.int32),
                       segments=jnp.zeros((batch, max_len), jnp.int32), cursor=jnp.zeros((), jnp.int32),
                       lengths=jnp.zeros((batch,), jnp.int32))

    return on_mesh(make, map_cache, mesh)


def check_cache_dtypes(cfg: ModelConfig, dtype, kv_dtype: str | None, where: str):
    """The float dtype of a cache's K/V (None for a quantized cache), after checking that `kv_dtype` is known and
    not given with a float `dtype`, which a quantized cache would ignore."""
    check_kv_dtype(kv_dtype, where)
    if kv_dtype is None:
        return jnp.dtype(dtype or cfg.dtype)
    if dtype is not None:
        raise ValueError(f"{where}: give a float cache dtype ({dtype!r}) or kv_dtype={kv_dtype!r}, not both")
    if kv_dtype == "int4" and cfg.head_dim % 2:
        raise ValueError(f"{where}: int4 K/V pack two codes per byte, head_dim must be even, got {cfg.head_dim}")
    return None


def bytes_per_token(cfg: ModelConfig, dtype=None, kv_dtype: str | None = None) -> int:
    """K and V of one token over all layers: in `dtype` (default: compute), or `kv_dtype` codes with their fp32
    scales and zeros."""
    check_kv_dtype(kv_dtype, "bytes_per_token")
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * vector_bytes(cfg.head_dim, dtype or cfg.dtype,
                                                                              kv_dtype)


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=None, kv_dtype: str | None = None) -> int:
    """Memory of the K/V tensors (codes and scales when quantized) of `init_cache(cfg, batch, max_len, dtype,
    kv_dtype=kv_dtype)`."""
    return batch * max_len * bytes_per_token(cfg, dtype, kv_dtype)
