"""Calibration text for post-training quantization (AWQ): `samples` rows of `seqlen` tokens, as AutoAWQ builds them
(each document `<s> text </s>`, concatenated, cut into rows). The default text is the training split of the Python
standard library corpus, never its held-out split, so held-out perplexity stays an honest measure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from etils import epath

from internlm2_jax.data.corpus import stdlib_corpus
from internlm2_jax.data.readers import BadRecord, JsonlReader


def calibration_texts(path: str | os.PathLike | None = None) -> list[str]:
    """Documents from `path` (.jsonl rows with a "text" field, or a plain .txt file as one document); None: the
    stdlib corpus' training split. A bad row (blank lines included) is a ValueError naming its line and why."""
    if path is None:
        return [doc.text for doc in stdlib_corpus("train")]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {path}: no such file")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    reader = JsonlReader(epath.Path(path))
    try:
        texts = []
        for i in range(len(reader)):
            text = reader.read(i)
            if isinstance(text, BadRecord):  # calibration text is small and chosen: nothing is skipped silently
                raise ValueError(f"calibration text {text.message()}")
            texts.append(text)
    finally:
        reader.close()
    if not texts:
        raise ValueError(f"{path}: no rows")
    return texts


def calibration_batches(texts: Iterable[str], tokenizer, *, samples: int = 128, seqlen: int = 512,
                        batch_size: int = 8) -> list[np.ndarray]:
    """`samples` rows of `seqlen` token ids from `texts`, in int32 batches of up to `batch_size` rows. Too little
    text is a ValueError giving the token count it had and needed."""
    if samples < 1 or seqlen < 2 or batch_size < 1:
        raise ValueError(f"calibration needs samples >= 1, seqlen >= 2 and batch_size >= 1, got {samples}, {seqlen} "
                         f"and {batch_size}")
    needed, ids = samples * seqlen, []
    for text in texts:
        ids += [tokenizer.bos_id, *tokenizer.encode(text, allow_special=False), tokenizer.eos_id]
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise ValueError(f"the calibration text has {len(ids):,} tokens; {samples} samples of {seqlen} need "
                         f"{needed:,} (give more text, or fewer --samples / a shorter --seqlen)")
    rows = np.asarray(ids[:needed], np.int32).reshape(samples, seqlen)
    return [rows[i:i + batch_size] for i in range(0, samples, batch_size)]
