"""The paged KV cache of the continuous-batching engine (conventions: fixed-size pages, a page table per sequence).

K/V of the kv heads only, after RoPE, in pages of `page_size` tokens: `k`/`v` are [layers, kv_heads, num_pages,
page_size, head_dim], so `k[layer]` is the `k_pages` of `decode_attention`. Page 0 is never handed out: padding
rows and padding tokens write there, and unused page-table entries point there, so a ragged batch needs no special
cases. Which pages a sequence owns is the host scheduler's business (`decode.scheduler.PagePool`); the device only
sees this step's page table.

A `PagedKVCache` carries one step's view with it: the page table and lengths of the rows in this call, so the model
can scatter each new token's K/V to its slot and attend over the pages in one pass.

With `kv_dtype="int8"` or `"int4"` the pages hold uint8 codes with an fp32 scale and zero per (token, kv head)
beside them (`model/kv_quant.py`), quantized as they are written; attention dequantizes what it reads.

On a mesh the pages of each kv head live on that head's `tensor` shard and are whole on every data-parallel replica
(`map_buffers`: any row's pages may be read by the shard that holds the row); the step's view (page table,
lengths) is small and left to XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from internlm2_jax.config import ModelConfig
from internlm2_jax.model.kv_cache import (bytes_per_token, check_cache_dtypes, layer_buffers, map_layers, on_mesh,
                                          replace_layer)
from internlm2_jax.model.kv_quant import QuantizedKV, stored_as


@struct.dataclass
class PagedKVCache:
    # [layers, kv_heads, num_pages, page_size, head_dim]: one array for a scanned layer stack, else a tuple of one
    # array per layer, which the CPU decode kernel reads in place (a slice of a stacked array would be a copy).
    # Quantized: a `QuantizedKV` of the same layout (scales [..., 2] beside the codes), or a tuple of one per layer.
    k: jax.Array | QuantizedKV | tuple[jax.Array | QuantizedKV, ...]
    v: jax.Array | QuantizedKV | tuple[jax.Array | QuantizedKV, ...]
    page_table: jax.Array  # [batch, max_pages] int32: page ids of each row's sequence, in order (0: none)
    lengths: jax.Array  # [batch] int32: tokens cached per row once this step's tokens are written
    q_lengths: jax.Array  # [batch] int32: this step's new tokens per row (0 for a padding row)
    rope_lengths: jax.Array  # [batch] int32: the length L that sets the dynamic-NTK base for this step's tokens
    # Static: this step's rows in len(row_widths) equal groups, group g's rows within its first row_widths[g] pages
    # (the XLA back end then gathers only those; see `paged_attention_reference`). None: every row may use all.
    row_widths: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    def map_buffers(self, fn) -> PagedKVCache:
        """The cache with `fn(array, logical axes)` applied to its K and V pages (codes and scales if quantized)."""
        axes = ("kv_heads", "pages", "page_slot", "head_dim")
        return self.replace(k=map_layers(fn, self.k, axes), v=map_layers(fn, self.v, axes))

    def with_step(self, page_table, lengths, q_lengths, rope_lengths, row_widths=None) -> PagedKVCache:
        return self.replace(page_table=page_table, lengths=lengths, q_lengths=q_lengths, rope_lengths=rope_lengths,
                            row_widths=row_widths)

    def query_positions(self, chunk: int) -> tuple[jax.Array, jax.Array]:
        """(positions, segment ids) [batch, chunk] of this step's tokens, right-padded to `chunk`; padding has
        segment 0 and position 0."""
        offsets = jnp.arange(chunk, dtype=jnp.int32)[None, :]
        valid = offsets < self.q_lengths[:, None]
        positions = self.lengths[:, None] - self.q_lengths[:, None] + offsets
        return jnp.where(valid, positions, 0), valid.astype(jnp.int32)

    def write(self, layer, k_new: jax.Array, v_new: jax.Array, positions, segment_ids) -> PagedKVCache:
        """Scatters this step's K/V [batch, chunk, kv_heads, head_dim] of `layer` to their slots, in place (quantized
        first for a quantized cache)."""
        page = jnp.take_along_axis(self.page_table, positions // self.page_size, axis=1)
        page = jnp.where(segment_ids != 0, page, 0)  # padding writes land in the null page
        offset = positions % self.page_size
        def update(cache, new):  # new is [batch, chunk, kv, d], as layer, page, offset index around a slice
            new = stored_as(cache[0], new)
            if isinstance(cache, tuple):  # page and offset index side by side: the update is [kv, batch, chunk, d]
                written = jax.tree.map(lambda c, n: c.at[:, page, offset].set(jnp.moveaxis(n, 2, 0),
                                                                              mode="promise_in_bounds"),
                                       cache[layer], new)
                return replace_layer(cache, layer, written)
            return jax.tree.map(lambda c, n: c.at[layer, :, page, offset].set(n, mode="promise_in_bounds"), cache, new)

        return self.replace(k=update(self.k, k_new), v=update(self.v, v_new))


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None, mesh=None,
                     kv_dtype: str | None = None) -> PagedKVCache:
    """An empty paged cache of `num_pages` pages (page 0, the null page, included) in `dtype` (default: compute) or
    quantized to `kv_dtype` ("int8" or "int4"), each kv head's pages on its `tensor` shard of `mesh` when given."""
    if num_pages < 2 or page_size < 1:
        raise ValueError(f"a paged cache needs num_pages >= 2 (page 0 is reserved) and page_size >= 1, "
                         f"got {num_pages} and {page_size}")
    dtype = check_cache_dtypes(cfg, dtype, kv_dtype, "init_paged_cache")
    shape = (cfg.num_key_value_heads, num_pages, page_size, cfg.head_dim)

    def make():
        empty = jnp.zeros((0,), jnp.int32)
        return PagedKVCache(k=layer_buffers(cfg, shape, dtype, kv_dtype), v=layer_buffers(cfg, shape, dtype, kv_dtype),
                            page_table=jnp.zeros((0, 0), jnp.int32), lengths=empty, q_lengths=empty,
                            rope_lengths=empty)

    def shardings(fn, cache):  # the step's (empty) view is replicated
        replicated = fn(cache.lengths, (None,))
        return cache.map_buffers(fn).replace(page_table=fn(cache.page_table, (None, None)), lengths=replicated,
                                             q_lengths=replicated, rope_lengths=replicated)

    return on_mesh(make, shardings, mesh)


def pages_for_budget(cfg: ModelConfig, page_size: int, *, tokens: int | None = None, gigabytes: float | None = None,
                     dtype=None, kv_dtype: str | None = None) -> int:
    """Pages (the null page included) for an absolute KV budget in tokens or in GB (never a fraction of free
    memory: a budget that depends on what else is running is not reproducible); GB count the K/V in `dtype`, or
    `kv_dtype` codes with their scales (`bytes_per_token`)."""
    if (tokens is None) == (gigabytes is None):
        raise ValueError("give the KV budget as exactly one of tokens= or gigabytes=")
    if gigabytes is not None:
        if gigabytes <= 0:
            raise ValueError(f"kv budget must be > 0 GB, got {gigabytes}")
        tokens = int(gigabytes * 1e9) // bytes_per_token(cfg, dtype, kv_dtype)
    if tokens < page_size:
        raise ValueError(f"a KV budget of {tokens} tokens is less than one page ({page_size} tokens)")
    return tokens // page_size + 1
