"""Model FLOPs utilisation as the conventions define it, and the peaks it is measured against."""

from __future__ import annotations

from internlm2_jax.config import ModelConfig

# Dense bf16 matmul peaks per chip (FLOP/s). CPU figures were measured on the 2-core CI machines (platform notes).
PEAK_FLOPS = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "tpu_v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "cpu_bf16": 340e9,
    "cpu_f32": 200e9,
}


def matmul_params(cfg: ModelConfig) -> int:
    """N of the conventions: every matmul parameter, the output head included; the input embedding is a gather."""
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    if cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size  # the tied matrix still does the output matmul
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    return n - norms


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N for the matmuls (forward + backward) plus causal attention: 12 L T H D halved for the mask."""
    attention = 12 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim / 2
    return 6 * matmul_params(cfg) + attention


def mfu(cfg: ModelConfig, seq_len: int, tokens_per_second: float, peak_flops: float, num_chips: int = 1) -> float:
    return train_flops_per_token(cfg, seq_len) * tokens_per_second / (peak_flops * num_chips)
