"""Fitting a model's kv heads to a tensor-parallel degree larger than their number (7B: 8 kv heads on 16 chips).

Tensor parallelism splits attention by kv head, each shard taking whole query-head groups. With more shards than kv
heads the kv heads would be left replicated, and with them every shard's share of the KV cache and of attention: all
of it on every chip. Instead each kv head is repeated `factor` times, each copy serving `q_per_kv / factor` of its
query heads: the same function, now a GQA model with `kv_heads * factor` heads, which splits over the mesh. Query
heads keep their order, so `wo` is unchanged; only `wqkv` (and its bias) is rewritten. The KV cache then holds
`factor` copies of each head, one per shard that needs it, never the repetition to all query heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internlm2_jax.config import ModelConfig
from internlm2_jax.parallel.mesh import mesh_of, state_shardings


def kv_head_factor(cfg: ModelConfig, tensor: int) -> int:
    """How many times each kv head must be repeated to split over `tensor` shards (1: it already does); a clear
    error for a degree that neither divides nor is a multiple of the kv heads."""
    kv, per_kv = cfg.num_key_value_heads, cfg.q_per_kv
    if tensor <= kv:
        if kv % tensor:
            raise ValueError(f"the tensor axis ({tensor}) must divide the model's {kv} kv heads or be a multiple of "
                             "them")
        return 1
    if tensor % kv or per_kv % (tensor // kv):
        raise ValueError(f"a tensor axis of {tensor} does not fit {kv} kv heads of {per_kv} query heads each: "
                         f"it must divide {kv} or be {kv} x a divisor of {per_kv}")
    return tensor // kv


def _widen(w: jax.Array, per_kv: int, factor: int) -> jax.Array:
    """[..., kv, per_kv + 2, d] -> [..., kv * factor, per_kv / factor + 2, d]: copy j of kv head h holds query heads
    h * per_kv + j * per_kv / factor ..., then h's k and v."""
    *lead, kv, _, d = w.shape
    q = w[..., :per_kv, :].reshape(*lead, kv, factor, per_kv // factor, d)
    kv_slots = jnp.broadcast_to(w[..., per_kv:, :][..., None, :, :], (*lead, kv, factor, 2, d))
    return jnp.concatenate([q, kv_slots], axis=-2).reshape(*lead, kv * factor, per_kv // factor + 2, d)


def replicate_kv_heads(model: nnx.Module, factor: int, rules=None) -> nnx.Module:
    """An equivalent model with every kv head repeated `factor` times (see the module docstring), placed on the mesh
    of `model`'s parameters by `rules` (default: the parameter rules). LoRA must be merged and int8 applied after."""
    if factor == 1:
        return model
    cfg = model.cfg
    if cfg.lora is not None:
        raise ValueError("merge LoRA adapters before repeating kv heads")
    wide_cfg = cfg.replace(num_key_value_heads=cfg.num_key_value_heads * factor)
    kv_head_factor(wide_cfg, wide_cfg.num_key_value_heads)  # the config checks the query heads still divide
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(model)(wide_cfg, rngs=nnx.Rngs(0))))
    old = dict(nnx.to_flat_state(nnx.state(model)))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        value = old[path].get_value()
        if path[-1] in ("wqkv", "wqkv_bias"):
            if not isinstance(value, jax.Array):
                raise ValueError(f"{'/'.join(map(str, path))}: repeat kv heads before quantizing")
            value = _widen(value, cfg.q_per_kv, factor)
        flat.append((path, var.replace(value)))
    state = nnx.from_flat_state(flat)
    mesh = mesh_of(state)
    if mesh is not None:
        kwargs = {} if rules is None else {"rules": rules}
        state = jax.device_put(state, state_shardings(abstract, mesh, **kwargs))
    return nnx.merge(graphdef, state)


def shard_for_decoding(model: nnx.Module, mesh, rules=None) -> nnx.Module:
    """A model in memory (a notebook's, a trainer's) placed on `mesh` for decoding, scoring or serving: each
    parameter on its sharding by `rules` (default: the parameter rules), kv heads repeated up to the tensor degree
    when it outnumbers them. Models loaded from disk get the same from `artifacts.load_for_decoding(..., mesh=)`."""
    kwargs = {} if rules is None else {"rules": rules}
    graphdef, state = nnx.split(model)
    placed = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, **kwargs)))
    return replicate_kv_heads(placed, kv_head_factor(placed.cfg, dict(mesh.shape).get("tensor", 1)), rules)
