"""HF model directories in and out: `load_pretrained` and `save_pretrained`.

Loading builds the model abstractly (`nnx.eval_shape`, no allocation), then fills it tensor by tensor from the
safetensors files (one ranged read per tensor), placing each parameter directly on its sharding when a mesh is given:
host memory never holds the model twice. Saving streams the other way. Round trips are bit-exact when dtypes are
kept. Model directories are `etils.epath` paths: local, or a URL (`gs://...`) read and written in place.

A model directory may hold int4 projections in the AWQ format (`convert/awq.py`; config.json's
`quantization_config`): they load as `Int4Weight`s, and a model with `Int4Weight`s saves as such, bit-exactly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from internlm2_jax.chat_template import get_chat_template, save_chat_template
from internlm2_jax.config import LAYOUTS, ModelConfig
from internlm2_jax.convert.awq import awq_group, awq_names, awq_shapes, int4_tensors, quantization_config, read_int4
from internlm2_jax.convert.layouts import IGNORED_SUFFIXES, Mapping, layer_mappings, layer_prefix, top_mappings
from internlm2_jax.convert.safetensors_io import CheckpointError, CheckpointReader, write_checkpoint
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.model.int4 import Int4Weight
from internlm2_jax.model.quantize import INT4_PROJECTIONS, check_quantize_mode, quantize_model
from internlm2_jax.parallel import DEFAULT_RULES, param_sharding, state_shardings

log = logging.getLogger("internlm2_jax.convert")

# architecture name in config.json -> (layout, is reward model)
ARCHITECTURES = {
    "InternLM2ForCausalLM": ("internlm2", False),
    "InternLM2ForRewardModel": ("internlm2", True),
    "LlamaForCausalLM": ("llama", False),
    "LlamaForSequenceClassification": ("llama", True),
}


def read_hf_config(path: str | os.PathLike) -> tuple[dict[str, Any], str, bool]:
    """config.json of a model directory, with its layout and whether it is a reward model."""
    if not epath.Path(path).is_dir():
        raise CheckpointError(f"{path}: the model directory does not exist")
    config_path = epath.Path(path) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json; expected a HF model directory")
    hf = json.loads(config_path.read_text())
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise CheckpointError(f"{config_path}: unsupported architectures {archs}; expected one of "
                              f"{sorted(ARCHITECTURES)}")
    layout, reward = ARCHITECTURES[archs[0]]
    if reward and layout == "llama" and hf.get("num_labels", len(hf.get("id2label", {0: 0}))) != 1:
        raise CheckpointError(f"{config_path}: a reward model must have exactly one label (num_labels=1)")
    return hf, layout, reward


def model_class(reward: bool):
    return InternLM2ForRewardModel if reward else InternLM2ForCausalLM


def iter_mappings(cfg: ModelConfig, layout: str, *, reward: bool):
    """(our path, HF names, mapping) for every parameter, layers expanded one by one."""
    for m in top_mappings(cfg, layout, reward=reward):
        yield m.ours, m.hf, m, None
    for i in range(cfg.num_hidden_layers):
        prefix = layer_prefix(i)
        for m in layer_mappings(cfg, layout):
            yield ("model", "layers", i, *m.ours), tuple(prefix + n for n in m.hf), m, i


def load_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None, rules=DEFAULT_RULES, strict: bool = True,
                    quantize: str | None = None, **config_overrides: Any):
    """Loads a HF model directory (InternLM2 or Llama layout, causal LM or reward model) -> (config, model).

    `config_overrides` set the fields that are ours, not HF's: `dtype`, `param_dtype` (default float32), `remat`,
    `scan_layers`, `attention_impl`. With a `mesh`, each parameter is placed on its sharding as it is read.
    `strict=False` tolerates unexpected extra tensors (they are reported either way). `quantize` ("int8", "int4")
    quantizes the weights for decoding (`model.quantize.quantize_model`). An AWQ checkpoint's projections load as
    `Int4Weight`s, with its own group size (a `quantize="int4"` leaves them as they are).
    """
    check_quantize_mode(quantize)
    path = epath.Path(path)
    hf, layout, reward = read_hf_config(path)
    group = awq_group(hf, path / "config.json")  # None: floating-point projections
    cfg = ModelConfig.from_hf_config(hf, **config_overrides)
    reader = CheckpointReader(path)
    abstract = nnx.eval_shape(lambda: model_class(reward)(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(abstract_state))

    def int4(ours) -> bool:
        return group is not None and ours[-1] in INT4_PROJECTIONS

    mappings = list(iter_mappings(cfg, layout, reward=reward))
    stored = {ours: awq_names(names) if int4(ours) else names for ours, names, _, _ in mappings}
    check_tensors(path, reader, [n for names in stored.values() for n in names], cfg, layout, reward, strict=strict,
                  way_out=" (pass strict=False to ignore them)")
    conversions: dict[tuple[str, str], int] = {}
    filled: dict[tuple, np.ndarray] = {}
    stacked_buffers: dict[tuple, np.ndarray | list[Int4Weight]] = {}
    for ours, names, mapping, layer in mappings:
        if int4(ours):
            value = read_int4(cfg, reader, mapping, names, group)
        else:
            value = read_param(cfg, reader, mapping, names, conversions)
        if cfg.scan_layers and layer is not None:
            key = ("model", "layers", *mapping.ours)
            target = variables[key]
            if int4(ours):  # a few bits per parameter: the layers are stacked once all are read
                stacked_buffers.setdefault(key, []).append(value)
            else:
                if key not in stacked_buffers:
                    stacked_buffers[key] = np.empty(target.shape, target.dtype)
                stacked_buffers[key][layer] = value
            if layer == cfg.num_hidden_layers - 1:
                stack = stacked_buffers.pop(key)
                if isinstance(stack, list):
                    stack = jax.tree.map(lambda *layers: np.stack(layers), *stack)
                filled[key] = _place(stack, target, key, mesh, rules)
        else:
            filled[ours] = _place(value, variables[ours], ours, mesh, rules)
    report_conversions(path, conversions, np.dtype(cfg.param_dtype))
    state = nnx.from_flat_state([(p, v.replace(filled[p])) for p, v in variables.items()])
    model = nnx.merge(graphdef, state)
    return cfg, quantize_model(model, quantize, rules)


def check_tensors(path, reader: CheckpointReader, names: list[str], cfg: ModelConfig, layout: str, reward: bool, *,
                  strict: bool = True, way_out: str = "") -> None:
    """A CheckpointError when the checkpoint lacks any of `names` (the tensors the model reads), or holds tensors
    it does not use (`strict`, the error ending with `way_out`; otherwise a warning)."""
    missing = [n for n in names if n not in reader]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: missing tensors for a {layout} {'reward model' if reward else 'causal LM'} "
                              f"with {cfg.num_hidden_layers} layers: {shown}")
    used = set(names)
    if reward is False and cfg.tie_word_embeddings:
        used |= {"lm_head.weight", "output.weight"}  # tied checkpoints may carry a copy of the embedding
    extra = [k for k in reader.keys() if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        message = f"{path}: {len(extra)} tensors that this model does not use: {', '.join(extra[:8])}"
        if strict:
            raise CheckpointError(message + way_out)
        warnings.warn(message, stacklevel=3)


def read_param(cfg: ModelConfig, reader: CheckpointReader, mapping: Mapping, names, conversions) -> np.ndarray:
    """One parameter in our layout and `cfg.param_dtype`, from its HF tensors `names` (shapes checked); dtype
    conversions are counted in `conversions` for `report_conversions`."""
    expected = mapping.hf_shapes(cfg)
    arrays = []
    for name, shape in zip(names, expected, strict=True):
        found = reader.shape(name)
        if found != tuple(shape):
            raise CheckpointError(f"tensor '{name}' has shape {list(found)} in the checkpoint, but config.json "
                                  f"implies {list(shape)} (hidden_size={cfg.hidden_size}, heads="
                                  f"{cfg.num_attention_heads}, kv_heads={cfg.num_key_value_heads}, "
                                  f"vocab_size={cfg.vocab_size})")
        arrays.append(reader.read(name))
    target = np.dtype(cfg.param_dtype)
    for a in arrays:
        if a.dtype != target:
            key = (str(a.dtype), str(target))
            conversions[key] = conversions.get(key, 0) + 1
    return np.asarray(mapping.to_ours(cfg, arrays), dtype=target)


def _place(value: np.ndarray | Int4Weight, target, path, mesh, rules):
    if value.shape != target.shape:  # a layout-table bug, never a user error
        raise AssertionError(f"{path}: converted shape {value.shape} != model shape {target.shape}")
    if mesh is None:
        return jax.device_put(value)
    if isinstance(value, Int4Weight):  # each of its arrays on the sharding of its own logical axes
        return jax.device_put(value, state_shardings(target.replace(value), mesh, rules).get_value())
    axes = target.get_metadata().get("logical_axes") or (None,) * value.ndim
    return jax.device_put(value, param_sharding(axes, value.shape, mesh, rules))


def report_conversions(path, conversions, target) -> None:
    """Says once per (source, target) dtype pair how many tensors were converted: a warning when narrowing."""
    for (src, dst), count in sorted(conversions.items()):
        message = f"{path}: converted {count} tensors from {src} to {dst}"
        if np.dtype(dst).itemsize < np.dtype(src).itemsize:
            warnings.warn(message + " (narrowing: precision is lost)", stacklevel=3)
        else:
            log.info(message)


def save_pretrained(model, path: str | os.PathLike, *, layout: str = "internlm2", tokenizer=None,
                    dtype: str | None = None, max_shard_bytes: int = 4 << 30,
                    chat_template: str = "internlm2_chat") -> epath.Path:
    """Writes a complete model directory: config.json, generation_config.json, safetensors, tokenizer files.

    `dtype` (e.g. "bfloat16") converts the weights on the way out; by default they keep the parameter dtype, which
    makes save -> load bit-exact. `Int4Weight` projections are written as AWQ int4 tensors (one group size for
    all) with config.json's `quantization_config`, bit-exactly; other quantized weights (int8, NF4) have no model
    directory format and are refused. `tokenizer` is our `Tokenizer`; its HF files give transformers exactly our
    ids, and tokenizer_config.json names the `chat_template` (with its jinja form).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    template = get_chat_template(chat_template)  # an unknown name fails before anything is written
    reward = isinstance(model, InternLM2ForRewardModel)
    cfg: ModelConfig = model.cfg
    if cfg.lora is not None:  # the HF layouts have no place for adapters: never drop them silently
        raise ValueError("the model has LoRA adapters: export `model.lora.merge_lora(model)` for merged weights, or "
                         "`convert.peft.base_model(model)` plus `convert.peft.save_adapters(model, ...)` for PEFT")
    path = epath.Path(path)
    flat = {where: v.get_value() for where, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out_dtype = np.dtype(dtype or cfg.param_dtype)
    other = [(where, v) for where, v in flat.items() if not isinstance(v, (jax.Array, np.ndarray, Int4Weight))]
    if other:
        raise ValueError(f"{'/'.join(map(str, other[0][0]))} is a {type(other[0][1]).__name__}: a model directory "
                         "holds floating-point or AWQ int4 weights; save the float model and quantize it when loading")
    groups = sorted({v.group for v in flat.values() if isinstance(v, Int4Weight)})
    if len(groups) > 1:
        raise ValueError(f"int4 weights in groups of {groups} inputs: an AWQ checkpoint has one group_size")

    def key(ours, layer):
        return ("model", "layers", *ours[3:]) if cfg.scan_layers and layer is not None else ours

    def param(ours, layer):
        value = flat[key(ours, layer)]
        return jax.device_get(value if key(ours, layer) == ours else jax.tree.map(lambda a: a[layer], value))

    @functools.lru_cache(maxsize=1)  # a projection's AWQ tensors (Llama's q, k and v too) come from one conversion
    def awq_tensors(ours, layer, mapping):
        return int4_tensors(cfg, mapping, param(ours, layer))

    specs = []
    for ours, names, mapping, layer in iter_mappings(cfg, layout, reward=reward):
        if isinstance(flat[key(ours, layer)], Int4Weight):
            awq = zip(awq_names(names), awq_shapes(cfg, mapping, names, groups[0]), strict=True)
            for j, (name, (shape, awq_dtype)) in enumerate(awq):
                produce = lambda ours=ours, layer=layer, mapping=mapping, j=j: awq_tensors(ours, layer, mapping)[j]
                specs.append((name, shape, awq_dtype, produce))
            continue
        for j, (name, shape) in enumerate(zip(names, mapping.hf_shapes(cfg), strict=True)):
            # Each HF tensor is produced only when the writer reaches it (a layer's q/k/v re-read the fused kernel).
            produce = (lambda ours=ours, layer=layer, mapping=mapping, j=j:
                       mapping.to_hf(cfg, param(ours, layer))[j].astype(out_dtype))
            specs.append((name, tuple(shape), out_dtype, produce))
    write_checkpoint(path, specs, max_shard_bytes=max_shard_bytes)
    hf_config = cfg.to_hf_config(layout, reward=reward)
    hf_config["torch_dtype"] = out_dtype.name
    if groups:
        hf_config["quantization_config"] = quantization_config(groups[0])
    if reward and tokenizer is not None:  # where the score is read (XTuner's InternLM2ForRewardModel config field)
        hf_config["reward_token_id"] = tokenizer.reward_token_id
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    eos = [cfg.eos_token_id]
    if tokenizer is not None:
        eos.append(tokenizer.token_id("<|im_end|>"))
        tokenizer.save_pretrained(path)
        save_chat_template(path, template)
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path
