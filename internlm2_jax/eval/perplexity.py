"""Perplexity and bits per byte on held-out text.

Each text is encoded as `<s> text </s>` (how pretraining documents look, conventions) and cut into windows of
`window` tokens scored independently (no overlap, so every token is predicted once; tokens at the start of a window
see less context than a sliding window would give them, which a reader comparing with strided numbers must know).
Bits per byte divide the total negative log-likelihood in bits by the UTF-8 bytes of the texts, so tokenizers with
different vocabularies compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from internlm2_jax.decode.scoring import score_tokens


def perplexity(model, tokenizer, texts: Sequence[str], *, window: int = 1024, batch: int = 8,
               progress: bool = False, name: str = "perplexity") -> dict[str, Any]:
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    pieces = []
    for text in texts:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True, allow_special=False)
        pieces += [ids[i:i + window] for i in range(0, len(ids) - 1, window - 1) if len(ids[i:i + window]) > 1]
    if not pieces:
        raise ValueError("no text to score")
    nll, tokens = 0.0, 0
    pieces.sort(key=len, reverse=True)  # similar lengths share a padded batch
    for start in tqdm(range(0, len(pieces), batch), desc=name, unit="batch", disable=not progress):
        for chosen, _, _ in score_tokens(model, pieces[start:start + batch]):
            nll -= float(chosen.sum())
            tokens += len(chosen)
    size = sum(len(t.encode("utf-8")) for t in texts)
    return {"task": name, "prompt_hash": f"w{window}", "mode": "ppl", "tokens": tokens, "bytes": size,
            "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / size}
