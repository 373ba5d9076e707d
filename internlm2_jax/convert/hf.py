"""HF model directories in and out: `load_pretrained` and `save_pretrained`.

Loading builds the model abstractly (`nnx.eval_shape`, no allocation), then fills it tensor by tensor from the
safetensors files (one ranged read per tensor), placing each parameter directly on its sharding when a mesh is given:
host memory never holds the model twice. Saving streams the other way. Round trips are bit-exact when dtypes are
kept. Model directories are `etils.epath` paths: local, or a URL (`gs://...`) read and written in place.
"""

from __future__ import annotations

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
from internlm2_jax.convert.layouts import IGNORED_SUFFIXES, Mapping, layer_mappings, layer_prefix, top_mappings
from internlm2_jax.convert.safetensors_io import CheckpointError, CheckpointReader, write_checkpoint
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.model.quantize import quantize_int8
from internlm2_jax.parallel import DEFAULT_RULES, param_sharding

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
    `strict=False` tolerates unexpected extra tensors (they are reported either way). `quantize="int8"` stores the
    projection weights as int8 with per-channel scales, for decoding (`model.quantize`).
    """
    path = epath.Path(path)
    hf, layout, reward = read_hf_config(path)
    cfg = ModelConfig.from_hf_config(hf, **config_overrides)
    reader = CheckpointReader(path)
    abstract = nnx.eval_shape(lambda: model_class(reward)(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(abstract_state))

    mappings = list(iter_mappings(cfg, layout, reward=reward))
    missing = [n for _, names, _, _ in mappings for n in names if n not in reader]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: missing tensors for a {layout} {'reward model' if reward else 'causal LM'} "
                              f"with {cfg.num_hidden_layers} layers: {shown}")
    used = {n for _, names, _, _ in mappings for n in names}
    if reward is False and cfg.tie_word_embeddings:
        used |= {"lm_head.weight", "output.weight"}  # tied checkpoints may carry a copy of the embedding
    extra = [k for k in reader.keys() if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        message = f"{path}: {len(extra)} tensors that this model does not use: {', '.join(extra[:8])}"
        if strict:
            raise CheckpointError(message + " (pass strict=False to ignore them)")
        warnings.warn(message, stacklevel=2)

    conversions: dict[tuple[str, str], int] = {}
    filled: dict[tuple, np.ndarray] = {}
    stacked_buffers: dict[tuple, np.ndarray] = {}
    for ours, names, mapping, layer in mappings:
        value = _read_param(cfg, reader, mapping, names, conversions)
        if cfg.scan_layers and layer is not None:
            key = ("model", "layers", *mapping.ours)
            target = variables[key]
            if key not in stacked_buffers:
                stacked_buffers[key] = np.empty(target.shape, target.dtype)
            stacked_buffers[key][layer] = value
            if layer == cfg.num_hidden_layers - 1:
                filled[key] = _place(stacked_buffers.pop(key), target, key, mesh, rules)
        else:
            filled[ours] = _place(value, variables[ours], ours, mesh, rules)
    _report_conversions(path, conversions, np.dtype(cfg.param_dtype))
    state = nnx.from_flat_state([(p, v.replace(filled[p])) for p, v in variables.items()])
    model = nnx.merge(graphdef, state)
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize: only 'int8' (weight-only, for decoding) is supported, got {quantize!r}")
    return cfg, quantize_int8(model) if quantize else model


def _read_param(cfg: ModelConfig, reader: CheckpointReader, mapping: Mapping, names, conversions) -> np.ndarray:
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


def _place(value: np.ndarray, target, path, mesh, rules) -> jax.Array:
    if value.shape != target.shape:  # a layout-table bug, never a user error
        raise AssertionError(f"{path}: converted shape {value.shape} != model shape {target.shape}")
    if mesh is None:
        return jax.device_put(value)
    axes = target.get_metadata().get("logical_axes") or (None,) * value.ndim
    return jax.device_put(value, param_sharding(axes, value.shape, mesh, rules))


def _report_conversions(path, conversions, target) -> None:
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
    makes save -> load bit-exact. `tokenizer` is our `Tokenizer`; its HF files give transformers exactly our ids,
    and tokenizer_config.json names the `chat_template` (with its jinja form).
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
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out_dtype = np.dtype(dtype or cfg.param_dtype)

    def param(ours, layer):
        if cfg.scan_layers and layer is not None:
            return np.asarray(jax.device_get(flat[("model", "layers", *ours[3:])][...][layer]))
        return np.asarray(jax.device_get(flat[ours][...]))

    specs = []
    for ours, names, mapping, layer in iter_mappings(cfg, layout, reward=reward):
        for j, (name, shape) in enumerate(zip(names, mapping.hf_shapes(cfg), strict=True)):
            # Each HF tensor is produced only when the writer reaches it (a layer's q/k/v re-read the fused kernel).
            produce = (lambda ours=ours, layer=layer, mapping=mapping, j=j:
                       mapping.to_hf(cfg, param(ours, layer))[j].astype(out_dtype))
            specs.append((name, tuple(shape), out_dtype, produce))
    write_checkpoint(path, specs, max_shard_bytes=max_shard_bytes)
    hf_config = cfg.to_hf_config(layout, reward=reward)
    hf_config["torch_dtype"] = out_dtype.name
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
