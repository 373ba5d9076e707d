"""What a request's client sees as its tokens arrive: when a sequence stops (a stop id, a stop string, its length),
the `Event` each new token makes, and the `Completion` a request's events add up to.

Streamed text only grows: what a stop string completed later could still cut, and a half-decoded character, are
held back until they are settled, so a streaming client never has to take text back.
"""

from __future__ import annotations

import time

from internlm2_jax.decode.generate import Completion
from internlm2_jax.decode.requests import Event
from internlm2_jax.decode.scheduler import Sequence


def append_token(seq: Sequence, token: int, logprob: float, top: dict[int, float], *, tokenizer,
                 max_model_len: int) -> Event:
    """Adds a generated token to `seq` and returns the event to send (`finished` when the sequence stops)."""
    request = seq.request
    seq.tokens.append(token)
    seq.generated.append(token)
    seq.logprobs.append(logprob)
    seq.top_logprobs.append(top)
    if seq.first_token_time is None:
        seq.first_token_time = time.monotonic()
    reason = None
    if token in request.stop_ids:
        reason = "stop"
    elif len(seq.generated) >= request.max_new_tokens or len(seq.tokens) >= max_model_len:
        reason = "length"
    text = ""
    if tokenizer is not None:
        text = tokenizer.decode(seq.generated, skip_special_tokens=request.skip_special_tokens)
        found = [i for i in (text.find(s) for s in request.stop_strings) if i >= 0]
        if found:
            text, reason = text[:min(found)], "stop"
    if reason is None:
        hold = max(map(len, request.stop_strings), default=1) - 1
        visible = text[:len(text) - hold].rstrip("\ufffd")
        text = visible if visible.startswith(seq.sent_text) else seq.sent_text
    event = Event(seq.request_id, seq.generated[seq.sent_tokens:], seq.logprobs[seq.sent_tokens:],
                  seq.top_logprobs[seq.sent_tokens:], text, finished=reason is not None, finish_reason=reason)
    if seq.prompt_scores is not None and seq.sent_tokens == 0:
        event.prompt_logprobs, event.prompt_top_logprobs = seq.prompt_scores
    seq.sent_tokens, seq.sent_text = len(seq.generated), text
    return event


def completion_from_events(events: list[Event]) -> Completion:
    """The `Completion` a request's events add up to; an error event raises."""
    last = events[-1]
    if last.error is not None:
        raise RuntimeError(last.error)
    tokens = [t for e in events for t in e.tokens]
    return Completion(tokens, [lp for e in events for lp in e.logprobs],
                      [top for e in events for top in e.top_logprobs], last.finish_reason, last.text)
