"""Model FLOPs utilisation as the conventions define it, and the peaks it is measured against.

The peak comes from the device kind by exact name: a pod run whose MFU silently used another chip's peak (or the
CPU's) would be off by orders of magnitude. An unknown accelerator gives no MFU (and one warning), never a guess.
"""

from __future__ import annotations

import warnings

from internlm2_jax.config import ModelConfig

# Dense bf16 matmul peaks per chip (FLOP/s). CPU figures were measured on the 2-core CI machines (platform notes).
PEAK_FLOPS = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "tpu_v6e": 918e12,
    "h100": 989e12,  # SXM
    "h100_pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
    "b200": 2250e12,
    "cpu_bf16": 340e9,
    "cpu_f32": 200e9,
}

# `jax.Device.device_kind` as the runtimes report it -> PEAK_FLOPS key. TPUs by exact name: a v5p calls itself
# "TPU v5", a v5e "TPU v5 lite", a v6e "TPU v6 lite".
TPU_KINDS = {"TPU v4": "tpu_v4", "TPU v5 lite": "tpu_v5e", "TPU v5e": "tpu_v5e", "TPU v5": "tpu_v5p",
             "TPU v5p": "tpu_v5p", "TPU v6 lite": "tpu_v6e", "TPU v6e": "tpu_v6e"}
# NVIDIA kinds carry the memory and form factor ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"):
# matched by model name, the PCIe H100 first.
GPU_MODELS = (("H100 PCIe", "h100_pcie"), ("H100", "h100"), ("H200", "h200"), ("A100", "a100"), ("B200", "b200"))

_warned: set[str] = set()


def peak_flops_key(platform: str, device_kind: str, compute_dtype: str = "bfloat16") -> str | None:
    """The PEAK_FLOPS key of a device, or None (with one warning per kind) when the accelerator is unknown."""
    if platform == "cpu":
        return "cpu_bf16" if compute_dtype == "bfloat16" else "cpu_f32"
    if platform == "tpu" and device_kind in TPU_KINDS:
        return TPU_KINDS[device_kind]
    if platform in ("gpu", "cuda"):
        for model, key in GPU_MODELS:
            if model in device_kind:
                return key
    if device_kind not in _warned:
        _warned.add(device_kind)
        warnings.warn(f"no peak FLOP/s known for {platform} device {device_kind!r}: MFU is not reported (set "
                      f"train.peak_flops to one of {sorted(PEAK_FLOPS)} if it is one of them)", stacklevel=2)
    return None


def matmul_params(cfg: ModelConfig, *, head: bool = True) -> int:
    """N of the conventions: every matmul parameter, the output head included (`head=False`: a reward model, whose
    scalar head is negligible); the input embedding is a gather."""
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    if cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size  # the tied matrix still does the output matmul
    if not head:
        n -= cfg.vocab_size * cfg.hidden_size
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    return n - norms


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, trainable_params: int | None = None,
                          head: bool = True, extra_forwards: int = 0) -> float:
    """The FLOPs one token costs in the step that actually runs.

    A fully trained model costs 6 N (forward 2 N, backward 2 N for the activations' and 2 N for the weights'
    gradients) plus causal attention (12 L T H D halved for the mask: forward 4, backward 8). With only
    `trainable_params` trained (LoRA, a frozen trunk), the frozen weights get no weight-gradient matmuls: 4 N + 2
    trainable. `extra_forwards` counts gradient-free passes per token (DPO's reference with the adapters off).
    """
    n = matmul_params(cfg, head=head)
    attention_forward = 4 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim / 2
    weight_grads = 2 * n if trainable_params is None else 2 * trainable_params
    return 4 * n + weight_grads + 3 * attention_forward + extra_forwards * (2 * n + attention_forward)


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float | None,
        num_chips: int = 1) -> float | None:
    if peak_flops is None:
        return None
    return flops_per_token * tokens_per_second / (peak_flops * num_chips)
