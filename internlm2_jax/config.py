"""Model configuration: one frozen dataclass, the released InternLM2 sizes as presets, HF config.json in and out.

The field names follow HF's `config.json` so that a researcher who knows the released configs can read ours. The
reader accepts both generations of HF configs: the released InternLM2 form (`rope_theta`, `rope_scaling: {type,
factor}`, `bias`) and the current transformers form (`rope_parameters: {rope_type, rope_theta, factor}`,
`attention_bias`, `head_dim`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

RopeType = Literal["linear", "dynamic"]
LAYOUTS = ("internlm2", "llama")
DTYPES = ("float32", "bfloat16", "float16")
# Names of jax.checkpoint policies; "none" means no rematerialisation at all.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
# Which Pallas GPU flash kernels "pallas_gpu" runs for training/prefill: the Triton FlashAttention-2 kernels (any CUDA
# GPU) or the Mosaic GPU kernels for Hopper (FlashAttention-3-style; bf16/fp16, head_dim a multiple of 64).
GPU_FLASH_KERNELS = ("triton", "mosaic")
# How attention splits over mesh.sequence > 1 (model/context_parallel.py): gather K/V, or trade sequence for heads.
CONTEXT_PARALLEL = ("all_gather", "ulysses")


class ConfigError(ValueError):
    """A config value is impossible; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    type: RopeType
    factor: float


LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
QUANTIZED_BASES = (None, "nf4")  # LoraConfig.quantize_base: a float base, or QLoRA's NF4 (model/nf4.py)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the named projections: W x + (alpha / rank) * B A dropout(x), B zero at init."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    # QLoRA: the frozen base projections (all five, targeted or not: the point is their memory) stored as NF4 with
    # double quantization, blocks of `nf4_block` along each weight's inputs (bitsandbytes' 64) and the absmax
    # codes scaled per `nf4_absmax_block` outputs (256). The head, embedding and norms stay in floating point.
    quantize_base: str | None = None
    nf4_block: int = 64
    nf4_absmax_block: int = 256
    # The adapters' dtype (their gradients and Adam moments follow); None: the model's param_dtype, which also holds
    # the frozen embedding, head and norms. QLoRA's usual setting (XTuner, the paper) is a bf16 base with "float32"
    # adapters: in bf16 an update below ~0.2-0.4% of a weight rounds away. The product runs in the compute dtype.
    adapter_dtype: str | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"lora.targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.quantize_base not in QUANTIZED_BASES:
            raise ConfigError(f"lora.quantize_base must be one of {QUANTIZED_BASES}, got {self.quantize_base!r}")
        for name in ("nf4_block", "nf4_absmax_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 2:
                raise ConfigError(f"lora.{name} must be a positive even integer, got {value!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in DTYPES:
            raise ConfigError(f"lora.adapter_dtype must be None (the model's param_dtype) or one of {DTYPES}, got "
                              f"{self.adapter_dtype!r}")

    def nf4_errors(self, model: ModelConfig) -> list[str]:
        """Why `model`'s projections cannot be NF4 with these blocks: each weight's inputs [in, out] must divide
        into `nf4_block`s and its outputs into `nf4_absmax_block`s (none: QLoRA is off, or they all fit)."""
        if self.quantize_base is None:
            return []
        h, i = model.hidden_size, model.intermediate_size
        heads, kv, d = model.num_attention_heads, model.num_key_value_heads, model.head_dim
        shapes = {"wqkv": (h, (heads + 2 * kv) * d), "wo": (heads * d, h), "w1": (h, i), "w3": (h, i), "w2": (i, h)}
        errors = []
        for name, (n_in, n_out) in shapes.items():
            if n_in % self.nf4_block:
                errors.append(f"{name} [in={n_in}, out={n_out}]: lora.nf4_block={self.nf4_block} does not divide "
                              f"its {n_in} inputs")
            if n_out % self.nf4_absmax_block:
                errors.append(f"{name} [in={n_in}, out={n_out}]: lora.nf4_absmax_block={self.nf4_absmax_block} "
                              f"does not divide its {n_out} outputs")
        return errors

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    bias: bool = False  # wqkv and wo biases (HF `bias` / `attention_bias`); the MLP never has biases
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    # Not part of HF config.json: how we run the model.
    dtype: str = "float32"  # compute dtype of activations and matmul operands
    param_dtype: str = "float32"  # master weights
    remat: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"
    gpu_flash_kernel: str = "triton"  # GPU_FLASH_KERNELS; "mosaic" stays opt-in until it has been timed on a GPU
    context_parallel: str = "all_gather"  # CONTEXT_PARALLEL: the strategy when mesh.sequence > 1
    lora: LoraConfig | None = None  # adapters on the projections (fine-tuning); merged away for export

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}): each KV head serves a whole group of query heads")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            if self.rope_scaling.type not in ("linear", "dynamic"):
                raise ConfigError(f"rope_scaling.type must be 'linear' or 'dynamic', got {self.rope_scaling.type!r}")
            if not self.rope_scaling.factor >= 1.0:
                raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.rope_scaling.factor!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.gpu_flash_kernel not in GPU_FLASH_KERNELS:
            raise ConfigError(f"gpu_flash_kernel must be one of {GPU_FLASH_KERNELS}, got {self.gpu_flash_kernel!r}")
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ConfigError(f"context_parallel must be one of {CONTEXT_PARALLEL}, got {self.context_parallel!r}")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"lora must be a LoraConfig or None, got {type(self.lora).__name__}")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """The inverse of `dataclasses.asdict` (what checkpoints record)."""
        fields = dict(fields)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        if fields.get("lora") is not None:
            lora = fields["lora"]
            fields["lora"] = LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in lora.items()})
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model config fields {sorted(unknown)}")
        return cls(**fields)

    # ---- parameter count (closed form; the model test checks it against the built module) ----------------------
    def num_params(self, *, reward_head: bool = False) -> int:
        h, d = self.hidden_size, self.head_dim
        qkv_out = (self.num_attention_heads + 2 * self.num_key_value_heads) * d
        attention = h * qkv_out + self.num_attention_heads * d * h
        if self.bias:
            attention += qkv_out + h
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        embedding = self.vocab_size * h
        if reward_head:
            head = h
        else:
            head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embedding + self.num_hidden_layers * per_layer + h + head

    # ---- HF config.json ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Reads a HF `config.json` dict (InternLM2 or Llama, old or new transformers form)."""

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"config.json has no '{key}'")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (SwiGLU), got {act!r}")
        if hf.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not an InternLM2 architecture (its MLP has no biases)")
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        rope_params = hf.get("rope_parameters") or {}
        theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling_dict = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default"
                                                  else None)
        rope_scaling = None
        if scaling_dict:
            kind = scaling_dict.get("type", scaling_dict.get("rope_type"))
            if kind not in ("linear", "dynamic"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (expected 'linear' or 'dynamic')")
            if "factor" not in scaling_dict:
                raise ConfigError(f"rope_scaling {scaling_dict!r} has no 'factor'")
            rope_scaling = RopeScaling(kind, float(scaling_dict["factor"]))
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        pad = hf.get("pad_token_id")
        fields = dict(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            bias=bool(hf.get("bias", hf.get("attention_bias", False))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id", 1) if hf.get("bos_token_id") is not None else 1,
            eos_token_id=eos if eos is not None else 2,
            pad_token_id=pad if pad is not None else (eos if eos is not None else 2),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self, layout: str = "internlm2", *, reward: bool = False) -> dict[str, Any]:
        """Writes the `config.json` of the given layout (see `convert` for the weights)."""
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, hidden_act="silu", initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, torch_dtype=self.param_dtype,
            use_cache=True,
        )
        scaling = (None if self.rope_scaling is None
                   else {"type": self.rope_scaling.type, "factor": self.rope_scaling.factor})
        if layout == "internlm2":
            if self.head_dim * self.num_attention_heads != self.hidden_size:
                raise ConfigError("the InternLM2 layout needs head_dim == hidden_size / num_attention_heads; "
                                  "use layout='llama'")
            return dict(architectures=["InternLM2ForRewardModel" if reward else "InternLM2ForCausalLM"],
                        model_type="internlm2", rope_theta=self.rope_theta, rope_scaling=scaling, bias=self.bias,
                        **common)
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {"rope_type": self.rope_scaling.type, "rope_theta": self.rope_theta,
                               "factor": self.rope_scaling.factor}
        arch = "LlamaForSequenceClassification" if reward else "LlamaForCausalLM"
        extra = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}} if reward else {}
        return dict(architectures=[arch], model_type="llama", rope_parameters=rope_parameters,
                    attention_bias=self.bias, mlp_bias=False, head_dim=self.head_dim, **extra, **common)


def _released(**kw: Any) -> ModelConfig:
    return ModelConfig(rope_scaling=RopeScaling("dynamic", 2.0), **kw)


# The released sizes (spec §2). rope_scaling is the post-June-2024 value shipped with the fixed hub configs.
PRESETS: dict[str, ModelConfig] = {
    "internlm2_1_8b": _released(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                num_attention_heads=16, num_key_value_heads=8),
    "internlm2_7b": _released(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8),
    "internlm2_20b": _released(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48,
                               num_attention_heads=48, num_key_value_heads=8),
    "internlm2_5_7b": _released(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8),
    # The 57.7M-parameter shape the benchmarks use as a common yardstick.
    "bench": ModelConfig(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=512),
    # Tests: max_position_embeddings equals its training length so dynamic NTK is exercised beyond it.
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                        rope_scaling=RopeScaling("dynamic", 2.0)),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with field overrides, e.g. `preset("internlm2_7b", scan_layers=True)`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
