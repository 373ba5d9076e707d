"""LoRA adapters on the projection matrices: `W x + (alpha / rank) * B(A(dropout(x)))`, and merging them away.

An adapter is two parameters beside the weight it adapts (`attention/wqkv_lora/lora_a`, `.../lora_b`), so the
training state selects them by path: the optimizer trains `lora_` paths only and holds moments for nothing else.
A's input dimensions are the weight's contracted dimensions and B's output dimensions are the weight's output
dimensions, so one equation rewrite (`lora_equations`) serves every projection and both layouts of the fused wqkv.
Initialisation follows PEFT: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0, so a fresh adapter changes nothing.
The adapters are stored in `LoraConfig.adapter_dtype` (default: the weight's param_dtype), e.g. fp32 beside a bf16
base, and multiplied in the compute dtype like every projection.

QLoRA (`LoraConfig(quantize_base="nf4")`): every projection's frozen base weight is an `NF4Weight` inside its
parameter (model/nf4.py), built by `quantize_base` when the model is; adapters train against its dequantized
values, so merging and exporting go through `dequantized_base`, never through the float weights it was made from.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from internlm2_jax.config import ConfigError, LoraConfig, ModelConfig
from internlm2_jax.model.layers import dense
from internlm2_jax.model.nf4 import NF4Weight, quantize_projection

# The projections' matmuls (the model calls them by these names), input-major weights: contracted dims first.
EQUATIONS = {"wqkv": "bte,ekgd->btkgd", "wo": "bthd,hde->bte", "w1": "bte,ei->bti", "w3": "bte,ei->bti",
             "w2": "bti,ie->bte"}
_RANK = "r"


def lora_equations(equation: str) -> tuple[str, str, str]:
    """For a projection `lhs,w->out`: the einsums of x @ A, of (x A) @ B, and of A @ B -> a delta of w."""
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    if _RANK in equation:
        raise ValueError(f"equation {equation!r} already uses the letter {_RANK!r}")
    contracted = "".join(c for c in rhs if c in lhs)
    kept = "".join(c for c in lhs if c not in rhs)
    outputs = "".join(c for c in rhs if c not in lhs)
    if rhs != contracted + outputs:
        raise ValueError(f"equation {equation!r}: the weight must list contracted dimensions first")
    return (f"{lhs},{contracted}{_RANK}->{kept}{_RANK}", f"{kept}{_RANK},{_RANK}{outputs}->{out}",
            f"{contracted}{_RANK},{_RANK}{outputs}->{rhs}")


class LoraAdapter(nnx.Module):
    def __init__(self, weight: nnx.Param, contracted: int, cfg: LoraConfig, *, rngs: nnx.Rngs):
        shape, axes = weight.shape, weight.get_metadata()["logical_axes"]
        dtype = jnp.dtype(cfg.adapter_dtype) if cfg.adapter_dtype is not None else weight.dtype
        fan_in = math.prod(shape[:contracted])
        bound = 1.0 / math.sqrt(fan_in)
        self.lora_a = nnx.Param(jax.random.uniform(rngs.params(), (*shape[:contracted], cfg.rank), dtype,
                                                   -bound, bound),
                                logical_axes=(*axes[:contracted], "lora_rank"))
        self.lora_b = nnx.Param(jnp.zeros((cfg.rank, *shape[contracted:]), dtype),
                                logical_axes=("lora_rank", *axes[contracted:]))


def contracted_dims(name: str) -> int:
    operands = EQUATIONS[name].split("->")[0].split(",")
    return sum(c in operands[0] for c in operands[1])


def make_adapter(cfg_lora: LoraConfig | None, name: str, weight: nnx.Param, rngs: nnx.Rngs) -> LoraAdapter | None:
    if cfg_lora is None or name not in cfg_lora.targets:
        return None
    return LoraAdapter(weight, contracted_dims(name), cfg_lora, rngs=rngs)


def lora_dense(equation: str, x: jax.Array, w, adapter: LoraAdapter | None, dtype, cfg_lora: LoraConfig | None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """`dense(equation, x, w)` plus the adapter's low-rank update (dropout on its input only, as PEFT does)."""
    out = dense(equation, x, w, dtype)
    if adapter is None:
        return out
    a_eq, b_eq, _ = lora_equations(equation)
    if dropout_rng is not None and cfg_lora.dropout > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - cfg_lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg_lora.dropout), 0).astype(x.dtype)
    low = dense(a_eq, x, adapter.lora_a[...], dtype)
    delta = dense(b_eq, low, adapter.lora_b[...], dtype)
    return out + (delta * cfg_lora.scale).astype(out.dtype)


def merged_weight(equation: str, w: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                  stacked: bool = False) -> jax.Array:
    """w + scale * A B in w's dtype (fp32 products); `stacked` weights carry a leading layer axis."""
    _, _, merge_eq = lora_equations(equation)
    if stacked:
        inputs, out = merge_eq.split("->")
        merge_eq = ",".join("L" + part for part in inputs.split(",")) + "->L" + out
    delta = jnp.einsum(merge_eq, a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def is_lora_path(path: str) -> bool:
    return "lora_a" in path or "lora_b" in path


def quantize_base(layers: nnx.Module, cfg: ModelConfig) -> None:
    """Replaces, in place, the five projection weights of `layers` (`cfg.num_hidden_layers` decoder layers, one
    stack with a leading layer axis under `cfg.scan_layers`) by their NF4 (`cfg.lora.quantize_base="nf4"`); their
    logical axes stay the float weights', which `NF4Weight.leaf_axes` maps. A block that does not divide a weight
    is a ConfigError naming it, raised before anything is quantized (no silent float fallback)."""
    lora = cfg.lora
    if lora is None or lora.quantize_base != "nf4":
        raise ConfigError(f"quantize_base needs model.lora.quantize_base='nf4', got {lora!r}")
    errors = lora.nf4_errors(cfg)
    if errors:
        raise ConfigError(f"lora.quantize_base='nf4': {'; '.join(errors)}")
    for path, var in nnx.iter_graph(layers):
        if isinstance(var, nnx.Param) and path and path[-1] in EQUATIONS and not isinstance(var.get_value(),
                                                                                            NF4Weight):
            var.set_value(quantize_projection(var.get_value(), contracted_dims(path[-1]), int(cfg.scan_layers),
                                              block=lora.nf4_block, absmax_block=lora.nf4_absmax_block))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(weight: NF4Weight, dtype) -> jax.Array:
    # One program per weight shape (eagerly each op of the decode compiles on its own), decoding as the jitted
    # steps do (XLA fuses the absmax decode into a multiply-add).
    return weight.dequantize(dtype)


def dequantized_base(model: nnx.Module) -> nnx.Module:
    """A QLoRA model with its NF4 base weights dequantized into float parameters (param_dtype), adapters kept:
    the base its adapters were trained against, for merging or for a PEFT export. Other models come back as
    they are."""
    cfg = model.cfg
    if cfg.lora is None or cfg.lora.quantize_base is None:
        return model
    float_cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, quantize_base=None))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(model)(float_cfg, rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    state = []
    for path, var in nnx.to_flat_state(abstract):
        value = flat[path].get_value()
        if isinstance(value, NF4Weight):
            value = _dequantize(value, var.get_value().dtype)
        state.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(state))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """The same model without adapters, each adapted weight replaced by W + (alpha / rank) A B (for export and
    serving: one matmul per projection again). A QLoRA base is dequantized first: W is what the adapters were
    trained against, not the float weights it was quantized from. The input model is left as it is."""
    cfg = model.cfg
    if cfg.lora is None:
        return model
    model = dequantized_base(model)
    cfg = model.cfg
    base_cfg = cfg.replace(lora=None)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(model)(base_cfg, rngs=nnx.Rngs(0))))
    flat = {path: var for path, var in nnx.to_flat_state(nnx.state(model))}
    merged = []
    for path, var in nnx.to_flat_state(abstract):
        value = flat[path].get_value()
        adapter = path[:-1] + (f"{path[-1]}_lora",)
        if path[-1] in EQUATIONS and adapter + ("lora_a",) in flat:
            value = merged_weight(EQUATIONS[path[-1]], value, flat[adapter + ("lora_a",)].get_value(),
                                  flat[adapter + ("lora_b",)].get_value(), cfg.lora.scale,
                                  stacked=cfg.scan_layers and "layers" in path)
        merged.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(merged))
