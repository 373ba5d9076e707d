"""How each of our parameters maps to HF tensors, in the InternLM2 layout (fused wqkv) and the Llama layout.

A `Mapping` ties one parameter of ours to one or more HF tensors: their names, the shapes they must have, and the two
pure numpy transforms between them. Everything else in `convert` is bookkeeping around this table.

Our kernels are input-major ([in, out]); HF Linear weights are [out, in]. The fused wqkv of spec §1.5 has HF rows
ordered (kv_head, slot, head_dim) with slots = the group's q heads, then k, then v; ours is the same reshaped to
[embed, kv_heads, q_per_kv + 2, head_dim], so splitting into Llama's q/k/v is slicing the slot axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from internlm2_jax.config import ModelConfig

Path = tuple  # a parameter path in our NNX state, e.g. ('model', 'layers', 3, 'attention', 'wqkv')


@dataclasses.dataclass(frozen=True)
class Mapping:
    ours: Path
    hf: tuple[str, ...]
    hf_shapes: Callable[[ModelConfig], tuple[tuple[int, ...], ...]]
    to_ours: Callable[[ModelConfig, list[np.ndarray]], np.ndarray]
    to_hf: Callable[[ModelConfig, np.ndarray], list[np.ndarray]]


def _same(cfg, xs):
    return xs[0]


def _same_hf(cfg, x):
    return [x]


def _transposed(cfg, xs):
    return xs[0].T


def _transposed_hf(cfg, x):
    return [x.T]


def _vector(ours: Path, hf: str, size: Callable[[ModelConfig], int]) -> Mapping:
    return Mapping(ours, (hf,), lambda c: ((size(c),),), _same, _same_hf)


def _linear(ours: Path, hf: str, out_in: Callable[[ModelConfig], tuple[int, int]]) -> Mapping:
    return Mapping(ours, (hf,), lambda c: (out_in(c),), _transposed, _transposed_hf)


def _qkv_rows(c: ModelConfig) -> int:
    return c.num_key_value_heads * (c.q_per_kv + 2) * c.head_dim


# ---- fused wqkv <-> HF ---------------------------------------------------------------------------------------

def _fused_to_ours(c, xs):
    return xs[0].T.reshape(c.hidden_size, c.num_key_value_heads, c.q_per_kv + 2, c.head_dim)


def _fused_to_hf(c, x):
    return [x.reshape(c.hidden_size, -1).T]


def _fused_bias_to_ours(c, xs):
    return xs[0].reshape(c.num_key_value_heads, c.q_per_kv + 2, c.head_dim)


def _fused_bias_to_hf(c, x):
    return [x.reshape(-1)]


def _split_to_ours(c, xs):
    """Llama q_proj, k_proj, v_proj ([out, in]) -> our fused [embed, kv_heads, slots, head_dim]."""
    q, k, v = xs
    h, kv, g, d = c.hidden_size, c.num_key_value_heads, c.q_per_kv, c.head_dim
    return np.concatenate([q.T.reshape(h, kv, g, d), k.T.reshape(h, kv, 1, d), v.T.reshape(h, kv, 1, d)], axis=2)


def _split_to_hf(c, x):
    h, g = c.hidden_size, c.q_per_kv
    return [x[:, :, :g].reshape(h, -1).T, x[:, :, g].reshape(h, -1).T, x[:, :, g + 1].reshape(h, -1).T]


def _split_bias_to_ours(c, xs):
    q, k, v = xs
    kv, g, d = c.num_key_value_heads, c.q_per_kv, c.head_dim
    return np.concatenate([q.reshape(kv, g, d), k.reshape(kv, 1, d), v.reshape(kv, 1, d)], axis=1)


def _split_bias_to_hf(c, x):
    g = c.q_per_kv
    return [x[:, :g].reshape(-1), x[:, g].reshape(-1), x[:, g + 1].reshape(-1)]


def _wo_to_ours(c, xs):
    return xs[0].T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size)


def _wo_to_hf(c, x):
    return [x.reshape(-1, c.hidden_size).T]


def split_wqkv(c: ModelConfig, fused_hf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF InternLM2 `wqkv.weight` [(kv*(q_per_kv+2)*d), hidden] -> Llama (q_proj, k_proj, v_proj), each [out, in]."""
    q, k, v = _split_to_hf(c, _fused_to_ours(c, [fused_hf]))
    return q, k, v


def pack_wqkv(c: ModelConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The inverse of `split_wqkv`."""
    return _fused_to_hf(c, _split_to_ours(c, [q, k, v]))[0]


# ---- the two layouts -------------------------------------------------------------------------------------------

def layer_mappings(c: ModelConfig, layout: str) -> list[Mapping]:
    """Mappings within one decoder layer; `ours` paths and HF names are relative to the layer."""
    h, i = c.hidden_size, c.intermediate_size
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    if layout == "internlm2":
        names = dict(attn_norm="attention_norm.weight", ffn_norm="ffn_norm.weight", wo="attention.wo.weight",
                     wo_bias="attention.wo.bias", w1="feed_forward.w1.weight", w3="feed_forward.w3.weight",
                     w2="feed_forward.w2.weight")
        qkv = Mapping(("attention", "wqkv"), ("attention.wqkv.weight",), lambda c: ((_qkv_rows(c), h),),
                      _fused_to_ours, _fused_to_hf)
        qkv_bias = Mapping(("attention", "wqkv_bias"), ("attention.wqkv.bias",), lambda c: ((_qkv_rows(c),),),
                           _fused_bias_to_ours, _fused_bias_to_hf)
    else:
        names = dict(attn_norm="input_layernorm.weight", ffn_norm="post_attention_layernorm.weight",
                     wo="self_attn.o_proj.weight", wo_bias="self_attn.o_proj.bias", w1="mlp.gate_proj.weight",
                     w3="mlp.up_proj.weight", w2="mlp.down_proj.weight")
        qkv = Mapping(("attention", "wqkv"),
                      ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                      lambda c: ((q_out, h), (kv_out, h), (kv_out, h)), _split_to_ours, _split_to_hf)
        qkv_bias = Mapping(("attention", "wqkv_bias"),
                           ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                           lambda c: ((q_out,), (kv_out,), (kv_out,)), _split_bias_to_ours, _split_bias_to_hf)
    out = [
        _vector(("attention_norm", "weight"), names["attn_norm"], lambda c: h),
        _vector(("ffn_norm", "weight"), names["ffn_norm"], lambda c: h),
        qkv,
        Mapping(("attention", "wo"), (names["wo"],), lambda c: ((h, q_out),), _wo_to_ours, _wo_to_hf),
        _linear(("feed_forward", "w1"), names["w1"], lambda c: (i, h)),
        _linear(("feed_forward", "w3"), names["w3"], lambda c: (i, h)),
        _linear(("feed_forward", "w2"), names["w2"], lambda c: (h, i)),
    ]
    if c.bias:
        out += [qkv_bias, _vector(("attention", "wo_bias"), names["wo_bias"], lambda c: h)]
    return out


def top_mappings(c: ModelConfig, layout: str, *, reward: bool) -> list[Mapping]:
    """Mappings outside the decoder layers."""
    llama = layout == "llama"
    out = [
        Mapping(("model", "tok_embeddings"), ("model.embed_tokens.weight" if llama else "model.tok_embeddings.weight",),
                lambda c: ((c.vocab_size, c.hidden_size),), _same, _same_hf),
        _vector(("model", "norm", "weight"), "model.norm.weight", lambda c: c.hidden_size),
    ]
    if reward:
        out.append(_linear(("v_head",), "score.weight" if llama else "v_head.weight", lambda c: (1, c.hidden_size)))
    elif not c.tie_word_embeddings:
        out.append(_linear(("output",), "lm_head.weight" if llama else "output.weight",
                           lambda c: (c.vocab_size, c.hidden_size)))
    return out


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


# HF tensors that are derived buffers, not parameters: present in some older checkpoints, never needed.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
