"""InternLM2 tokenizer: SentencePiece with special-token splitting, training, and HF export.

Public API: `Tokenizer` (`from_file`, `from_pretrained`, `save_pretrained`, `encode`, `decode`, special ids by
name), `train_tokenizer`, and the special-token names (`IM_START`, ..., `REWARD`).
"""

from internlm2_jax.tokenizer.special_tokens import (
    ACTION_END,
    ACTION_START,
    BOS,
    EOS,
    IM_END,
    IM_START,
    INTERPRETER,
    PLUGIN,
    REWARD,
    UNK,
)
from internlm2_jax.tokenizer.tokenizer import Tokenizer
from internlm2_jax.tokenizer.train import train_tokenizer

__all__ = [
    "ACTION_END",
    "ACTION_START",
    "BOS",
    "EOS",
    "IM_END",
    "IM_START",
    "INTERPRETER",
    "PLUGIN",
    "REWARD",
    "UNK",
    "Tokenizer",
    "train_tokenizer",
]
