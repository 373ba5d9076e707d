"""Log-likelihood of continuations given contexts: what a PPL inferencer scores multiple-choice options with.

Two scoring rules, named after the harnesses that use them (spec §8.2):
- "lm_eval": the sum of the continuation's token log-probabilities, highest wins (`acc`); `acc_norm` divides by
  the continuation's length in characters. The context and continuation are tokenized as lm-eval does (trailing
  spaces of the context move to the continuation, the pair is encoded whole and split after the context's tokens).
- "opencompass": the mean per-token loss over the whole sequence (context and option), lowest wins.

Pairs are scored in batches of similar length (sorted, padded to a few lengths), with the vocabulary-sized logits
made one chunk of positions at a time. The options of one question share their context: it is computed once and
each option scored on its cached K/V (`decode.scoring.score_shared_prefix`), about options-times fewer tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from internlm2_jax.decode.scoring import padded_length, score_shared_prefix, score_tokens, shares_prefix_exactly

RULES = ("lm_eval", "opencompass")


@dataclasses.dataclass(frozen=True)
class PairScore:
    logprob: float  # sum of the continuation's token log-probs
    greedy: bool  # every continuation token is the model's argmax
    tokens: int  # continuation tokens
    mean_loss: float  # mean negative log-prob over every predicted token of context + continuation


def encode_pair(tokenizer, context: str, continuation: str, *, bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval's causal models tokenize a pair."""
    if not context and not bos:
        raise ValueError("an empty context needs bos=True (something must predict the first token)")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix = [tokenizer.bos_id] if bos else []
    whole = prefix + tokenizer.encode(context + continuation, allow_special=False)
    context_ids = prefix + (tokenizer.encode(context, allow_special=False) if context else [])
    return context_ids, whole[len(context_ids):]


def _pair_score(sequence: Sequence[int], n: int, chosen: np.ndarray, top_ids: np.ndarray) -> PairScore:
    """From the log-probs of tokens 1.. of context + continuation, with `n` continuation tokens."""
    return PairScore(float(chosen[-n:].sum()), bool(np.all(top_ids[-n:, 0] == np.asarray(sequence[-n:]))), n,
                     float(-chosen.mean()))


def score_pairs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_tokens: int = 16384,
                progress: bool = False, desc: str = "scoring") -> list[PairScore]:
    """Scores (context ids, continuation ids) pairs; `batch_tokens` bounds padded tokens per forward. Pairs that
    share their context (a question's options) compute it once when that gives the same numbers
    (`shares_prefix_exactly`), otherwise each pair is one sequence."""
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: the context and the continuation need at least one token each")
    longest = max((len(c) + len(x) for c, x in pairs), default=0)
    cfg = getattr(model, "cfg", None)
    bar = tqdm(total=len(pairs), desc=desc, unit="pair", disable=not progress)
    if cfg is not None and shares_prefix_exactly(cfg, longest):
        out = _score_grouped(model, pairs, batch_tokens, bar)
    else:
        out = _score_one_by_one(model, pairs, batch_tokens, bar)
    bar.close()
    return out


def _score_one_by_one(model, pairs, batch_tokens: int, bar) -> list[PairScore]:
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[PairScore | None] = [None] * len(pairs)
    start = 0
    while start < len(order):
        size = padded_length(len(pairs[order[start]][0]) + len(pairs[order[start]][1]))
        batch = order[start:start + max(1, batch_tokens // size)]
        sequences = [list(pairs[i][0]) + list(pairs[i][1]) for i in batch]
        for i, seq, (chosen, top_ids, _) in zip(batch, sequences, score_tokens(model, sequences, top_n=1),
                                                strict=True):
            out[i] = _pair_score(seq, len(pairs[i][1]), chosen, top_ids)
        start += len(batch)
        bar.update(len(batch))
    return out  # type: ignore[return-value]


def _score_grouped(model, pairs, batch_tokens: int, bar) -> list[PairScore]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context), []).append(i)
    keys = sorted(groups, key=len, reverse=True)
    options = 1 << (max(len(members) for members in groups.values()) - 1).bit_length()
    width = max(len(x) for _, x in pairs)
    out: list[PairScore | None] = [None] * len(pairs)
    start = 0
    while start < len(keys):
        rows = max(1, batch_tokens // (options * (len(keys[start]) + width)))
        rows = 1 << (rows.bit_length() - 1)  # powers of two: the last, partial batch is padded to the same shape
        batch = keys[start:start + rows]
        batch_groups = [(list(key), [list(pairs[i][1]) for i in groups[key]]) for key in batch]
        filler = ([1], [[1]] * options)
        scored = score_shared_prefix(model, batch_groups + [filler] * (rows - len(batch)), top_n=1)
        for key, results in zip(batch, scored, strict=False):
            for i, (chosen, top_ids, _) in zip(groups[key], results, strict=True):
                out[i] = _pair_score(list(pairs[i][0]) + list(pairs[i][1]), len(pairs[i][1]), chosen, top_ids)
            bar.update(len(groups[key]))
        start += len(batch)
    return out  # type: ignore[return-value]


def choose(scores: Sequence[PairScore], rule: str, continuations: Sequence[str] | None = None) -> int:
    """The index of the winning option under `rule`; with `continuations` (their text), lm-eval's `acc_norm`."""
    if rule == "lm_eval":
        values = [s.logprob / (len(c) if continuations else 1)
                  for s, c in zip(scores, continuations or [None] * len(scores), strict=True)]
        return int(np.argmax(values))
    if rule == "opencompass":
        return int(np.argmin([s.mean_loss for s in scores]))
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
