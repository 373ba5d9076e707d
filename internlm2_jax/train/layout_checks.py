"""Refuse layouts that would run, but silently waste every chip: a batch that does not split over the data axes
(activations replicated, the attention kernel run on the whole batch everywhere), rows or heads that do not split
over `sequence`, and parameters a mesh leaves fully replicated beyond a tolerance."""

from __future__ import annotations

import logging
import math

from flax import nnx
from jax.sharding import Mesh

from internlm2_jax.config import ModelConfig
from internlm2_jax.model.context_parallel import kv_repeats
from internlm2_jax.parallel import replicated_parameters
from internlm2_jax.parallel.sequence_layout import sequence_layout

log = logging.getLogger("internlm2_jax.layout")


class LayoutError(ValueError):
    """The run's shapes do not fit its mesh; the message names the fields to change."""


def replicated_fraction(params: nnx.State, shardings: nnx.State) -> tuple[float, list[str]]:
    """(share of all parameter elements left fully replicated, their paths), on a multi-device mesh."""
    replicated = replicated_parameters(params, shardings, min_size=0)
    sizes = {"/".join(map(str, p)): math.prod(v.shape) for p, v in nnx.to_flat_state(params)}
    total = sum(sizes.values())
    return (sum(sizes[p] for p in replicated) / total if total else 0.0), replicated


def check_sequence_split(model: ModelConfig, seq_len: int, shape: dict[str, int]) -> None:
    """Rows and heads must split over mesh.sequence the way `model.context_parallel` cuts them."""
    shards = shape.get("sequence", 1)
    if shards == 1:
        return
    try:
        sequence_layout(model.context_parallel, shape).check_length(seq_len)
        if model.context_parallel == "ulysses":
            # as attention splits them: kv heads (with their query groups) over `tensor` when they divide
            kv_heads = model.num_key_value_heads
            ways = shape.get("tensor", 1) if kv_heads % shape.get("tensor", 1) == 0 else 1
            kv_repeats(model.num_attention_heads // ways, kv_heads // ways, shards)
    except ValueError as error:
        raise LayoutError(f"model.context_parallel={model.context_parallel!r}: {error}") from None


def check_layout(model: ModelConfig, train, step, mesh: Mesh, params: nnx.State, shardings: nnx.State) -> None:
    """Raises LayoutError naming the fields; logs the replicated parameters (`train`: TrainConfig, `step`:
    StepConfig; `params`: abstract parameters, `shardings`: theirs)."""
    shape = dict(mesh.shape)
    check_sequence_split(model, train.seq_len, shape)
    ways = shape.get("data", 1) * shape.get("fsdp", 1)
    rows = train.batch_size // step.micro_batches
    if train.batch_size % step.micro_batches or rows % ways:
        raise LayoutError(f"train.batch_size={train.batch_size} over step.micro_batches={step.micro_batches} gives "
                          f"micro-batches of {train.batch_size / step.micro_batches:g} rows, which do not split over "
                          f"mesh.data x mesh.fsdp = {shape.get('data', 1)} x {shape.get('fsdp', 1)} = {ways} "
                          "chips: change train.batch_size, step.micro_batches or the mesh (long rows: move chips "
                          "from mesh.fsdp to mesh.sequence, which splits each row instead)")
    if shape.get("fsdp", 1) * shape.get("tensor", 1) == 1:
        return  # pure data parallelism replicates the parameters by design
    fraction, replicated = replicated_fraction(params, shardings)
    large = [p for p in replicated if not p.endswith(("norm/weight", "norm/scale"))]
    if large:
        log.warning("parameters left fully replicated on mesh %s (%.1f%% of all): %s", shape, 100 * fraction,
                    ", ".join(large))
    if fraction > train.max_replicated_fraction:
        raise LayoutError(f"mesh {shape} leaves {100 * fraction:.1f}% of the parameters fully replicated on every "
                          f"chip (train.max_replicated_fraction={train.max_replicated_fraction}): "
                          f"{', '.join(large[:8])}{' ...' if len(large) > 8 else ''}. A dimension does not divide "
                          f"its mesh axis (model {model.hidden_size=}, {model.vocab_size=}, "
                          f"{model.num_key_value_heads=}); change the mesh, or raise the tolerance")
