"""What a caller hands the continuous-batching engine and what it gets back: `Request` in, a stream of `Event`s out.

The engine calls `on_event(event)` from its own thread: once per step that produced something for the request, and a
last time with `finished=True` (or `error` set). A request never ends silently: an internal failure is reported as
an `Event` with `error`, never as an empty completion.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from internlm2_jax.decode.sampling import SamplingConfig, check_banned_ids


class EngineFull(RuntimeError):
    """The engine's queue is full (the server answers 429)."""


class RequestRejected(ValueError):
    """A request the engine cannot serve as given (too long for `max_model_len`, bad settings): the message says
    which field and why (the server answers 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int  # 0: no generation (prompt log-probs only)
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    top_n: int = 0  # top log-probs reported per generated token
    prompt_logprobs: int | None = None  # None: none; n >= 0: each prompt token's log-prob and its top-n
    skip_special_tokens: bool = True  # for `Event.text`; False keeps control tokens (tool-call parsing)


@dataclasses.dataclass
class Event:
    request_id: int
    tokens: list[int]  # tokens generated since the previous event (a stop token included)
    logprobs: list[float]  # their log-probs under the model (before penalties and truncation)
    top_logprobs: list[dict[int, float]]  # per new token: the top-n ids and log-probs
    text: str  # the whole generated text so far, cut before a stop string when one matched
    finished: bool = False
    finish_reason: str | None = None  # "stop" (stop token or string), "length", "abort" (cancelled)
    error: str | None = None  # an internal failure: the request is finished and must be answered as an error
    # First event only, when the request asked for them: one entry per prompt token, None for the first.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


def check_request(request: Request, *, vocab_size: int, max_model_len: int, max_top_n: int,
                  has_tokenizer: bool) -> None:
    """Raises RequestRejected naming the field of `request` that an engine with these limits cannot serve."""
    prompt, limit = request.prompt_ids, max_model_len
    if not prompt:
        raise RequestRejected("prompt", "the prompt is empty")
    if not all(isinstance(t, int | np.integer) and 0 <= t < vocab_size for t in prompt):
        raise RequestRejected("prompt", f"token ids must be integers in [0, {vocab_size})")
    if request.max_new_tokens < 0:
        raise RequestRejected("max_tokens", f"must be >= 0, got {request.max_new_tokens}")
    if len(prompt) + request.max_new_tokens > limit:
        field = "prompt" if len(prompt) >= limit else "max_tokens"
        raise RequestRejected(field, f"the prompt has {len(prompt)} tokens and max_tokens is "
                                     f"{request.max_new_tokens}: {len(prompt) + request.max_new_tokens} is over "
                                     f"max_model_len={limit}")
    try:
        request.sampling.validate()
        check_banned_ids(request.sampling.banned_ids, vocab_size=vocab_size, stop_ids=request.stop_ids)
    except ValueError as e:
        raise RequestRejected(str(e).split(":")[0], str(e)) from None
    for name in ("top_n", "prompt_logprobs"):
        value = getattr(request, name)
        if value is not None and not 0 <= value <= max_top_n:
            raise RequestRejected(name, f"must be in [0, {max_top_n}], got {value}")
    if request.stop_strings and not has_tokenizer:
        raise RequestRejected("stop", "stop strings need the engine to have a tokenizer")
