"""The continuous-batching engine: requests join and leave a running batch at every step, over a paged KV cache.

Each `step()` runs at most two jitted calls of one function (`engine_step`): a chunked prefill for sequences with
prompt tokens still to cache (up to `max_prefill_rows` rows and `prefill_chunk` padded tokens), and one decode token
for every sequence that is generating. Both sample on device with each row's own settings; the host appends tokens,
checks stop ids, stop strings and lengths, sends `Event`s and frees finished sequences' pages. Shapes are padded to
a few sizes (decode rows to multiples of 4, prefill rows and chunks to powers of two, page-table widths to powers
of four, and, where decoding gathers pages with XLA, a decode batch's groups of rows to two stepped width
profiles), so the engine runs a bounded set of programs, all compiled by `warmup()`, never one per request.

Memory is an absolute budget (`kv_budget_tokens` or `kv_budget_gb`), split into pages. A request is admitted when
its whole prompt fits (its shared prefix pages from the prefix cache cost nothing) with a page of headroom per
running sequence; decoding takes a page at a time, and when none is left the newest sequence is preempted: its pages
are freed and it waits at the head of the queue to be recomputed (prompt and generated tokens) when pages allow.
Sampling keys depend on each request's seed and token index only, so a request's output does not depend on what it
was batched with or on preemption (greedy: up to matmul rounding, the conventions' tolerance rule).

Use it synchronously (`engine.generate(requests)`, or `submit` + `step`) or from a server (`start()` runs the loop
in a background thread; `submit` and `cancel` are thread-safe; events arrive on the engine's thread).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from internlm2_jax.decode.generate import Completion
from internlm2_jax.decode.engine_step import (jitted_engine_step, key_data, set_penalty_row, stack_sampling,
                                              uses_penalties)
from internlm2_jax.decode.requests import EngineFull, Event, Request, RequestRejected
from internlm2_jax.decode.scheduler import PagePool, Sequence
from internlm2_jax.decode.scoring import score_tokens
from internlm2_jax.model.attention import decode_reads_pages_in_place
from internlm2_jax.model.paged_cache import init_paged_cache, pages_for_budget

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048  # prompt + generated tokens per sequence (independent of max_position_embeddings)
    kv_budget_tokens: int | None = 65536  # the KV cache size, absolute: tokens ...
    kv_budget_gb: float | None = None  # ... or GB (set kv_budget_tokens=None)
    page_size: int = 16
    max_running: int = 32  # sequences in the running batch
    max_waiting: int = 256  # queued requests beyond those; more are refused (EngineFull)
    prefill_chunk: int = 256  # prompt tokens per prefill call at most, rows x chunk (a power of two)
    max_prefill_rows: int = 4  # sequences per prefill call at most (a power of two)
    cache_dtype: str | None = None  # default: the model's compute dtype
    prefix_caching: bool = True
    max_top_n: int = 20

    def validate(self) -> None:
        checks = {"max_model_len": self.max_model_len >= 2, "page_size": self.page_size >= 1,
                  "max_running": self.max_running >= 1, "max_waiting": self.max_waiting >= 0,
                  "prefill_chunk": self.prefill_chunk >= 8 and self.prefill_chunk & (self.prefill_chunk - 1) == 0,
                  "max_prefill_rows": _pow2(self.max_prefill_rows) == self.max_prefill_rows,
                  "max_top_n": 0 <= self.max_top_n <= 100}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"EngineConfig.{name}: invalid value {getattr(self, name)!r}")


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _ladder(top: int, floor: int = 1) -> list[int]:
    """top, top/4, top/16, ... down to `floor`: the few sizes a dimension is padded to (a coarse ladder keeps the
    number of compiled programs small enough to compile them all at start-up)."""
    sizes = [top]
    while sizes[-1] // 4 >= floor:
        sizes.append(sizes[-1] // 4)
    return sizes[::-1]


def _powers(low: int, high: int) -> list[int]:
    """The powers of two from `low` to `high` (both powers of two)."""
    return [1 << i for i in range(low.bit_length() - 1, high.bit_length())]


def _fit(n: int, sizes: list[int]) -> int:
    return next(size for size in sizes if size >= n)


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig()):
        config.validate()
        self.graphdef, self.params = model if isinstance(model, tuple) else nnx.split(model)
        self._step = jitted_engine_step(self.graphdef)
        self.model_config = nnx.merge(self.graphdef, self.params).cfg
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = config.max_model_len
        page_size = config.page_size
        num_pages = pages_for_budget(self.model_config, page_size, tokens=config.kv_budget_tokens,
                                     gigabytes=config.kv_budget_gb, dtype=config.cache_dtype)
        if (num_pages - 1) * page_size < config.max_model_len:
            raise ValueError(f"the KV budget holds {(num_pages - 1) * page_size} tokens, less than one sequence of "
                             f"max_model_len={config.max_model_len}; raise the budget or lower max_model_len")
        self.pool = PagePool(num_pages, page_size, prefix_caching=config.prefix_caching)
        self.cache = init_paged_cache(self.model_config, num_pages, page_size, config.cache_dtype)
        vocab = self.model_config.vocab_size
        self.counts = jnp.zeros((config.max_running + 1, vocab), jnp.int32)  # the last row is padding rows' scratch
        self.seen = jnp.zeros((config.max_running + 1, vocab), bool)
        self._free_slots = list(range(config.max_running))[::-1]
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._inbox: list[Sequence] = []
        self._cancels: set[int] = set()
        self._outstanding = 0
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._admissions = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.shapes: set[tuple] = set()  # (rows, chunk, page-table width, row widths) of every program run
        # The padded sizes: decode rows 1, 2, then multiples of 4 (a padded row costs as much as a real one:
        # against multiples of 8, 8% less engine time on the serving benchmark); prefill (rows, chunk) pairs of
        # powers of two within prefill_chunk tokens; page-table widths on a ladder of powers of four.
        rows = sorted({1, 2} | set(range(4, config.max_running + 4, 4)))
        self._decode_rows = [r for r in rows if r < config.max_running] + [_fit(config.max_running, rows)]
        smallest = min(16, config.prefill_chunk)
        self._prefill_shapes = [(rows, chunk) for rows in _powers(1, config.max_prefill_rows)
                                for chunk in _powers(smallest, config.prefill_chunk // rows) if chunk >= smallest]
        self._widths = _ladder(_pow2(-(-config.max_model_len // page_size)))
        # The CPU decode kernel reads each row's pages in place up to its length, so a decode step costs the same
        # at any page-table width: then decode runs at the widest only and needs no row profiles (a third of the
        # programs to compile). The XLA gather reads whole widths, hence the ladder and the profiles below.
        self.decode_reads_pages_in_place = decode_reads_pages_in_place(
            self.model_config.attention_impl, self.model_config.dtype, config.cache_dtype or self.model_config.dtype)
        self._decode_widths = self._widths[-1:] if self.decode_reads_pages_in_place else self._widths
        # A decode batch of >= 16 rows at the widest page table, its rows sorted by length, may also run as four
        # groups whose widths step down (`row_widths`), so the XLA back end gathers about the pages the rows hold:
        # staircases of eighths of the width, (8, 6, 4, 2) or else (8, 8, 6, 4), whichever fits first. On the
        # benchmark trace they cut the pages gathered by a third at two extra programs per row count.
        top = self._widths[-1]
        self._row_profiles = [tuple(top * e // 8 for e in eighths) for eighths in ((8, 6, 4, 2), (8, 8, 6, 4))
                              ] if top >= 8 and not self.decode_reads_pages_in_place else []
        # Every key exists from the start: `stats()` reads them from another thread, and a dict must not grow
        # while it is being read.
        self.counters = collections.Counter(dict.fromkeys(
            ("model_calls", "generated_tokens", "finished", "preemptions", "prefix_cache_hit_tokens",
             "prefill_seconds", "prefill_tokens", "prefill_padded_tokens", "decode_seconds", "decode_tokens",
             "decode_padded_tokens"), 0))
        self._pad_key = key_data(0)

    # ---- the caller's side (thread-safe) ---------------------------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> int:
        """Queues `request`; `on_event` gets its events (on the engine's thread when it runs in the background).
        Raises RequestRejected naming the bad field, or EngineFull when the queue is full."""
        self._check(request)
        seed_key = key_data(request.sampling.seed)
        with self._wake:
            if self._outstanding >= self.config.max_running + self.config.max_waiting:
                raise EngineFull(f"{self._outstanding} requests are running or queued (max_running="
                                 f"{self.config.max_running} + max_waiting={self.config.max_waiting})")
            seq = Sequence(next(self._ids), request, on_event, seed_key, time.monotonic(),
                           tokens=list(request.prompt_ids))
            self._outstanding += 1
            self._inbox.append(seq)
            self._wake.notify()
        return seq.request_id

    def cancel(self, request_id: int) -> None:
        """Ends a request (its pages are freed at the next step); its last event has finish_reason "abort"."""
        with self._wake:
            self._cancels.add(request_id)
            self._wake.notify()

    def _check(self, request: Request) -> None:
        prompt, limit = request.prompt_ids, self.max_model_len
        if not prompt:
            raise RequestRejected("prompt", "the prompt is empty")
        if not all(isinstance(t, int | np.integer) and 0 <= t < self.model_config.vocab_size for t in prompt):
            raise RequestRejected("prompt", f"token ids must be integers in [0, {self.model_config.vocab_size})")
        if request.max_new_tokens < 0:
            raise RequestRejected("max_tokens", f"must be >= 0, got {request.max_new_tokens}")
        if len(prompt) + request.max_new_tokens > limit:
            field = "prompt" if len(prompt) >= limit else "max_tokens"
            raise RequestRejected(field, f"the prompt has {len(prompt)} tokens and max_tokens is "
                                         f"{request.max_new_tokens}: {len(prompt) + request.max_new_tokens} is over "
                                         f"max_model_len={limit}")
        try:
            request.sampling.validate()
        except ValueError as e:
            raise RequestRejected(str(e).split(":")[0], str(e)) from None
        for name in ("top_n", "prompt_logprobs"):
            value = getattr(request, name)
            if value is not None and not 0 <= value <= self.config.max_top_n:
                raise RequestRejected(name, f"must be in [0, {self.config.max_top_n}], got {value}")
        if request.stop_strings and self.tokenizer is None:
            raise RequestRejected("stop", "stop strings need the engine to have a tokenizer")

    # ---- the loop ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Runs the loop in a background thread (for a server)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the background loop; every unfinished request ends with an error event."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._take_inbox()
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, error="the engine was shut down")

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._cancels or self._running or self._waiting):
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    @property
    def idle(self) -> bool:
        with self._wake:
            return not (self._inbox or self._running or self._waiting)

    def step(self) -> bool:
        """One scheduling round: admit, one chunked-prefill call, one decode call. False when there was nothing to
        run."""
        self._take_inbox()
        self._admit()
        prefill, shape = self._plan_prefill()
        if prefill:
            self._run(prefill, shape)
        decode = self._reserve_decode_pages([s for s in self._running if s.pending == 1])
        decode.sort(key=lambda s: -len(s.pages))  # longest first: see _row_widths
        if decode:
            self._run([(s, 1) for s in decode], (_fit(len(decode), self._decode_rows), 1))
        return bool(prefill or decode)

    def generate(self, requests: Seq[Request], *, progress: bool = False) -> list[Completion]:
        """Runs `requests` to completion on the caller's thread (no background loop) and returns their completions
        in order; an internal error raises. `progress` shows finished requests and generated tokens/s."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the engine itself; do not call it while start()ed")
        events: dict[int, list[Event]] = collections.defaultdict(list)
        bar = tqdm(total=len(requests), desc="generating", unit="req", disable=not progress)
        started, tokens = time.perf_counter(), self.counters["generated_tokens"]

        def on_event(event: Event) -> None:
            events[event.request_id].append(event)
            if event.finished:
                bar.update(1)
                rate = (self.counters["generated_tokens"] - tokens) / (time.perf_counter() - started)
                bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)

        for request in requests:  # all or nothing: a bad request is refused before any is queued
            self._check(request)
        todo, ids = collections.deque(requests), []
        while todo or not self.idle:
            while todo and self._outstanding < self.config.max_running + self.config.max_waiting:
                ids.append(self.submit(todo.popleft(), on_event))
            self.step()
        bar.close()
        return [completion_from_events(events[i]) for i in ids]

    def stats(self) -> dict:
        with self._wake:
            return {"running": len(self._running), "waiting": len(self._waiting) + len(self._inbox),
                    "kv_pages_total": self.pool.capacity, "kv_pages_available": self.pool.available,
                    "kv_pages_cached": self.pool.cached, "page_size": self.config.page_size,
                    "max_model_len": self.max_model_len, "compiled_shapes": len(self.shapes),
                    **{k: round(v, 3) if isinstance(v, float) else v for k, v in self.counters.items()}}

    # ---- scheduling --------------------------------------------------------------------------------------------------

    def _take_inbox(self) -> None:
        with self._wake:
            new, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        self._waiting.extend(new)
        for seq in [s for s in [*self._waiting, *self._running] if s.request_id in cancels]:
            self._finish(seq, reason="abort")

    def _admit(self) -> None:
        page_size = self.config.page_size
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            request = seq.request
            if (request.prompt_logprobs is not None or request.max_new_tokens == 0) and seq.prompt_scores is None:
                if not self._score_prompt(seq):
                    continue
            shareable = min(len(seq.tokens) - 1, seq.prompt_len) // page_size if self._prefix_ok(seq) else 0
            shared = self.pool.share(self.pool.prefix_keys(seq.tokens, shareable))
            need = -(-len(seq.tokens) // page_size) - len(shared)
            headroom = len(self._running)  # a page for each running sequence's next decode
            if need + (headroom if self._running else 0) > self.pool.available:
                self.pool.release(shared)
                return
            self._waiting.popleft()
            seq.pages = shared + self.pool.allocate(need)
            seq.shared_pages, seq.num_cached = len(shared), len(shared) * page_size
            self.counters["prefix_cache_hit_tokens"] += seq.num_cached
            seq.slot, seq.admitted = self._free_slots.pop(), next(self._admissions)
            if uses_penalties(request.sampling):
                counts = np.bincount(np.asarray(seq.generated, np.int64), minlength=self.model_config.vocab_size)
                seen = np.zeros(self.model_config.vocab_size, bool)
                seen[seq.tokens] = True
                self.counts, self.seen = set_penalty_row(self.counts, self.seen, seq.slot,
                                                          counts.astype(np.int32), seen)
            self._running.append(seq)

    def _prefix_ok(self, seq: Sequence) -> bool:
        # Beyond max_position_embeddings, dynamic NTK rotates a prompt's keys with a base set by its whole length,
        # so pages of another prompt (another length) hold other keys even for equal tokens.
        cfg = self.model_config
        dynamic = cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic"
        return not (dynamic and len(seq.tokens) > cfg.max_position_embeddings)

    def _score_prompt(self, seq: Sequence) -> bool:
        """Prompt log-probs (echo, perplexity), before the sequence takes pages. False if it finished here."""
        request = seq.request
        n = request.prompt_logprobs
        lps: list[float | None] | None = [None] if n is not None else None
        tops: list[dict[int, float] | None] | None = [None] if n is not None else None
        if seq.prompt_len > 1 and n is not None:
            try:
                (chosen, top_ids, top_lps), = score_tokens((self.graphdef, self.params), [list(request.prompt_ids)],
                                                           top_n=self.config.max_top_n if n else 0)
            except Exception as e:  # noqa: BLE001 - reported to the caller, never swallowed
                log.exception("scoring failed")
                self._waiting.popleft()
                self._finish(seq, error=f"internal error while scoring the prompt: {e}")
                return False
            lps += chosen.tolist()
            tops += [dict(zip(i[:n].tolist(), p[:n].tolist(), strict=True)) for i, p in zip(top_ids, top_lps,
                                                                                             strict=True)]
        seq.first_token_time = time.monotonic()
        if request.max_new_tokens == 0:
            self._waiting.popleft()
            self._deliver(seq, Event(seq.request_id, [], [], [], "", finished=True, finish_reason="length",
                                     prompt_logprobs=lps, prompt_top_logprobs=tops))
            self._finish(seq)
            return False
        seq.prompt_scores = (lps, tops)
        return True

    def _plan_prefill(self) -> tuple[list[tuple[Sequence, int]], tuple[int, int]]:
        """The first sequences with prompt tokens to cache (in admission order) and how many each caches now, in the
        (rows, chunk) shape that caches the most tokens per unit of cost: a call costs about its padded tokens plus
        a fixed part (reading the weights), taken as 64 tokens' worth. Prompts longer than the chunk continue in
        later steps."""
        waiting = [seq for seq in self._running if seq.pending > 1]
        if not waiting:
            return [], (0, 0)

        def value(shape):
            rows, chunk = shape
            real = sum(min(seq.pending, chunk) for seq in waiting[:rows])
            return real / (64 + rows * chunk), real

        rows, chunk = max(self._prefill_shapes, key=value)
        return [(seq, min(seq.pending, chunk)) for seq in waiting[:rows]], (rows, chunk)

    def _reserve_decode_pages(self, rows: list[Sequence]) -> list[Sequence]:
        """Gives each decoding row room for its next token, preempting the newest sequences when pages run out."""
        for seq in sorted(rows, key=lambda s: s.admitted):
            if seq not in self._running:
                continue
            need = seq.pages_needed(len(seq.tokens), self.config.page_size)
            while need > self.pool.available:
                others = [s for s in self._running if s is not seq]
                if not others:
                    raise RuntimeError("one sequence does not fit the KV budget")  # excluded by the budget check
                self._preempt(max(others, key=lambda s: s.admitted))
            seq.pages += self.pool.allocate(need)
        return [s for s in rows if s in self._running]

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_cached = seq.shared_pages = 0
        seq.registered = False
        self._waiting.appendleft(seq)
        self.counters["preemptions"] += 1

    def _release(self, seq: Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self.pool.release(seq.pages)
            seq.pages = []
            self._free_slots.append(seq.slot)
            seq.slot = -1

    # ---- running a batch -----------------------------------------------------------------------------------------

    def warmup(self) -> int:
        """Compiles every program the engine can run (all padding rows: nothing is written but the null page), so
        no request waits for a compile and memory does not grow later. Returns the number of programs."""
        shapes = [(rows, 1, width, None) for rows in self._decode_rows for width in self._decode_widths]
        shapes += [(rows, 1, self._widths[-1], profile) for rows in self._decode_rows if rows >= 16
                   for profile in self._row_profiles]
        shapes += [(rows, chunk, width, None) for rows, chunk in self._prefill_shapes for width in self._widths]
        for rows, chunk, width, row_widths in shapes:
            self._call(np.zeros((rows, chunk), np.int32), np.zeros((rows, width), np.int32),
                       *(np.zeros(rows, np.int32) for _ in range(3)), np.full(rows, self.config.max_running, np.int32),
                       np.zeros(rows, bool), np.zeros(rows, np.int32), stack_sampling([], [], rows, self._pad_key),
                       row_widths)
        return len(shapes)

    def _call(self, tokens, page_table, lengths, q_lengths, rope_lengths, slots, emit, steps, sampling, row_widths):
        self.shapes.add((*tokens.shape, page_table.shape[1], row_widths))
        self.cache, self.counts, self.seen, *out = self._step(
            self.params, self.cache, self.counts, self.seen, tokens, page_table, lengths, q_lengths,
            rope_lengths, slots, emit, steps, sampling, top_n=self.config.max_top_n, row_widths=row_widths)
        self.counters["model_calls"] += 1
        return jax.device_get(out)

    def _run(self, rows: list[tuple[Sequence, int]], shape: tuple[int, int]) -> None:
        started = time.perf_counter()
        try:
            self._run_batch(rows, *shape)
            kind = "prefill" if shape[1] > 1 else "decode"
            self.counters[f"{kind}_seconds"] += time.perf_counter() - started
            self.counters[f"{kind}_tokens"] += sum(n for _, n in rows)
            self.counters[f"{kind}_padded_tokens"] += shape[0] * shape[1]
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error, the engine goes on
            log.exception("engine step failed")
            # The donated cache died with the call: nobody's pages are valid.
            if jax.tree.leaves(self.cache.k)[0].is_deleted():
                self.cache = init_paged_cache(self.model_config, self.pool.capacity + 1, self.config.page_size,
                                              self.config.cache_dtype)
                self.pool = PagePool(self.pool.capacity + 1, self.config.page_size,
                                     prefix_caching=self.config.prefix_caching)
                self.counts, self.seen = jnp.zeros_like(self.counts), jnp.zeros_like(self.seen)
                failed = [*self._running]
                self._running.clear()
                self._free_slots = list(range(self.config.max_running))[::-1]
            else:
                failed = [seq for seq, _ in rows]
            for seq in failed:
                self._finish(seq, error=f"internal error in the engine step: {type(e).__name__}: {e}")

    def _run_batch(self, rows: list[tuple[Sequence, int]], batch: int, chunk: int) -> None:
        width = _fit(max(len(seq.pages) for seq, _ in rows), self._decode_widths if chunk == 1 else self._widths)
        tokens = np.zeros((batch, chunk), np.int32)
        page_table = np.zeros((batch, width), np.int32)
        lengths, q_lengths, rope_lengths, steps = (np.zeros(batch, np.int32) for _ in range(4))
        slots = np.full(batch, self.config.max_running, np.int32)
        emit = np.zeros(batch, bool)
        for i, (seq, n) in enumerate(rows):
            start = seq.num_cached
            tokens[i, :n] = seq.tokens[start:start + n]
            page_table[i, :len(seq.pages)] = seq.pages
            lengths[i], q_lengths[i], slots[i], steps[i] = start + n, n, seq.slot, len(seq.generated)
            # A prompt's tokens take the NTK base of the whole prompt, as a one-shot prefill gives them.
            rope_lengths[i] = len(seq.tokens)
            emit[i] = start + n == len(seq.tokens)
        sampling = stack_sampling([seq.request.sampling for seq, _ in rows], [seq.key_data for seq, _ in rows],
                                   batch, self._pad_key)
        token, logprob, top_ids, top_logprobs = self._call(tokens, page_table, lengths, q_lengths, rope_lengths,
                                                           slots, emit, steps, sampling,
                                                           self._row_widths(rows, batch, chunk, width))
        for i, (seq, n) in enumerate(rows):
            seq.num_cached += n
            if seq.num_cached >= seq.prompt_len and not seq.registered:
                self._register_prefix(seq)
            if emit[i]:
                k = seq.request.top_n
                self._append(seq, int(token[i]), float(logprob[i]),
                             dict(zip(top_ids[i, :k].tolist(), top_logprobs[i, :k].tolist(), strict=True)))

    def _row_widths(self, rows: list[tuple[Sequence, int]], batch: int, chunk: int, width: int):
        """The cheapest row profile whose groups hold their rows (sorted longest first), or None."""
        if chunk != 1 or batch < 16 or width != self._widths[-1]:
            return None
        group = batch // 4
        need = [len(rows[g * group][0].pages) if g * group < len(rows) else 0 for g in range(4)]
        fits = [p for p in self._row_profiles if all(n <= w for n, w in zip(need, p, strict=True))]
        return min(fits, key=sum, default=None)

    def _register_prefix(self, seq: Sequence) -> None:
        """Offers the sequence's full prompt pages to the prefix cache, once, after its prompt is cached."""
        if self.config.prefix_caching and self._prefix_ok(seq):
            full = seq.prompt_len // self.config.page_size
            keys = self.pool.prefix_keys(seq.tokens, full)
            for i in range(seq.shared_pages, full):
                self.pool.register(seq.pages[i], keys[i])
        seq.registered = True

    def _append(self, seq: Sequence, token: int, logprob: float, top: dict[int, float]) -> None:
        request = seq.request
        seq.tokens.append(token)
        seq.generated.append(token)
        seq.logprobs.append(logprob)
        seq.top_logprobs.append(top)
        self.counters["generated_tokens"] += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        reason = None
        if token in request.stop_ids:
            reason = "stop"
        elif len(seq.generated) >= request.max_new_tokens or len(seq.tokens) >= self.max_model_len:
            reason = "length"
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=request.skip_special_tokens)
            found = [i for i in (text.find(s) for s in request.stop_strings) if i >= 0]
            if found:
                text, reason = text[:min(found)], "stop"
        if reason is None:
            # Hold back what a stop string completed later could still cut, and a half-decoded character, so the
            # text of successive events only grows (a streaming client never has to take text back).
            hold = max(map(len, request.stop_strings), default=1) - 1
            visible = text[:len(text) - hold].rstrip("\ufffd")
            text = visible if visible.startswith(seq.sent_text) else seq.sent_text
        event = Event(seq.request_id, seq.generated[seq.sent_tokens:], seq.logprobs[seq.sent_tokens:],
                      seq.top_logprobs[seq.sent_tokens:], text, finished=reason is not None, finish_reason=reason)
        if seq.prompt_scores is not None and seq.sent_tokens == 0:
            event.prompt_logprobs, event.prompt_top_logprobs = seq.prompt_scores
        seq.sent_tokens, seq.sent_text = len(seq.generated), text
        self._deliver(seq, event)
        if reason is not None:
            self._finish(seq)

    def _deliver(self, seq: Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # noqa: BLE001 - a broken callback must not stop other requests
            log.exception("on_event of request %d failed; cancelling it", seq.request_id)
            self.cancel(seq.request_id)

    def _finish(self, seq: Sequence, *, reason: str | None = None, error: str | None = None) -> None:
        """Frees the sequence; with `reason` or `error`, first sends its last event (a normal end already did)."""
        self._release(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)
        if reason is not None or error is not None:
            self._deliver(seq, Event(seq.request_id, [], [], [], seq.sent_text, finished=True, finish_reason=reason,
                                     error=error))
        with self._wake:
            self._outstanding -= 1
        self.counters["finished"] += 1


def completion_from_events(events: list[Event]) -> Completion:
    """The `Completion` a request's events add up to; an error event raises."""
    last = events[-1]
    if last.error is not None:
        raise RuntimeError(last.error)
    tokens = [t for e in events for t in e.tokens]
    return Completion(tokens, [lp for e in events for lp in e.logprobs],
                      [top for e in events for top in e.top_logprobs], last.finish_reason, last.text)

