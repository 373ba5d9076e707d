"""LoRA adapters in and out as PEFT adapter directories: `adapter_config.json` and `adapter_model.safetensors`.

PEFT keeps, for each adapted HF Linear, lora_A [r, in] and lora_B [out, r] and computes W x + (lora_alpha / r) B A x:
our forward exactly, once our input-major factors are flattened and transposed the way the weight converter
(`layouts`) flattens and transposes the weight they adapt. The fused wqkv adapter has one A whose output feeds q, k
and v alike, so the Llama layout repeats that A for q_proj, k_proj and v_proj and splits B as the weight is split. On
the way back the three As must therefore be equal, which an adapter trained in PEFT on separate projections is not.

A PEFT adapter refers to an unmerged base model: export it with `save_pretrained(base_model(model), ...)`.
"""

from __future__ import annotations

import json
import os
import jax
import numpy as np
from etils import epath
from flax import nnx

from internlm2_jax.config import LAYOUTS, LORA_TARGETS, ModelConfig
from internlm2_jax.convert.layouts import Mapping, layer_mappings, layer_prefix
from internlm2_jax.convert.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors_file
from internlm2_jax.model.lora import dequantized_base

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's prefix for a causal LM: PeftModelForCausalLM.base_model (LoraModel) .model (the HF model).
PREFIX = "base_model.model."

# The LoRA variants whose forward differs from ours, each with the value that turns it off: save_adapters writes
# these values, and a directory with any other is refused rather than silently misread.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA rescales the adapted weight by a learned magnitude"),
    "use_rslora": (False, "rsLoRA scales by lora_alpha / sqrt(r), not lora_alpha / r"),
    "fan_in_fan_out": (False, "its base weights are stored [in, out] (GPT-2 Conv1D)"),
    "bias": ("none", "it trains biases, which our adapters do not have"),
    "lora_bias": (False, "its lora_B has a bias"),
    "rank_pattern": ({}, "it gives some modules another rank"),
    "alpha_pattern": ({}, "it gives some modules another alpha"),
}


def _adapted(cfg: ModelConfig, layout: str, targets) -> list[Mapping]:
    """The weight mappings of one decoder layer whose weights carry an adapter."""
    return [m for m in layer_mappings(cfg, layout) if m.ours[-1] in targets]


def _modules(mapping: Mapping) -> list[str]:
    """The HF Linear modules of a weight mapping, relative to the layer (e.g. 'self_attn.q_proj')."""
    return [name.removesuffix(".weight") for name in mapping.hf]


def _tensor_name(layer: int, module: str, factor: str) -> str:
    return f"{PREFIX}{layer_prefix(layer)}{module}.lora_{factor}.weight"


def _adapter_path(cfg: ModelConfig, ours: tuple, layer: int) -> tuple:
    """Where the adapter of a layer's weight (e.g. ('attention', 'wqkv')) lives in our state."""
    *module, name = ours
    return ("model", "layers", *([] if cfg.scan_layers else [layer]), *module, f"{name}_lora")


def _to_hf(cfg: ModelConfig, mapping: Mapping, a: np.ndarray, b: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Our (A, B) of one projection -> (lora_A [r, in], lora_B [out, r]) for each HF module of `mapping`.

    The factor that carries the weight's multi-axis side (wqkv's B, wo's A) is that weight with the embed axis
    replaced by the rank, so the weight's own transform converts it under a config whose hidden_size is the rank.
    """
    rank_cfg = cfg.replace(hidden_size=a.shape[-1])
    name = mapping.ours[-1]
    if name == "wqkv":
        return [(a.T, b_hf) for b_hf in mapping.to_hf(rank_cfg, b)]
    if name == "wo":
        return [(mapping.to_hf(rank_cfg, a)[0], b.T)]
    return [(a.T, b.T)]


def _to_ours(cfg: ModelConfig, mapping: Mapping, pairs: list[tuple[np.ndarray, np.ndarray]]):
    """The inverse of `_to_hf`; for wqkv the caller has checked that the modules share one lora_A."""
    rank_cfg = cfg.replace(hidden_size=pairs[0][0].shape[0])
    name = mapping.ours[-1]
    if name == "wqkv":
        return pairs[0][0].T, mapping.to_ours(rank_cfg, [b for _, b in pairs])
    if name == "wo":
        return mapping.to_ours(rank_cfg, [pairs[0][0]]), pairs[0][1].T
    return pairs[0][0].T, pairs[0][1].T


def base_model(model: nnx.Module) -> nnx.Module:
    """The same model without its adapters and with its base weights unmerged: what a PEFT adapter is applied to
    (export it with `save_pretrained`). `merge_lora` is the other way out, with the adapters folded in. A QLoRA
    model's base comes out dequantized: the float weights its adapters were trained against."""
    model = dequantized_base(model)
    cfg = model.cfg
    if cfg.lora is None:
        return model
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(model)(cfg.replace(lora=None), rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    state = [(path, var.replace(flat[path].get_value())) for path, var in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(state))


def save_adapters(model: nnx.Module, path: str | os.PathLike, *, layout: str = "llama",
                  base_model_name_or_path: str | None = None) -> epath.Path:
    """Writes the model's LoRA adapters as a PEFT adapter directory for the base in `layout` ('llama' or
    'internlm2', as `save_pretrained` writes it), loadable with `peft.PeftModel.from_pretrained`."""
    cfg: ModelConfig = model.cfg
    if cfg.lora is None:
        raise ValueError("the model has no LoRA adapters (cfg.lora is None)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def factor(ours, layer, which):
        value = np.asarray(jax.device_get(flat[(*_adapter_path(cfg, ours, layer), which)][...]))
        return value[layer] if cfg.scan_layers else value

    mappings = _adapted(cfg, layout, cfg.lora.targets)
    specs = []
    for layer in range(cfg.num_hidden_layers):
        for m in mappings:
            pairs = _to_hf(cfg, m, factor(m.ours, layer, "lora_a"), factor(m.ours, layer, "lora_b"))
            for module, (a, b) in zip(_modules(m), pairs, strict=True):
                for name, value in ((_tensor_name(layer, module, "A"), a), (_tensor_name(layer, module, "B"), b)):
                    specs.append((name, value.shape, value.dtype, lambda value=value: value))
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # write_checkpoint names its files model*.safetensors; PEFT wants its own name, written by the same code.
    write_safetensors_file(path / WEIGHTS_NAME, specs, {"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": [module.rsplit(".", 1)[-1] for m in mappings for module in _modules(m)],
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True,
        **{key: allowed for key, (allowed, _) in _UNSUPPORTED.items()},
    }
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_adapters(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """A copy of `model` with its adapters read from a PEFT adapter directory in either layout (told apart by the
    tensor names). The model's `cfg.lora` must match the adapter's rank, alpha and adapted projections."""
    cfg: ModelConfig = model.cfg
    path = epath.Path(path)
    if cfg.lora is None:
        raise ValueError("the model has no LoRA adapters to load into (cfg.lora is None); build it with a "
                         "LoraConfig whose rank, alpha and targets match the adapter's")
    peft_config = _read_config(path)
    if not (path / WEIGHTS_NAME).exists():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} (only safetensors adapters are read)")
    file = SafetensorsFile(path / WEIGHTS_NAME)
    names = set(file.keys())
    layout = _detect_layout(cfg, names, path)
    targets = tuple(t for t in LORA_TARGETS if any(
        _tensor_name(layer, module, "A") in names
        for m in _adapted(cfg, layout, (t,)) for module in _modules(m) for layer in range(cfg.num_hidden_layers)))

    differences = []
    if peft_config["r"] != cfg.lora.rank:
        differences.append(f"rank: the adapter has r={peft_config['r']}, the model cfg.lora.rank={cfg.lora.rank}")
    if float(peft_config["lora_alpha"]) != cfg.lora.alpha:
        differences.append(f"alpha: the adapter has lora_alpha={peft_config['lora_alpha']}, the model "
                           f"cfg.lora.alpha={cfg.lora.alpha} (the update is scaled by alpha / rank)")
    if set(targets) != set(cfg.lora.targets):
        differences.append(f"targets: the adapter's tensors adapt {targets}, the model cfg.lora.targets="
                           f"{cfg.lora.targets}")
    if differences:
        raise CheckpointError(f"{path}: the adapter does not fit the model's LoRA config: " + "; ".join(differences))

    mappings = _adapted(cfg, layout, targets)
    expected = {}  # tensor name -> shape
    for layer in range(cfg.num_hidden_layers):
        for m in mappings:
            for module, (out_features, in_features) in zip(_modules(m), m.hf_shapes(cfg), strict=True):
                expected[_tensor_name(layer, module, "A")] = (cfg.lora.rank, in_features)
                expected[_tensor_name(layer, module, "B")] = (out_features, cfg.lora.rank)
    missing = [name for name in expected if name not in names]
    if missing:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: missing {len(missing)} tensors of a {layout}-layout adapter "
                              f"for {cfg.num_hidden_layers} layers and targets {targets}: {_shown(missing)}")
    extra = [name for name in file.keys() if name not in expected]
    if extra:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: {len(extra)} tensors that are not LoRA factors of the "
                              f"adapted projections: {_shown(extra)}")
    for name, shape in expected.items():
        if file.shape(name) != shape:
            raise CheckpointError(f"{path / WEIGHTS_NAME}: tensor '{name}' has shape {list(file.shape(name))}, but "
                                  f"rank {cfg.lora.rank} and the model's sizes need {list(shape)}")

    factors: dict[tuple, list[np.ndarray]] = {}  # our lora_a / lora_b path -> its value per layer
    for layer in range(cfg.num_hidden_layers):
        for m in mappings:
            pairs = [(file.read(_tensor_name(layer, module, "A")), file.read(_tensor_name(layer, module, "B")))
                     for module in _modules(m)]
            if any(not np.array_equal(a, pairs[0][0]) for a, _ in pairs[1:]):
                raise CheckpointError(
                    f"{path / WEIGHTS_NAME}: layer {layer}: {', '.join(_modules(m))} have different lora_A. Our "
                    "fused wqkv adapter computes x @ A once for q, k and v, so it can hold only an adapter whose "
                    "three lora_A are equal (as save_adapters writes them); merge this one into the base weights "
                    "instead (PEFT's merge_and_unload) and load the merged model")
            a, b = _to_ours(cfg, m, pairs)
            adapter = _adapter_path(cfg, m.ours, layer)
            factors.setdefault((*adapter, "lora_a"), []).append(a)
            factors.setdefault((*adapter, "lora_b"), []).append(b)

    graphdef, state = nnx.split(model)
    flat = []
    for key, var in nnx.to_flat_state(state):
        if key in factors:
            old = var.get_value()
            value = np.stack(factors[key]) if cfg.scan_layers else factors[key][0]
            var = var.replace(jax.device_put(value.astype(old.dtype), old.sharding))
        flat.append((key, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _read_config(path: epath.Path) -> dict:
    if not (path / CONFIG_NAME).exists():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}; expected a PEFT adapter directory")
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path / CONFIG_NAME}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise CheckpointError(f"{path / CONFIG_NAME}: no '{key}'")
    for key, (allowed, why) in _UNSUPPORTED.items():
        if config.get(key, allowed) not in (allowed, None):
            raise CheckpointError(f"{path / CONFIG_NAME}: {key}={config[key]!r} is not supported: {why}")
    return config


def _detect_layout(cfg: ModelConfig, names: set[str], path: epath.Path) -> str:
    found = [layout for layout in LAYOUTS
             if any(_tensor_name(layer, module, factor) in names
                    for m in _adapted(cfg, layout, LORA_TARGETS) for module in _modules(m)
                    for layer in range(cfg.num_hidden_layers) for factor in "AB")]
    if len(found) != 1:
        what = "both layouts" if found else "neither layout"
        raise CheckpointError(f"{path / WEIGHTS_NAME}: its tensor names fit {what} (InternLM2: "
                              f"'{_tensor_name(0, 'attention.wqkv', 'A')}', Llama: "
                              f"'{_tensor_name(0, 'self_attn.q_proj', 'A')}'); found {_shown(sorted(names))}")
    return found[0]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
