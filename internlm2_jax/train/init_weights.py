"""Starting a fine-tuning run from trained weights: a model directory or a run directory fills the new model's
parameters by path; what the source lacks (LoRA adapters, a fresh reward head) keeps its initialisation.

A causal LM can seed a reward model (the trunk carries over, the LM head is left behind) and a reward model can
seed another. Anything else that does not fit is an error naming the parameter and both shapes.

A model directory is read one parameter (one layer stack, for a scanned model) at a time and each is placed as it
arrives: a QLoRA model quantizes each float projection to NF4 right away, so a 7B float model is never whole in
memory (the peak is the NF4 model plus one float projection stack). A run directory is restored whole first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from internlm2_jax.artifacts import is_run_directory, load_model
from internlm2_jax.config import ModelConfig
from internlm2_jax.convert.awq import awq_group
from internlm2_jax.convert.hf import check_tensors, iter_mappings, read_hf_config, read_param, report_conversions
from internlm2_jax.convert.safetensors_io import CheckpointError, CheckpointReader
from internlm2_jax.model.lora import is_lora_path
from internlm2_jax.model.nf4 import NF4Weight, quantize_like
from internlm2_jax.parallel import DEFAULT_RULES, param_sharding, state_shardings

log = logging.getLogger(__name__)

# Parameters a source may lack or carry without being wrong: heads that differ between LM and reward model.
_HEADS = ("output", "v_head")


class ModelDirectorySource(Mapping):
    """The parameters of a HF model directory by our paths (layers unrolled), each read from the safetensors files
    and converted to `param_dtype` when it is looked up, not before."""

    def __init__(self, path: epath.Path, param_dtype: str):
        hf, layout, reward = read_hf_config(path)
        if awq_group(hf, path / "config.json") is not None:
            raise CheckpointError(f"train.init_weights={path}: an AWQ int4 checkpoint; training starts from float "
                                  "weights (the model directory it was quantized from)")
        self.cfg = ModelConfig.from_hf_config(hf, param_dtype=param_dtype)
        self.reader = CheckpointReader(path)
        self.mappings = {ours: (names, mapping)
                         for ours, names, mapping, _ in iter_mappings(self.cfg, layout, reward=reward)}
        names = [n for hf_names, _ in self.mappings.values() for n in hf_names]
        check_tensors(f"train.init_weights={path}", self.reader, names, self.cfg, layout, reward)
        conversions: dict[tuple[str, str], int] = {}  # said once, up front (the dtypes are in the file headers)
        for name in names:
            if self.reader.dtype(name) != np.dtype(param_dtype):
                key = (str(self.reader.dtype(name)), param_dtype)
                conversions[key] = conversions.get(key, 0) + 1
        report_conversions(path, conversions, np.dtype(param_dtype))

    def __getitem__(self, path: tuple) -> np.ndarray:
        names, mapping = self.mappings[path]
        return read_param(self.cfg, self.reader, mapping, names, {})

    def __contains__(self, path: object) -> bool:  # Mapping's own would read the tensor to find out
        return path in self.mappings

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.mappings)

    def __len__(self) -> int:
        return len(self.mappings)


def load_source(path: str | os.PathLike, cfg: ModelConfig, mesh: Mesh,
                rules=DEFAULT_RULES) -> Mapping[tuple, Any]:
    """The weights of a model directory (read lazily, `ModelDirectorySource`) or of a run directory (restored onto
    `mesh`, LoRA merged), local or a URL, as {path: array}."""
    path = epath.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"train.init_weights={path}: not a model directory or a run directory")
    if not is_run_directory(path):
        return ModelDirectorySource(path, cfg.param_dtype)
    _, model, _ = load_model(path, mesh=mesh, rules=rules)
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _find(source: Mapping[tuple, Any], path: tuple, layers: int) -> tuple[Callable[[], Any] | None, list[tuple]]:
    """A reader of the value for `path` (a lazy source reads when it is called) and the source keys it uses,
    whichever way each side stores the decoder stack."""
    if path in source:
        return (lambda: source[path]), [path]
    if path[:2] != ("model", "layers"):
        return None, []
    if isinstance(path[2], int):  # this model unrolled, the source stacked
        stacked = ("model", "layers", *path[3:])
        return ((lambda: source[stacked][path[2]]), [stacked]) if stacked in source else (None, [])
    keys = [("model", "layers", i, *path[2:]) for i in range(layers)]  # this model stacked, the source unrolled
    if not all(k in source for k in keys):
        return None, []
    return (lambda: _stack(source, keys)), keys


def _stack(source: Mapping[tuple, Any], keys: list[tuple]) -> np.ndarray:
    """The layers' values along a new first axis, filled one layer at a time (no list of copies beside it)."""
    first = np.asarray(source[keys[0]])
    stacked = np.empty((len(keys), *first.shape), first.dtype)
    stacked[0] = first
    for i, key in enumerate(keys[1:], start=1):
        stacked[i] = np.asarray(source[key])
    return stacked


def _fresh(cfg: ModelConfig, model_class, seed: int, mesh: Mesh, paths: list[tuple],
           shardings: dict[tuple, nnx.Variable]) -> dict[tuple, jax.Array]:
    """The initial values of `paths` only (what the source lacks) as `model_class(cfg)` draws them with `seed`, on
    their shardings: one jit whose other outputs (the projections, a QLoRA base's quantization) XLA drops."""
    if not paths:
        return {}

    def init():
        flat = dict(nnx.to_flat_state(nnx.state(model_class(cfg, rngs=nnx.Rngs(seed)))))
        return [flat[p].get_value() for p in paths]

    with jax.set_mesh(mesh):
        values = jax.jit(init, out_shardings=[shardings[p].get_value() for p in paths])()
    return dict(zip(paths, values, strict=True))


def initial_params(path: str | os.PathLike, cfg: ModelConfig, model_class, mesh: Mesh, *, seed: int = 0,
                   rules=DEFAULT_RULES) -> nnx.State:
    """Parameters of `model_class(cfg)` on their shardings: the source's where it has them (a QLoRA base quantized
    as it is read), the fresh initialisation of `seed` elsewhere."""
    source = load_source(path, cfg, mesh, rules)
    _, abstract = nnx.split(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(seed))))
    shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh, rules)))
    targets = nnx.to_flat_state(abstract)
    found = {target_path: _find(source, target_path, cfg.num_hidden_layers) for target_path, _ in targets}
    kept_fresh = [target_path for target_path, (read, _) in found.items() if read is None]
    for target_path in kept_fresh:
        name = "/".join(map(str, target_path))
        if not (is_lora_path(name) or target_path[0] in _HEADS):
            raise ValueError(f"train.init_weights={path}: the source has no '{name}' (is it the same "
                             f"architecture? {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})")
    fresh = _fresh(cfg, model_class, seed, mesh, kept_fresh, shardings)
    used, filled = set(), []
    for target_path, var in targets:
        name = "/".join(map(str, target_path))
        read, keys = found[target_path]
        if read is None:
            filled.append((target_path, var.replace(fresh[target_path])))
            continue
        value = read()
        if value.shape != var.shape:
            raise ValueError(f"train.init_weights={path}: '{name}' has shape {list(value.shape)} there but "
                             f"{list(var.shape)} in this model")
        used.update(keys)
        template, sharding = var.get_value(), shardings[target_path].get_value()
        if isinstance(template, NF4Weight):  # QLoRA: placed as the float parameter would be, quantized at once
            axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
            value = jax.device_put(value, param_sharding(axes, var.shape, mesh, rules))
            value = jax.device_put(quantize_like(value, template), sharding)
        else:
            value = jax.device_put(value.astype(var.dtype), sharding)
        filled.append((target_path, var.replace(value)))
    dropped = sorted("/".join(map(str, p)) for p in source if p not in used)
    log.info("init_weights %s: %d parameters loaded, fresh: %s, not used: %s", path, len(used),
             ["/".join(map(str, p)) for p in kept_fresh] or "none", dropped or "none")
    if dropped and any(not p.startswith(_HEADS) for p in dropped):
        raise ValueError(f"train.init_weights={path}: the source has parameters this model lacks: {dropped[:6]}")
    return nnx.from_flat_state(filled)
