"""The InternLM2 decoder (spec §1): attention with the fused wqkv, decoder layers, the trunk and its two heads.

Attribute names mirror the HF InternLM2 module tree (`tok_embeddings`, `attention.wqkv`, `feed_forward.w1`, ...), so
the checkpoint converter is a table, not a puzzle. Kernels are stored input-major (`x @ w`), the JAX convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internlm2_jax.config import ModelConfig
from internlm2_jax.model.attention import attention, chunked_prefill_attention
from internlm2_jax.model.context_parallel import sequence_shards
from internlm2_jax.model.kv_cache import SHARED_SEGMENT, KVCache, constrain_cache
from internlm2_jax.model.paged_cache import PagedKVCache
from internlm2_jax.model.quantize import Int8Weight, int8_dense
from internlm2_jax.model.layers import (
    DENSE_OUTPUT,
    RMSNorm,
    apply_rotary,
    constant_param,
    normal_param,
    rotary_tables,
)
from internlm2_jax.model.lora import EQUATIONS, lora_dense, make_adapter, quantize_base
from internlm2_jax.parallel.sharding import constrain

_policies = jax.checkpoint_policies
# On CPU the bf16 `dense` projections are custom_vjp calls that matmul policies do not see, so "dots" policies also
# save outputs tagged DENSE_OUTPUT: every projection output, as plain dot_generals are saved elsewhere.
_REMAT_POLICIES = {
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots, _policies.save_only_these_names(DENSE_OUTPUT)),
    "dots_no_batch": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                                       _policies.save_only_these_names(DENSE_OUTPUT)),
}


class Attention(nnx.Module):
    """GQA with the fused `wqkv` stored as [embed, kv_heads, q_per_kv + 2, head_dim].

    That is HF's grouped row layout (spec §1.5) reshaped: for KV group g the slots hold its q_per_kv query heads,
    then its k head, then its v head. Tensor parallelism shards `kv_heads`, so each shard owns whole groups.
    """

    def __init__(self, cfg: ModelConfig, *, out_std: float, rngs: nnx.Rngs):
        h, kv, g, d = cfg.hidden_size, cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.wqkv = normal_param(rngs, (h, kv, g + 2, d), ("embed", "kv_heads", "qkv_group", "head_dim"),
                                 cfg.initializer_range, pdt)
        self.wo = normal_param(rngs, (kv * g, d, h), ("heads", "head_dim", "embed"), out_std, pdt)
        if cfg.bias:
            self.wqkv_bias = constant_param(0.0, (kv, g + 2, d), ("kv_heads", "qkv_group", "head_dim"), pdt)
            self.wo_bias = constant_param(0.0, (h,), ("embed",), pdt)
        self.wqkv_lora = make_adapter(cfg.lora, "wqkv", self.wqkv, rngs)
        self.wo_lora = make_adapter(cfg.lora, "wo", self.wo, rngs)

    def __call__(self, x, cos, sin, positions, segment_ids, cache=None, dropout_rng=None, fresh_cache=False):
        """Without `cache`: attention over this call's tokens. With `cache = (kv, layer)`, a `KVCache` (positions
        of this call already recorded) or a `PagedKVCache` (this step's page table set) and this layer's index:
        the new K/V are written to the cache in place, only this call's slots, and the queries attend over every
        cached token of their sequence; returns (out, kv). `fresh_cache`: the static cache held nothing before this
        call (a prefill from empty, segments 0/1 only). `dropout_rng` drives LoRA dropout (training only)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        rngs = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        qkv = lora_dense(EQUATIONS["wqkv"], x, self.wqkv[...], self.wqkv_lora, dtype, cfg.lora, rngs[0])
        if cfg.bias:
            qkv = qkv + self.wqkv_bias[...].astype(dtype)
        batch, seq = x.shape[:2]
        q = qkv[:, :, :, : cfg.q_per_kv].reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids,
                            kv_segment_ids=segment_ids, causal=True, impl=cfg.attention_impl,
                            gpu_flash_kernel=cfg.gpu_flash_kernel, context_parallel=cfg.context_parallel)
        elif isinstance(cache[0], PagedKVCache):
            kv, layer = cache
            kv = kv.write(layer, k, v, positions, segment_ids)
            out = chunked_prefill_attention(q, kv.k[layer], kv.v[layer], kv.page_table, kv.lengths,
                                            q_lengths=kv.q_lengths, impl=cfg.attention_impl, row_widths=kv.row_widths)
        elif fresh_cache:
            kv, layer = cache
            kv = kv.write_layer(layer, k, v)
            # Nothing was cached before these tokens, so attending over the cache is attending over them: the
            # model's own kernel (flash on TPU/GPU) runs instead of the XLA reference's fp32 scores over every slot
            # of the cache ([rows, heads, prompt, prompt + new tokens]: ~30 GiB/chip for a 7B rollout).
            out = attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids,
                            kv_segment_ids=segment_ids, causal=True, impl=cfg.attention_impl,
                            gpu_flash_kernel=cfg.gpu_flash_kernel)
        else:
            kv, layer = cache
            kv = kv.write_layer(layer, k, v)
            # The static cache is read whole by the XLA reference (head-major, so XLA folds the reference's own
            # transpose away); the paged engine has its own kernels. Segment 1 is the cache's shared prefix.
            out = attention(q, kv.k[layer].swapaxes(1, 2).astype(q.dtype), kv.v[layer].swapaxes(1, 2).astype(q.dtype),
                            q_positions=positions, kv_positions=kv.positions, q_segment_ids=segment_ids,
                            kv_segment_ids=kv.segments, causal=True, impl="xla", shared_segment=SHARED_SEGMENT)
        out = lora_dense(EQUATIONS["wo"], out, self.wo[...], self.wo_lora, dtype, cfg.lora, rngs[1])
        if cfg.bias:
            out = out + self.wo_bias[...].astype(dtype)
        return out if cache is None else (out, kv)


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down. Never biased (HF hard-codes bias=False)."""

    def __init__(self, cfg: ModelConfig, *, out_std: float, rngs: nnx.Rngs):
        h, i, pdt = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
        std = cfg.initializer_range
        self.cfg = cfg
        self.w1 = normal_param(rngs, (h, i), ("embed", "mlp"), std, pdt)
        self.w3 = normal_param(rngs, (h, i), ("embed", "mlp"), std, pdt)
        self.w2 = normal_param(rngs, (i, h), ("mlp", "embed"), out_std, pdt)
        for name in ("w1", "w3", "w2"):
            setattr(self, f"{name}_lora", make_adapter(cfg.lora, name, getattr(self, name), rngs))

    def __call__(self, x: jax.Array, dropout_rng=None) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        rngs = (None,) * 3 if dropout_rng is None else jax.random.split(dropout_rng, 3)
        gate = lora_dense(EQUATIONS["w1"], x, self.w1[...], self.w1_lora, dtype, cfg.lora, rngs[0])
        up = lora_dense(EQUATIONS["w3"], x, self.w3[...], self.w3_lora, dtype, cfg.lora, rngs[1])
        return lora_dense(EQUATIONS["w2"], jax.nn.silu(gate) * up, self.w2[...], self.w2_lora, dtype, cfg.lora,
                          rngs[2])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, layer_index: int, rngs: nnx.Rngs):
        # InternEvo's scaled init for the output projections: std / sqrt(2 * (layer_index + 1)), 1-based (spec §1.8).
        out_std = cfg.initializer_range / (2.0 * (layer_index + 1)) ** 0.5
        self.attention_norm = RMSNorm(cfg)
        self.attention = Attention(cfg, out_std=out_std, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg)
        self.feed_forward = FeedForward(cfg, out_std=out_std, rngs=rngs)

    def __call__(self, x, cos, sin, positions, segment_ids, cache=None, dropout_rng=None, fresh_cache=False):
        if cache is None:
            rngs = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
            h = x + self.attention(self.attention_norm(x), cos, sin, positions, segment_ids, dropout_rng=rngs[0])
            return h + self.feed_forward(self.ffn_norm(h), rngs[1])
        out, kv = self.attention(self.attention_norm(x), cos, sin, positions, segment_ids, cache,
                                 fresh_cache=fresh_cache)
        h = x + out
        return h + self.feed_forward(self.ffn_norm(h)), kv


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """All layers as one module whose parameters have a leading `layers` axis, for `jax.lax.scan`."""
    keys = jax.random.split(rngs.params(), cfg.num_hidden_layers)
    layers = nnx.vmap(lambda key: DecoderLayer(cfg, layer_index=0, rngs=nnx.Rngs(params=key)))(keys)
    # vmap created every layer with layer 0's output std; rescale to each layer's own (spec §1.8).
    scale = (1.0 / jnp.arange(1, cfg.num_hidden_layers + 1, dtype=jnp.float32)) ** 0.5
    for proj in (layers.attention.wo, layers.feed_forward.w2):
        proj[...] = proj[...] * scale.astype(proj.dtype).reshape(-1, *([1] * (proj.ndim - 1)))
    for _, var in nnx.iter_graph(layers):
        if isinstance(var, nnx.Param):
            var.set_metadata("logical_axes", ("layers", *var.get_metadata()["logical_axes"]))
    return layers


class InternLM2Model(nnx.Module):
    """Embedding, decoder layers, final norm: returns final hidden states [batch, seq, hidden] in compute dtype."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tok_embeddings = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                           cfg.initializer_range, jnp.dtype(cfg.param_dtype))
        if cfg.scan_layers:
            self.layers = _stacked_layers(cfg, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, layer_index=i, rngs=rngs)
                                    for i in range(cfg.num_hidden_layers)])
        if cfg.lora is not None and cfg.lora.quantize_base is not None:  # QLoRA: the frozen base in NF4
            quantize_base(self.layers, cfg)
        self.norm = RMSNorm(cfg)

    def __call__(self, input_ids, positions=None, segment_ids=None, cache: KVCache | PagedKVCache | None = None,
                 dropout_rng: jax.Array | None = None, fresh_cache: bool = False):
        """Final hidden states; with a cache, (hidden states, the cache with this call's tokens written). A
        `PagedKVCache` places the tokens itself (its step's lengths), so positions and segment ids are not given.
        `fresh_cache` (a static `KVCache` empty before this call, segment ids 0/1): attention runs over this call's
        tokens with the model's kernel, as without a cache, and the K/V are written to the cache.
        `dropout_rng` (training) drives LoRA dropout; without it the model is deterministic."""
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids, jnp.int32)
        rope_lengths = None
        if isinstance(cache, PagedKVCache):
            positions, segment_ids = cache.query_positions(input_ids.shape[1])
            rope_lengths = jnp.broadcast_to(cache.rope_lengths[:, None], input_ids.shape)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        positions, segment_ids = jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32)
        # The table's embedding dimension is sharded like every parameter (FSDP): gather it whole first, so each
        # chip looks up its own tokens; else XLA gathers every chip's token ids and looks up whole rows everywhere.
        table = constrain(self.tok_embeddings[...], ("vocab", None))
        x = constrain(jnp.take(table, input_ids, axis=0).astype(cfg.dtype), ("batch", "length", "embed"))
        cos, sin = rotary_tables(cfg, positions, segment_ids, rope_lengths)
        if cache is not None:
            if fresh_cache and not isinstance(cache, KVCache):
                raise ValueError("fresh_cache is for a static KVCache (the paged engine has its own prefill kernels)")
            return self._cached(x, cos, sin, positions, segment_ids, cache, fresh_cache)

        def run_layer(graphdef, state, x, key):
            x = nnx.merge(graphdef, state)(x, cos, sin, positions, segment_ids, dropout_rng=key)
            return constrain(x, ("batch", "length", "embed"))

        if cfg.remat != "none":
            # Under scan the loop boundary already stops XLA from merging the recomputation into the forward, so
            # the CSE barriers prevent_cse adds would only cost (jax.checkpoint docs); unrolled layers need them.
            run_layer = jax.checkpoint(run_layer, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(0,),
                                       prevent_cse=not cfg.scan_layers)
        keys = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_hidden_layers)
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)
            x, _ = jax.lax.scan(lambda h, xs: (run_layer(graphdef, xs[0], h, xs[1]), None), x, (state, keys))
        else:
            for i, layer in enumerate(self.layers):
                x = run_layer(*nnx.split(layer), x, None if keys is None else keys[i])
        return self.norm(x)

    def _cached(self, x, cos, sin, positions, segment_ids, cache: KVCache | PagedKVCache, fresh_cache: bool):
        # The whole cache rides in the loop carry and each layer writes its new slots in place: slicing it into
        # per-layer scan inputs and stacking outputs copied all of it every step (decode time grew with max_len).
        kv = cache.write(positions, segment_ids) if isinstance(cache, KVCache) else cache
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def step(carry, layer_state):
                h, kv, i = carry
                h, kv = nnx.merge(graphdef, layer_state)(h, cos, sin, positions, segment_ids, (kv, i),
                                                         fresh_cache=fresh_cache)
                return (h, kv, i + 1), None

            (x, kv, _), _ = jax.lax.scan(step, (x, kv, jnp.zeros((), jnp.int32)), state)
        else:
            for i, layer in enumerate(self.layers):
                x, kv = layer(x, cos, sin, positions, segment_ids, (kv, i), fresh_cache=fresh_cache)
        if isinstance(kv, KVCache):
            kv = kv.replace(cursor=kv.cursor + x.shape[1])
        return self.norm(x), constrain_cache(kv)


def token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, chunk_size: int = 1024,
                   temperature: float = 1.0) -> jax.Array:
    """log p(targets) [batch, seq] in fp32 from final hidden states and the [embed, vocab] head, the logits divided
    by `temperature` first (RL trains on the tempered distribution its rollouts sampled from, decode/rollout.py).

    Computed chunk by chunk over the sequence (each chunk rematerialised in the backward pass when there are several),
    so a [batch, seq, vocab] fp32 logits tensor never exists: one 32K row of 92,544 logits is 12 GB. Training,
    evaluation and serving all call this one function. Under mesh.sequence > 1 the chunks are cut inside each
    sequence shard, so every chip computes the logits of its own tokens only.
    """
    if isinstance(temperature, int | float) and not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    batch, seq, embed = hidden.shape
    shards = sequence_shards()
    if seq % shards:
        raise ValueError(f"token_logprobs over mesh.sequence={shards} needs the length to be a multiple of it, got "
                         f"{seq}")
    local = seq // shards
    chunk = min(chunk_size, local)
    pad = (-local) % chunk
    n = (local + pad) // chunk

    def chunked(x):  # [batch, seq, ...] -> [n, batch, shards, chunk, ...]
        x = x.reshape(batch, shards, local, *x.shape[2:])
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3))
        return jnp.moveaxis(x.reshape(batch, shards, n, chunk, *x.shape[3:]), 2, 0)

    hidden_chunks = constrain(chunked(hidden), (None, "batch", "length", None, "embed"))
    target_chunks = chunked(jnp.asarray(targets, jnp.int32))

    def one_chunk(args):
        h, t = args
        logits = jnp.einsum("bsce,ev->bscv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        logits = logits / temperature
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    # Remat keeps one chunk's logits alive at a time. With a single chunk that one is alive anyway, and recomputing
    # it would only add a fourth vocab-sized matmul (a few percent of the bench train step on CPU).
    if n > 1:
        one_chunk = jax.checkpoint(one_chunk)
    out = jax.lax.map(one_chunk, (hidden_chunks, target_chunks))  # [n, batch, shards, chunk]
    return jnp.moveaxis(out, 0, 2).reshape(batch, shards, n * chunk)[:, :, :local].reshape(batch, seq)


class InternLM2ForCausalLM(nnx.Module):
    """The causal LM: fp32 logits, or final hidden states for the chunked loss (`return_hidden=True`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = InternLM2Model(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.output = normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                       cfg.initializer_range, jnp.dtype(cfg.param_dtype))

    def head_weight(self) -> jax.Array:
        """The [embed, vocab] output matrix (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.model.tok_embeddings[...].T
        return self.output[...]

    def __call__(self, input_ids, positions=None, segment_ids=None, *, return_hidden: bool = False,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        hidden = self.model(input_ids, positions, segment_ids, dropout_rng=dropout_rng)
        return hidden if return_hidden else self.logits(hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [..., vocab] of hidden states [..., embed]."""
        head = self.head_weight()
        if isinstance(head, Int8Weight):
            return int8_dense(hidden, head, 1)
        return jnp.einsum("...e,ev->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def token_logprobs(self, hidden: jax.Array, targets: jax.Array, *, chunk_size: int = 1024,
                       temperature: float = 1.0) -> jax.Array:
        head = self.head_weight()
        if isinstance(head, Int8Weight):  # evaluation of a quantized model: the head in float, once
            head = head.dequantize(hidden.dtype)
        return token_logprobs(hidden, head, targets, chunk_size=chunk_size, temperature=temperature)


class InternLM2ForRewardModel(nnx.Module):
    """The same trunk with `v_head` (hidden -> 1, no bias): per-token scores [batch, seq] in fp32.

    The reward of a sample is the score at its last real token (`last_token_scores`), where the reward token
    (92527 in the released tokenizer) is appended by the data pipeline.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = InternLM2Model(cfg, rngs=rngs)
        self.v_head = normal_param(rngs, (cfg.hidden_size, 1), ("embed", None), cfg.initializer_range,
                                   jnp.dtype(cfg.param_dtype))

    def __call__(self, input_ids, positions=None, segment_ids=None, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        hidden = self.model(input_ids, positions, segment_ids, dropout_rng=dropout_rng)
        scores = jnp.einsum("bte,eo->bto", hidden, self.v_head[...].astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        return scores[..., 0]


def last_token_scores(scores: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[batch] score at each row's last non-padding token (segment id != 0), for right-padded rows."""
    real = jnp.asarray(segment_ids) != 0
    last = jnp.max(jnp.where(real, jnp.arange(real.shape[1]), -1), axis=1)
    return jnp.take_along_axis(scores, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]


def model_graphdef(cfg: ModelConfig, model_class=InternLM2ForCausalLM):
    """The static half of `nnx.split`, and the abstract parameters, without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(0))))
