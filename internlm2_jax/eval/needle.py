"""Needle in a haystack: a fact hidden at depths 0-100% of filler text of growing length, then asked for.

For each (length, depth) the prompt is `length` tokens of filler with the needle sentence inserted at that fraction
of it (at a token boundary), followed by the question and the start of the answer; the model continues greedily and
the cell scores 1 when the continuation contains the hidden number. Lengths may go beyond the model's
`max_position_embeddings` (dynamic NTK then stretches RoPE). `plot_heatmap` draws the length x depth grid.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

from etils import epath

from internlm2_jax.eval.generation import complete

NEEDLE = " The secret number is {number}. "
QUESTION = "\nWhat is the secret number? The secret number is"


def haystack_prompt(tokenizer, filler: str, length: int, depth: float, number: int) -> list[int]:
    """BOS + `length` tokens of filler (repeated as needed) with the needle at `depth`, then the question."""
    filler_ids = tokenizer.encode(filler, allow_special=False)
    if not filler_ids:
        raise ValueError("the filler text encodes to no tokens")
    needle = tokenizer.encode(NEEDLE.format(number=number), allow_special=False)
    question = tokenizer.encode(QUESTION, allow_special=False)
    body = length - len(needle) - len(question) - 1
    if body < 1:
        raise ValueError(f"a haystack of {length} tokens has no room for filler around the needle and the question "
                         f"({len(needle) + len(question) + 1} tokens)")
    hay = (filler_ids * (body // len(filler_ids) + 1))[:body]
    at = round(depth * body)
    return [tokenizer.bos_id] + hay[:at] + needle + hay[at:] + question


def needle_sweep(model, tokenizer, filler: str, *, lengths: Sequence[int], depths: Sequence[float], seed: int = 0,
                 max_new_tokens: int = 8, progress: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    cells = [(length, depth, rng.randrange(1000, 10000)) for length in lengths for depth in depths]
    prompts = [haystack_prompt(tokenizer, filler, length, depth, number) for length, depth, number in cells]
    outputs = complete(model, tokenizer, prompts, (tokenizer.eos_id,), max_new_tokens=max_new_tokens,
                       progress=progress)
    grid = [[0.0] * len(depths) for _ in lengths]
    for (length, depth, number), output in zip(cells, outputs, strict=True):
        grid[list(lengths).index(length)][list(depths).index(depth)] = float(str(number) in output)
    return {"task": "needle", "prompt_hash": f"s{seed}", "mode": "gen", "lengths": list(lengths),
            "depths": list(depths), "grid": grid, "retrieval": sum(map(sum, grid)) / len(cells),
            "prompt_tokens": [len(p) for p in prompts], "outputs": outputs}


def plot_heatmap(result: dict[str, Any], path: str | os.PathLike, *,
                 max_position_embeddings: int | None = None) -> epath.Path:
    """The length x depth retrieval grid as a PNG (green found, red missed), with a line where the lengths cross
    `max_position_embeddings`."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch under a notebook

    lengths, depths = result["lengths"], result["depths"]
    fig = Figure(figsize=(1.2 + 0.5 * len(lengths), 1.2 + 0.4 * len(depths)))
    ax = fig.subplots()
    grid = [[result["grid"][i][j] for i in range(len(lengths))] for j in range(len(depths))]
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    if max_position_embeddings is not None and any(n > max_position_embeddings for n in lengths):
        beyond = next(i for i, n in enumerate(lengths) if n > max_position_embeddings)
        ax.axvline(beyond - 0.5, color="black", linestyle="--", linewidth=1)
    ax.set_title(f"needle retrieval {result['retrieval']:.0%}")
    fig.tight_layout()
    path = epath.Path(path)
    with path.open("wb") as f:  # through epath: the output directory may be a bucket
        fig.savefig(f, format="png", dpi=100)
    return path
