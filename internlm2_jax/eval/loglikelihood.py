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

from internlm2_jax.decode.scoring import (
    PREFIX_MULTIPLE,
    padded_length,
    score_shared_prefix,
    score_tokens,
    shares_prefix_exactly,
)

RULES = ("lm_eval", "opencompass")


@dataclasses.dataclass(frozen=True)
class PairScore:
    logprob: float  # sum of the continuation's token log-probs
    greedy: bool  # every continuation token is the model's argmax
    tokens: int  # continuation tokens
    # Mean negative log-prob over every predicted token of context + continuation (OpenCompass's rule); None when
    # not asked for (`context_loss=False`), which spares the context's vocabulary projection.
    mean_loss: float | None


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


def _pair_score(continuation: Sequence[int], chosen: np.ndarray, top_ids: np.ndarray, context_loss: bool) -> PairScore:
    """From the log-probs (and top-1 ids) of tokens 1.. of context + continuation, or of the continuation alone
    when not `context_loss`."""
    n = len(continuation)
    return PairScore(float(chosen[-n:].sum()), bool(np.all(top_ids[-n:, 0] == np.asarray(continuation))), n,
                     float(-chosen.mean()) if context_loss else None)


def score_pairs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_tokens: int = 16384,
                context_loss: bool = True, progress: bool = False, desc: str = "scoring") -> list[PairScore]:
    """Scores (context ids, continuation ids) pairs; `batch_tokens` bounds padded tokens per forward. Pairs that
    share their context (a question's options) compute it once when that gives the same numbers
    (`shares_prefix_exactly`), otherwise each pair is one sequence. `context_loss=False` leaves `mean_loss` None
    (lm-eval's rule needs only the continuation's log-probs)."""
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: the context and the continuation need at least one token each")
    longest = max((len(c) + len(x) for c, x in pairs), default=0)
    cfg = getattr(model, "cfg", None)
    bar = tqdm(total=len(pairs), desc=desc, unit="pair", disable=not progress)
    if cfg is not None and shares_prefix_exactly(cfg, longest):
        out = _score_grouped(model, pairs, batch_tokens, bar, context_loss)
    else:
        out = _score_one_by_one(model, pairs, batch_tokens, bar, context_loss)
    bar.close()
    return out


def _score_one_by_one(model, pairs, batch_tokens: int, bar, context_loss: bool) -> list[PairScore]:
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[PairScore | None] = [None] * len(pairs)
    start = 0
    while start < len(order):
        size = padded_length(len(pairs[order[start]][0]) + len(pairs[order[start]][1]))
        batch = order[start:start + max(1, batch_tokens // size)]
        sequences = [list(pairs[i][0]) + list(pairs[i][1]) for i in batch]
        for i, (chosen, top_ids, _) in zip(batch, score_tokens(model, sequences, top_n=1), strict=True):
            out[i] = _pair_score(pairs[i][1], chosen, top_ids, context_loss)
        start += len(batch)
        bar.update(len(batch))
    return out  # type: ignore[return-value]


def _score_grouped(model, pairs, batch_tokens: int, bar, context_loss: bool) -> list[PairScore]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context), []).append(i)
    option_tokens = {key: sum(len(pairs[i][1]) for i in members) for key, members in groups.items()}
    # Longest contexts first; among those padded to the same length, longest options first, so a batch's option row
    # is padded to its own longest rather than the task's.
    keys = sorted(groups, key=lambda key: (-(-len(key) // PREFIX_MULTIPLE), option_tokens[key]),
                  reverse=True)
    out: list[PairScore | None] = [None] * len(pairs)
    start = 0
    while start < len(keys):
        rows = max(1, batch_tokens // (len(keys[start]) + option_tokens[keys[start]]))
        # Powers of two, the last batch's as small as it can be: few shapes, little filler computed.
        rows = min(1 << (rows.bit_length() - 1), 1 << (len(keys) - start - 1).bit_length())
        batch = keys[start:start + rows]
        batch_groups = [(list(key), [list(pairs[i][1]) for i in groups[key]]) for key in batch]
        scored = score_shared_prefix(model, batch_groups + [([1], [[1]])] * (rows - len(batch)), top_n=1,
                                     with_prefix=context_loss)
        for key, results in zip(batch, scored, strict=False):
            for i, (chosen, top_ids, _) in zip(groups[key], results, strict=True):
                out[i] = _pair_score(pairs[i][1], chosen, top_ids, context_loss)
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
        if any(s.mean_loss is None for s in scores):
            raise ValueError("the opencompass rule needs each pair's mean_loss: score with context_loss=True")
        return int(np.argmin([s.mean_loss for s in scores]))
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
