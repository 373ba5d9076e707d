"""Starting a fine-tuning run from trained weights: a model directory or a run directory fills the new model's
parameters by path; what the source lacks (LoRA adapters, a fresh reward head) keeps its initialisation.

A causal LM can seed a reward model (the trunk carries over, the LM head is left behind) and a reward model can
seed another. Anything else that does not fit is an error naming the parameter and both shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from internlm2_jax.config import ModelConfig
from internlm2_jax.model.lora import is_lora_path
from internlm2_jax.parallel import DEFAULT_RULES, state_shardings

log = logging.getLogger(__name__)

# Parameters a source may lack or carry without being wrong: heads that differ between LM and reward model.
_HEADS = ("output", "v_head")


def _per_layer(flat: dict[tuple, jax.Array], stacked: bool, layers: int) -> dict[tuple, jax.Array]:
    """Flat parameters keyed layer by layer, whichever way the source stored its decoder stack."""
    if not stacked:
        return flat
    out = {}
    for path, value in flat.items():
        if path[:2] == ("model", "layers"):
            for i in range(layers):
                out[("model", "layers", i, *path[2:])] = value[i]
        else:
            out[path] = value
    return out


def load_source(path: str | Path, cfg: ModelConfig) -> dict[tuple, jax.Array]:
    """The weights of a model or run directory as {path: array}, layer by layer."""
    from internlm2_jax.convert.hf import load_pretrained
    from internlm2_jax.train.checkpoint import is_run_directory, load_run

    path = Path(path)
    if is_run_directory(path):
        source_cfg, model, _ = load_run(path)
    elif path.is_dir():
        source_cfg, model = load_pretrained(path, param_dtype=cfg.param_dtype)
    else:
        raise FileNotFoundError(f"train.init_weights={path}: not a model directory or a run directory")
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return _per_layer(flat, source_cfg.scan_layers, source_cfg.num_hidden_layers)


def initial_params(path: str | Path, cfg: ModelConfig, model_class, mesh: Mesh, *, seed: int = 0,
                   rules=DEFAULT_RULES) -> nnx.State:
    """Fresh parameters of `model_class(cfg)` on their shardings, overwritten by the source's where it has them."""
    source = load_source(path, cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(seed))))
    with jax.set_mesh(mesh):
        fresh = jax.jit(lambda: nnx.state(model_class(cfg, rngs=nnx.Rngs(seed))),
                        out_shardings=state_shardings(abstract, mesh, rules))()
    used, kept_fresh, filled = set(), [], []
    for target_path, var in nnx.to_flat_state(fresh):
        layer_paths = ([target_path] if not (cfg.scan_layers and target_path[:2] == ("model", "layers"))
                       else [("model", "layers", i, *target_path[2:]) for i in range(cfg.num_hidden_layers)])
        if not all(p in source for p in layer_paths):
            name = "/".join(map(str, target_path))
            if not (is_lora_path(name) or target_path[0] in _HEADS):
                raise ValueError(f"train.init_weights={path}: the source has no '{name}' (is it the same "
                                 f"architecture? {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})")
            kept_fresh.append(name)
            filled.append((target_path, var))
            continue
        parts = [source[p] for p in layer_paths]
        value = jnp.stack(parts) if len(layer_paths) > 1 or layer_paths[0] != target_path else parts[0]
        if value.shape != var.shape:
            raise ValueError(f"train.init_weights={path}: '{'/'.join(map(str, target_path))}' has shape "
                             f"{list(value.shape)} there but {list(var.shape)} in this model")
        used.update(layer_paths)
        filled.append((target_path, var.replace(jax.device_put(value.astype(var.dtype), var.get_value().sharding))))
    dropped = sorted("/".join(map(str, p)) for p in source if p not in used)
    log.info("init_weights %s: %d parameters loaded, fresh: %s, not used: %s", path, len(used),
             kept_fresh or "none", dropped or "none")
    if dropped and any(not p.startswith(_HEADS) for p in dropped):
        raise ValueError(f"train.init_weights={path}: the source has parameters this model lacks: {dropped[:6]}")
    return nnx.from_flat_state(filled)
