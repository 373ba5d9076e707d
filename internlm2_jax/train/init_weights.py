"""Starting a fine-tuning run from trained weights: a model directory or a run directory fills the new model's
parameters by path; what the source lacks (LoRA adapters, a fresh reward head) keeps its initialisation.

A causal LM can seed a reward model (the trunk carries over, the LM head is left behind) and a reward model can
seed another. Anything else that does not fit is an error naming the parameter and both shapes.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from internlm2_jax.artifacts import load_model
from internlm2_jax.config import ModelConfig
from internlm2_jax.model.lora import is_lora_path
from internlm2_jax.model.nf4 import NF4Weight, quantize_like
from internlm2_jax.parallel import DEFAULT_RULES, state_shardings

log = logging.getLogger(__name__)

# Parameters a source may lack or carry without being wrong: heads that differ between LM and reward model.
_HEADS = ("output", "v_head")


def _find(source: dict[tuple, jax.Array], path: tuple, layers: int) -> tuple[jax.Array | None, list[tuple]]:
    """The value for `path` and the source keys it used, whichever way each side stores the decoder stack."""
    if path in source:
        return source[path], [path]
    if path[:2] != ("model", "layers"):
        return None, []
    if isinstance(path[2], int):  # this model unrolled, the source stacked
        stacked = ("model", "layers", *path[3:])
        return (source[stacked][path[2]], [stacked]) if stacked in source else (None, [])
    keys = [("model", "layers", i, *path[2:]) for i in range(layers)]  # this model stacked, the source unrolled
    if not all(k in source for k in keys):
        return None, []
    return jnp.stack([source[k] for k in keys]), keys


def load_source(path: str | os.PathLike, cfg: ModelConfig, mesh: Mesh,
                rules=DEFAULT_RULES) -> dict[tuple, jax.Array]:
    """The weights of a model directory or run directory (local or a URL), placed on `mesh` as they are read, as
    {path: array}."""
    path = epath.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"train.init_weights={path}: not a model directory or a run directory")
    _, model, _ = load_model(path, mesh=mesh, rules=rules, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers)
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def initial_params(path: str | os.PathLike, cfg: ModelConfig, model_class, mesh: Mesh, *, seed: int = 0,
                   rules=DEFAULT_RULES) -> nnx.State:
    """Fresh parameters of `model_class(cfg)` on their shardings, overwritten by the source's where it has them."""
    source = load_source(path, cfg, mesh, rules)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(seed))))
    with jax.set_mesh(mesh):
        fresh = jax.jit(lambda: nnx.state(model_class(cfg, rngs=nnx.Rngs(seed))),
                        out_shardings=state_shardings(abstract, mesh, rules))()
    used, kept_fresh, filled = set(), [], []
    for target_path, var in nnx.to_flat_state(fresh):
        name = "/".join(map(str, target_path))
        value, keys = _find(source, target_path, cfg.num_hidden_layers)
        if value is None:
            if not (is_lora_path(name) or target_path[0] in _HEADS):
                raise ValueError(f"train.init_weights={path}: the source has no '{name}' (is it the same "
                                 f"architecture? {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})")
            kept_fresh.append(name)
            filled.append((target_path, var))
            continue
        if value.shape != var.shape:
            raise ValueError(f"train.init_weights={path}: '{name}' has shape {list(value.shape)} there but "
                             f"{list(var.shape)} in this model")
        used.update(keys)
        template = var.get_value()
        if isinstance(template, NF4Weight):  # QLoRA: the float source weight quantized as this model's base is
            value, sharding = quantize_like(value, template), jax.tree.map(lambda x: x.sharding, template)
        else:
            value, sharding = value.astype(var.dtype), template.sharding
        filled.append((target_path, var.replace(jax.device_put(value, sharding))))
    dropped = sorted("/".join(map(str, p)) for p in source if p not in used)
    log.info("init_weights %s: %d parameters loaded, fresh: %s, not used: %s", path, len(used),
             kept_fresh or "none", dropped or "none")
    if dropped and any(not p.startswith(_HEADS) for p in dropped):
        raise ValueError(f"train.init_weights={path}: the source has parameters this model lacks: {dropped[:6]}")
    return nnx.from_flat_state(filled)
