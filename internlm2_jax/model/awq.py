"""AWQ calibration for int4 weights (issue 23): activation-aware per-input-channel scales, folded into the float model
where the fold is an exact identity for InternLM2, then a search of each group's clipping range.

The result is a FLOAT model: rounding its projections to int4 (`round_to_int4`, or `Int4Weight`s) is the AWQ model,
and rounding the original model's is the round-to-nearest (RTN) baseline. Per decoder layer, as AutoAWQ's
`AwqQuantizer.quantize` does (casper-hansen/AutoAWQ awq/quantize/quantizer.py):

1. The layer's inputs are the previous layer's outputs computed with its float weights before scaling and clipping
   (AutoAWQ's `_get_input_feat`), so every layer is calibrated on the float model's own hidden states.
2. Scales are searched per fold group on the original float weights, then folded all at once:
   `attention_norm -> [wqkv]` (loss on the attention block's output), `ffn_norm -> [w1, w3]` (the feed-forward
   output) and `w3 -> [w2]` (w2's output; w3's output columns divided, w2's input rows multiplied), which are
   LMDeploy's InternLM2 maps (lmdeploy/lite/quantization/awq.py). There is no `wqkv -> wo` fold: under GQA and the
   grouped wqkv layout the V rows are not wo's inputs (AutoAWQ's InternLM2 map divides "the last rows" of wqkv), and
   never `w1 -> w2`: w1 is the gate, seen through SiLU.
3. The clipping range of each (group, output) of wo, w1, w3 and w2 is searched on the scaled weights and inputs
   (AutoAWQ's `_compute_best_clip`; wqkv is skipped: its query and key errors pass through q.k).

A candidate's loss is the inspected module's output MSE with each scaled weight replaced by Q(W s) / s (`Q`: int4
round to nearest, `int4.fake_quantize`). The grid is AutoAWQ's ratios r = i / n_grid plus s = 1 (plain RTN), so a
group's calibration loss is never worse than RTN by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from internlm2_jax.model.int4 import fake_quantize
from internlm2_jax.model.layers import dense, rotary_tables
from internlm2_jax.model.lora import EQUATIONS
from internlm2_jax.model.quantize import INT4_PROJECTIONS, QUANTIZED

PROJECTIONS = INT4_PROJECTIONS  # the decoder projections int4 quantizes (the head stays float)
_MODULE = {"wqkv": "attention", "wo": "attention", "w1": "feed_forward", "w3": "feed_forward", "w2": "feed_forward"}
CLIPPED = ("wo", "w1", "w3", "w2")
MAX_SHRINK = 0.5  # AutoAWQ: ranges down to half the group's absmax, in steps of 1 / n_grid
_CLIP_COLUMNS = 256  # outputs searched at once (AutoAWQ's oc_batch_size): [tokens, groups, columns] per step


@dataclasses.dataclass(frozen=True)
class Fold:
    """Scales s divide `source`'s output channels and multiply the input rows of `scaled`; the search measures the
    output of `inspect` ("attention", "feed_forward" or a projection's name)."""

    source: str  # "attention_norm", "ffn_norm" (their weights) or "w3" (its output columns)
    scaled: tuple[str, ...]
    inspect: str

    @property
    def name(self) -> str:
        return f"{self.source} -> {', '.join(self.scaled)}"


FOLDS = (Fold("attention_norm", ("wqkv",), "attention"), Fold("ffn_norm", ("w1", "w3"), "feed_forward"),
         Fold("w3", ("w2",), "w2"))
_FOLD = {fold.source: fold for fold in FOLDS}


@dataclasses.dataclass(frozen=True)
class FoldSearch:
    layer: int
    fold: str  # Fold.name
    ratio: float | None  # the chosen r of s = x^r / w^(1-r); None: s = 1 (plain RTN) had the least loss
    rtn_loss: float  # output MSE on the calibration tokens with the weights rounded as they are
    awq_loss: float  # ... with the chosen scales (<= rtn_loss)


@dataclasses.dataclass
class AWQReport:
    searches: list[FoldSearch]
    scales: dict[tuple[int, str], np.ndarray]  # (layer, Fold.source) -> s [in], what `apply_scales` folds
    clipped: dict[tuple[int, str], float]  # (layer, projection) -> fraction of (group, output) ranges shrunk

    def table(self) -> str:
        lines = ["layer | fold | ratio | loss RTN | loss AWQ", "---|---|---|---|---"]
        lines += [f"{s.layer} | {s.fold} | {'s=1' if s.ratio is None else f'{s.ratio:.2f}'} | {s.rtn_loss:.4g} | "
                  f"{s.awq_loss:.4g}" for s in self.searches]
        return "\n".join(lines)


# ---- checks ------------------------------------------------------------------------------------------------------

def _input_size(cfg, name: str) -> tuple[int, str]:
    """A projection's number of inputs (its flattened contracted dimensions) and what they are."""
    if name == "wo":
        return cfg.num_attention_heads * cfg.head_dim, "heads x head_dim"
    if name == "w2":
        return cfg.intermediate_size, "intermediate_size"
    return cfg.hidden_size, "hidden_size"


def check_group(cfg, group: int) -> None:
    """A ValueError naming each projection whose inputs `group` does not divide (int4 groups run along them)."""
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or group % 2:
        raise ValueError(f"the int4 group must be a positive even integer (two codes per byte), not {group!r}")
    bad = [f"{name} [{n} inputs = {what}]" for name in PROJECTIONS
           for n, what in [_input_size(cfg, name)] if n % group]
    if bad:
        sizes = sorted({_input_size(cfg, name)[0] for name in PROJECTIONS})
        fits = [g for g in (128, 64, 32, 16) if all(n % g == 0 for n in sizes)]
        hint = f"; group {fits[0]} divides them all" if fits else ""
        raise ValueError(f"the int4 group {group} does not divide the inputs of {', '.join(bad)}{hint}")


def _check_model(model) -> None:
    cfg = model.cfg
    if cfg.lora is not None:
        raise ValueError("awq: the model has LoRA adapters; merge them first (model.lora.merge_lora)")
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path and path[-1] in PROJECTIONS:
            value = var.get_value()
            if not (isinstance(value, jax.Array | np.ndarray) and jnp.issubdtype(value.dtype, jnp.floating)):
                raise ValueError(f"awq calibrates float weights; {'/'.join(map(str, path))} is a "
                                 f"{type(value).__name__}")


def _check_batches(batches, vocab_size: int) -> list[np.ndarray]:
    out = []
    for i, batch in enumerate(batches):
        ids = np.asarray(batch)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
            raise ValueError(f"calibration batch {i}: expected non-empty token ids [batch, length], got "
                             f"{ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"calibration batch {i}: token ids must be in [0, {vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        out.append(ids.astype(np.int32))
    if not out:
        raise ValueError("awq_calibrate needs at least one calibration batch of token ids")
    return out


# ---- one decoder layer -------------------------------------------------------------------------------------------

def _copy(graphdef, state):
    """A layer module of its own: `nnx.merge` without copy shares the state's Variables, so setting a weight of
    the merged module would change `state` (and, under jit, leak a tracer into it)."""
    return nnx.merge(graphdef, state, copy=True)


def _param(layer, name: str) -> nnx.Param:
    if name in _MODULE:
        return getattr(getattr(layer, _MODULE[name]), name)
    return getattr(layer, name).weight  # a norm


def _matrix(w: jax.Array, name: str) -> jax.Array:
    """A projection as its fp32 [in, out] matrix (contracted dimensions flattened first)."""
    n_in = math.prod(w.shape[:QUANTIZED[name]])
    return w.astype(jnp.float32).reshape(n_in, -1)


def _set_matrix(param: nnx.Param, matrix: jax.Array) -> None:
    param[...] = matrix.reshape(param.shape).astype(param.dtype)


def _projection_input(module, name: str, call):
    """The input of `module`'s projection `name` as `call(module)` computes it: the projection is linear, so the
    module with that weight replaced by the identity (and no bias after it) returns exactly its input. This reads
    the input off the model's own code instead of restating the attention or the SwiGLU here."""
    param = getattr(module, name)
    n_in = math.prod(param.shape[:QUANTIZED[name]])
    param.set_value(jnp.eye(n_in, dtype=param.dtype).reshape(*param.shape[:QUANTIZED[name]], n_in))
    bias = getattr(module, f"{name}_bias", None)
    if bias is not None:
        bias.set_value(jnp.zeros((n_in,), bias.dtype))
    return call(module)


def layer_inputs(graphdef, state, h, rope) -> dict[str, jax.Array]:
    """Each projection's input [batch, length, ...] when the float layer runs on hidden states h."""
    layer = nnx.merge(graphdef, state)
    attn_in = layer.attention_norm(h)
    ffn_in = layer.ffn_norm(h + layer.attention(attn_in, *rope))
    wo_in = _projection_input(_copy(graphdef, state).attention, "wo", lambda a: a(attn_in, *rope))
    wo_in = wo_in.reshape(*wo_in.shape[:2], *layer.attention.wo.shape[:2])  # [batch, length, heads, head_dim]
    w2_in = _projection_input(_copy(graphdef, state).feed_forward, "w2", lambda f: f(ffn_in))
    return {"wqkv": attn_in, "wo": wo_in, "w1": ffn_in, "w3": ffn_in, "w2": w2_in}


def _inspect(layer, fold: Fold, x: Mapping[str, jax.Array], rope) -> jax.Array:
    if fold.inspect == "attention":
        return layer.attention(x["wqkv"], *rope)
    if fold.inspect == "feed_forward":
        return layer.feed_forward(x["w1"])
    return dense(EQUATIONS[fold.inspect], x[fold.inspect], _param(layer, fold.inspect)[...],
                 layer.feed_forward.cfg.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _statistics(graphdef, state, h, rope):
    """(sum of |input| per channel of each fold's scaled projections, the float layer's output)."""
    x = layer_inputs(graphdef, state, h, rope)
    sums = {fold.source: jnp.sum(jnp.abs(x[fold.scaled[0]].astype(jnp.float32)), axis=(0, 1)) for fold in FOLDS}
    return sums, nnx.merge(graphdef, state)(h, *rope)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fold_errors(graphdef, fold: Fold, group: int, state, h, rope, candidates):
    """Sum of squared errors [candidates] of the inspected output with each scaled weight as Q(W s) / s."""
    x = layer_inputs(graphdef, state, h, rope)
    reference = _inspect(nnx.merge(graphdef, state), fold, x, rope).astype(jnp.float32)

    def error(s):
        trial = _copy(graphdef, state)
        for name in fold.scaled:
            param = _param(trial, name)
            _set_matrix(param, fake_quantize(_matrix(param[...], name) * s[:, None], group) / s[:, None])
        return jnp.sum(jnp.square(_inspect(trial, fold, x, rope).astype(jnp.float32) - reference))

    return jax.lax.map(error, candidates)


@functools.partial(jax.jit, static_argnums=0)
def _clip_rows(graphdef, state, h, rope, rows):
    """The inputs [len(rows), in] of the clipped projections at flattened token indices `rows` of this batch."""
    x = layer_inputs(graphdef, state, h, rope)
    return {name: x[name].reshape(-1, math.prod(x[name].shape[2:]))[rows] for name in CLIPPED}


def weight_means(matrices: list[jax.Array], group: int) -> jax.Array:
    """AutoAWQ's w_mean [in]: |w| over its group's absmax (groups of `group` inputs per output), averaged over the
    outputs of every matrix [in, out] of the fold."""
    w = jnp.abs(jnp.concatenate(matrices, axis=1))
    groups = w.reshape(w.shape[0] // group, group, -1)
    return (groups / (groups.max(axis=1, keepdims=True) + 1e-6)).reshape(w.shape).mean(axis=1)


def candidate_scales(x_mean: jax.Array, w_mean: jax.Array, n_grid: int, duo_scaling: bool,
                     keep: jax.Array | None = None) -> jax.Array:
    """[1 + n_grid, in] scales: s = 1 (RTN) first, then AutoAWQ's grid r = i / n_grid (`ratios`),
    s = x^r / (w^(1-r) + 1e-4) (or x^r without duo scaling), clamped at 1e-4 and normalised by sqrt(max * min).
    Channels where `keep` is True get s = 1 in every candidate (a norm weight of 0: LMDeploy's guard against the
    NaN its FAQ reports)."""
    r = jnp.arange(n_grid, dtype=jnp.float32)[:, None] / n_grid
    x_mean, w_mean = x_mean.astype(jnp.float32), w_mean.astype(jnp.float32)
    s = x_mean ** r / (w_mean ** (1 - r) + 1e-4) if duo_scaling else x_mean ** r
    s = jnp.maximum(s, 1e-4)
    s = s / jnp.sqrt(s.max(axis=1, keepdims=True) * s.min(axis=1, keepdims=True))
    s = jnp.where(jnp.isfinite(s), s, 1.0)
    if keep is not None:
        s = jnp.where(keep, 1.0, s)
    return jnp.concatenate([jnp.ones_like(s[:1]), s])


def ratios(n_grid: int) -> list[float | None]:
    """The ratio r of each of `candidate_scales`' rows (None: s = 1)."""
    return [None] + [i / n_grid for i in range(n_grid)]


def fold_scales(layer, scales: Mapping[str, jax.Array]) -> None:
    """Folds per-channel scales into one decoder layer in place, keyed by `Fold.source`: s divides the source's
    output channels (a norm's weight, or w3's output columns) and multiplies the scaled projections' input rows,
    which leaves the layer's function unchanged."""
    for source, s in scales.items():
        fold = _FOLD[source]
        s = jnp.asarray(s, jnp.float32)
        if source == "w3":
            param = _param(layer, "w3")
            _set_matrix(param, _matrix(param[...], "w3") / s[None, :])
        else:
            param = _param(layer, source)
            param[...] = (param[...].astype(jnp.float32) / s).astype(param.dtype)
        for name in fold.scaled:
            param = _param(layer, name)
            _set_matrix(param, _matrix(param[...], name) * s[:, None])


def best_clip(w: jax.Array, x: jax.Array, group: int, n_grid: int = 20) -> jax.Array:
    """AutoAWQ's `_compute_best_clip` for an [in, out] weight and inputs x [tokens, in]: per (group, output), the
    range max_val = absmax * (1 - i / n_grid), i < MAX_SHRINK * n_grid, whose int4 rounding of clip(w, +-max_val)
    gives the least MSE of the group's partial outputs. Returns max_val [in / group, out] (i = 0: not clipped)."""
    n_in, n_out = w.shape
    columns = math.gcd(n_out, _CLIP_COLUMNS)
    xg = x.astype(jnp.float32).reshape(x.shape[0], n_in // group, group)
    blocks = jnp.moveaxis(w.astype(jnp.float32).reshape(n_in, n_out // columns, columns), 1, 0)
    shrink = 1 - jnp.arange(int(MAX_SHRINK * n_grid), dtype=jnp.float32) / n_grid

    def search(block):  # [in, columns]
        wg = block.reshape(n_in // group, group, columns)
        reference = jnp.einsum("tgk,gkc->tgc", xg, wg)
        absmax = jnp.abs(wg).max(axis=1)

        def step(carry, factor):
            best, best_err = carry
            max_val = absmax * factor
            clipped = jnp.clip(wg, -max_val[:, None], max_val[:, None]).reshape(n_in, columns)
            q = fake_quantize(clipped, group).reshape(wg.shape)
            err = jnp.mean(jnp.square(jnp.einsum("tgk,gkc->tgc", xg, q) - reference), axis=0)
            return (jnp.where(err < best_err, max_val, best), jnp.minimum(err, best_err)), None

        (best, _), _ = jax.lax.scan(step, (absmax, jnp.full_like(absmax, jnp.inf)), shrink)
        return best

    return jnp.moveaxis(jax.lax.map(search, blocks), 0, 1).reshape(n_in // group, n_out)


def _clip(w: jax.Array, max_val: jax.Array, group: int) -> jax.Array:
    groups = w.reshape(max_val.shape[0], group, -1)
    return jnp.clip(groups, -max_val[:, None], max_val[:, None]).reshape(w.shape)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _candidates(graphdef, group: int, n_grid: int, duo_scaling: bool, state, x_means):
    """Each fold's candidate scales [1 + n_grid, in] from its inputs' mean |x| per channel."""
    layer = nnx.merge(graphdef, state)
    out = {}
    for fold in FOLDS:
        w_mean = weight_means([_matrix(_param(layer, name)[...], name) for name in fold.scaled], group)
        keep = None if fold.source == "w3" else _param(layer, fold.source)[...] == 0
        out[fold.source] = candidate_scales(x_means[fold.source], w_mean, n_grid, duo_scaling, keep)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _folded(graphdef, state, scales):
    layer = _copy(graphdef, state)
    fold_scales(layer, scales)
    return nnx.state(layer)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _clipped(graphdef, group: int, n_grid: int, state, inputs):
    """(the layer with wo, w1, w3 and w2 clipped to their best ranges on `inputs` {name: [tokens, in]}, the fraction
    of each one's (group, output) ranges that shrank)."""
    layer = _copy(graphdef, state)
    shrunk = {}
    for name in CLIPPED:
        param = _param(layer, name)
        w = _matrix(param[...], name)
        max_val = best_clip(w, inputs[name], group, n_grid)
        _set_matrix(param, _clip(w, max_val, group))
        shrunk[name] = jnp.mean(max_val < jnp.abs(w.reshape(max_val.shape[0], group, -1)).max(axis=1))
    return nnx.state(layer), shrunk


@functools.partial(jax.jit, static_argnums=0)
def _embedded(cfg, table, ids):
    """A batch's hidden states entering layer 0 and its rotary tables, positions and segment ids (one document per
    row from position 0)."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    segments = jnp.ones(ids.shape, jnp.int32)
    return jnp.take(table, ids, axis=0).astype(cfg.dtype), (*rotary_tables(cfg, positions, segments), positions,
                                                             segments)


# ---- the trunk's layers, stacked for scan or not -------------------------------------------------------------------

def _layer_states(trunk) -> tuple[nnx.GraphDef, list[nnx.State]]:
    if trunk.cfg.scan_layers:
        graphdef, stacked = nnx.split(trunk.layers)
        return graphdef, [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(trunk.cfg.num_hidden_layers)]
    splits = [nnx.split(layer) for layer in trunk.layers]
    return splits[0][0], [state for _, state in splits]


def _write_layers(trunk, states: list[nnx.State]) -> None:
    if trunk.cfg.scan_layers:
        nnx.update(trunk.layers, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    else:
        for layer, state in zip(trunk.layers, states, strict=True):
            nnx.update(layer, state)


def apply_scales(model, scales: Mapping[tuple[int, str], jax.Array]):
    """A copy of `model` with per-channel scales {(layer, Fold.source): s [in]} folded in (no quantization): the
    same function up to float rounding. `AWQReport.scales` is such a mapping."""
    layers = model.cfg.num_hidden_layers
    for layer, source in scales:
        if source not in _FOLD or not 0 <= layer < layers:
            raise ValueError(f"no fold {source!r} in layer {layer}: folds are {sorted(_FOLD)} in layers "
                             f"0..{layers - 1}")
    model = nnx.clone(model)
    graphdef, states = _layer_states(model.model)
    for i, state in enumerate(states):
        states[i] = _folded(graphdef, state, {source: s for (index, source), s in scales.items() if index == i})
    _write_layers(model.model, states)
    return model


def round_to_int4(model, group: int = 128):
    """A float copy of `model` with every decoder projection rounded to its int4 grid (round to nearest, groups of
    `group` inputs) and back: what the int4 model computes, in float. The head and embeddings stay as they are,
    as AutoAWQ and LMDeploy keep them."""
    check_group(model.cfg, group)
    model = nnx.clone(model)
    leading = 1 if model.cfg.scan_layers else 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path and path[-1] in PROJECTIONS:
            var.set_value(_rounded(var.get_value(), QUANTIZED[path[-1]], leading, group))
    return model


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _rounded(w: jax.Array, contracted: int, leading: int, group: int) -> jax.Array:
    matrix = w.astype(jnp.float32).reshape(*w.shape[:leading], math.prod(w.shape[leading:leading + contracted]), -1)
    return fake_quantize(matrix, group).reshape(w.shape).astype(w.dtype)


# ---- calibration -------------------------------------------------------------------------------------------------

def _clip_indices(sizes: list[int], clip_tokens: int) -> list[np.ndarray]:
    """Per batch, the flattened token indices of an even stride over all calibration tokens, at most
    `clip_tokens` of them (AutoAWQ strides over all its tokens to about 512)."""
    step = -(-sum(sizes) // clip_tokens)
    picked, start = [], 0
    for size in sizes:
        picked.append(np.arange((-start) % step, size, step))
        start += size
    return picked


def awq_calibrate(model, batches: Iterable, *, group: int = 128, n_grid: int = 20, duo_scaling: bool = True,
                  clip: bool = True, clip_tokens: int = 512, progress: bool = True):
    """(a float copy of `model` with AWQ's searched scales folded and clipping applied, an `AWQReport`).

    `batches`: calibration token ids, arrays [batch, length] (each row one segment from position 0). Round to
    nearest int4 of the returned model, in groups of `group` inputs, is the AWQ int4 model. The input is untouched.
    """
    cfg = model.cfg
    check_group(cfg, group)
    if n_grid < 1 or clip_tokens < 1:
        raise ValueError(f"awq: n_grid and clip_tokens must be >= 1, got {n_grid} and {clip_tokens}")
    _check_model(model)
    batches = _check_batches(batches, cfg.vocab_size)
    model = nnx.clone(model)
    table = model.model.tok_embeddings[...]
    hidden, ropes = zip(*(_embedded(cfg, table, ids) for ids in batches), strict=True)
    rows = _clip_indices([ids.size for ids in batches], clip_tokens)
    tokens = sum(ids.size for ids in batches)
    graphdef, states = _layer_states(model.model)
    report = AWQReport([], {}, {})
    for i in tqdm(range(cfg.num_hidden_layers), desc="AWQ", unit="layer", disable=not progress):
        state = states[i]
        sums, outputs = {}, []
        for h, rope in zip(hidden, ropes, strict=True):
            batch_sums, out = _statistics(graphdef, state, h, rope)
            sums = {k: sums.get(k, 0) + v for k, v in batch_sums.items()}
            outputs.append(out)
        candidates = _candidates(graphdef, group, n_grid, duo_scaling, state,
                                 {k: v / tokens for k, v in sums.items()})
        chosen = {}
        for fold in FOLDS:
            errors = sum(_fold_errors(graphdef, fold, group, state, h, rope, candidates[fold.source])
                         for h, rope in zip(hidden, ropes, strict=True))
            # Every inspected output (attention block, feed-forward, w2) is a [tokens, hidden] residual update.
            losses = np.asarray(errors) / (tokens * cfg.hidden_size)
            best = int(np.argmin(losses))
            chosen[fold.source] = candidates[fold.source][best]
            report.searches.append(FoldSearch(i, fold.name, ratios(n_grid)[best], float(losses[0]),
                                              float(losses[best])))
            report.scales[(i, fold.source)] = np.asarray(chosen[fold.source])
        state = _folded(graphdef, state, chosen)
        if clip:
            picked = [_clip_rows(graphdef, state, h, rope, r) for h, rope, r in zip(hidden, ropes, rows, strict=True)]
            inputs = {name: jnp.concatenate([p[name] for p in picked]) for name in CLIPPED}
            state, shrunk = _clipped(graphdef, group, n_grid, state, inputs)
            report.clipped.update({(i, name): float(v) for name, v in shrunk.items()})
        states[i] = state
        hidden = outputs  # the float layer's outputs, as AutoAWQ feeds the next layer
    _write_layers(model.model, states)
    return model, report
