"""Log-likelihood of continuations given contexts: what a PPL inferencer scores multiple-choice options with.

Two scoring rules, named after the harnesses that use them (spec §8.2):
- "lm_eval": the sum of the continuation's token log-probabilities, highest wins (`acc`); `acc_norm` divides by
  the continuation's length in characters. The context and continuation are tokenized as lm-eval does (trailing
  spaces of the context move to the continuation, the pair is encoded whole and split after the context's tokens).
- "opencompass": the mean per-token loss over the whole sequence (context and option), lowest wins.

Pairs are scored in batches of similar length (sorted, padded to a few lengths), with the vocabulary-sized logits
made one chunk of positions at a time (`decode.scoring.score_tokens`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from internlm2_jax.decode.scoring import padded_length, score_tokens

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


def score_pairs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_tokens: int = 16384,
                progress: bool = False, desc: str = "scoring") -> list[PairScore]:
    """Scores (context ids, continuation ids) pairs; `batch_tokens` bounds padded tokens per forward."""
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: the context and the continuation need at least one token each")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[PairScore | None] = [None] * len(pairs)
    bar = tqdm(total=len(pairs), desc=desc, unit="pair", disable=not progress)
    start = 0
    while start < len(order):
        longest = len(pairs[order[start]][0]) + len(pairs[order[start]][1])
        size = padded_length(longest)
        rows = max(1, batch_tokens // size)
        batch = order[start:start + rows]
        sequences = [list(pairs[i][0]) + list(pairs[i][1]) for i in batch]
        for i, seq, (chosen, top_ids, _) in zip(batch, sequences, score_tokens(model, sequences, top_n=1),
                                                strict=True):
            n = len(pairs[i][1])
            cont_logprobs, cont_argmax = chosen[-n:], top_ids[-n:, 0]
            out[i] = PairScore(float(cont_logprobs.sum()), bool(np.all(cont_argmax == np.asarray(seq[-n:]))), n,
                               float(-chosen.mean()))
        start += len(batch)
        bar.update(len(batch))
    bar.close()
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
