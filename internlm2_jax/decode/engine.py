"""The continuous-batching engine: requests join and leave a running batch at every step, over a paged KV cache.

Each `step()` runs at most two jitted calls of one function (`engine_step`): a chunked prefill for sequences with
prompt tokens still to cache (up to `max_prefill_rows` rows and `prefill_chunk` padded tokens), and one decode token
for every sequence that is generating. Both sample on device with each row's own settings; the host appends tokens,
checks stop ids, stop strings and lengths (`streaming`), sends `Event`s and frees finished sequences' pages. Shapes
are padded to a few sizes (`engine_shapes`), so the engine runs a bounded set of programs, all compiled by
`warmup()`, never one per request. Page bookkeeping and prefix caching are `scheduler`'s.

Memory is an absolute budget (`kv_budget_tokens` or `kv_budget_gb`), split into pages; `kv_dtype="int8"` (or
"int4") stores K/V quantized (model/kv_quant.py), so the same GB hold about 1.9x (3.6x) the tokens. A request is
admitted when its whole prompt fits (its shared prefix pages from the prefix cache cost nothing) with a page of
headroom per running sequence; decoding takes a page at a time, and when none is left the newest sequence is
preempted: its pages are freed and it waits at the head of the queue to be recomputed (prompt and generated tokens)
when pages allow.
Sampling keys depend on each request's seed and token index only, so a request's output does not depend on what it
was batched with or on preemption (greedy: up to matmul rounding, the conventions' tolerance rule).

On a mesh (the model's parameters placed on one, as `load_for_decoding(..., mesh=)` places them) the paged cache is
created on it, each kv head's pages on its tensor shard, every jitted call runs under it, and decode batches are
padded to split over its data-parallel axes; a request's output is the one it has on one device.

Use it synchronously (`engine.generate(requests)`, or `submit` + `step`) or from a server (`start()` runs the loop
in a background thread; `submit` and `cancel` are thread-safe; events arrive on the engine's thread).
"""

from __future__ import annotations

import collections
import contextlib
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
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from internlm2_jax.decode.engine_shapes import ProgramShapes, pow2
from internlm2_jax.decode.engine_step import (jitted_engine_step, key_data, set_penalty_row, stack_sampling,
                                              uses_penalties)
from internlm2_jax.decode.generate import Completion
from internlm2_jax.decode.requests import EngineFull, Event, Request, check_request
from internlm2_jax.decode.scheduler import PagePool, Sequence
from internlm2_jax.decode.scoring import score_tokens
from internlm2_jax.decode.streaming import append_token, completion_from_events
from internlm2_jax.model.attention import decode_reads_pages_in_place
from internlm2_jax.model.kv_quant import KV_DTYPES
from internlm2_jax.model.paged_cache import init_paged_cache, pages_for_budget
from internlm2_jax.parallel.mesh import data_parallel_size, mesh_of

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
    kv_dtype: str | None = None  # "int8" / "int4": K/V quantized per (token, kv head) instead (not with cache_dtype)
    prefix_caching: bool = True
    max_top_n: int = 20

    def validate(self) -> None:
        checks = {"max_model_len": self.max_model_len >= 2, "page_size": self.page_size >= 1,
                  "max_running": self.max_running >= 1, "max_waiting": self.max_waiting >= 0,
                  "prefill_chunk": self.prefill_chunk >= 8 and self.prefill_chunk & (self.prefill_chunk - 1) == 0,
                  "max_prefill_rows": pow2(self.max_prefill_rows) == self.max_prefill_rows,
                  "max_top_n": 0 <= self.max_top_n <= 100}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"EngineConfig.{name}: invalid value {getattr(self, name)!r}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"EngineConfig.kv_dtype: {self.kv_dtype!r} is not a quantized KV format; use None (float "
                             f"K/V in cache_dtype) or one of {KV_DTYPES}")
        if self.kv_dtype is not None and self.cache_dtype is not None:
            raise ValueError(f"EngineConfig: cache_dtype={self.cache_dtype!r} is for a float cache; a kv_dtype="
                             f"{self.kv_dtype!r} cache stores codes and fp32 scales, so set one of them")


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
                                     gigabytes=config.kv_budget_gb, dtype=config.cache_dtype,
                                     kv_dtype=config.kv_dtype)
        if (num_pages - 1) * page_size < config.max_model_len:
            raise ValueError(f"the KV budget holds {(num_pages - 1) * page_size} tokens, less than one sequence of "
                             f"max_model_len={config.max_model_len}; raise the budget or lower max_model_len")
        # On a mesh (parameters placed on one) the cache and the penalty state live on it too, and every jitted
        # call runs under it (`_on_mesh`), so the model's constraints and per-shard kernels see it.
        self.mesh = mesh_of(self.params)
        self.pool = PagePool(num_pages, page_size, prefix_caching=config.prefix_caching)
        self.cache = self._new_cache(num_pages)
        self.counts, self.seen = self._empty_penalty_state()
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
        # The CPU decode kernel reads each row's pages in place up to its length; the XLA gather reads whole widths.
        self.decode_reads_pages_in_place = decode_reads_pages_in_place(
            self.model_config.attention_impl, self.model_config.dtype, config.cache_dtype or self.model_config.dtype,
            config.kv_dtype)
        self.programs = ProgramShapes.plan(max_running=config.max_running, max_prefill_rows=config.max_prefill_rows,
                                           prefill_chunk=config.prefill_chunk, max_model_len=config.max_model_len,
                                           page_size=page_size, reads_pages_in_place=self.decode_reads_pages_in_place,
                                           data_parallel=data_parallel_size(self.mesh))
        # Every key exists from the start: `stats()` reads them from another thread, and a dict must not grow
        # while it is being read.
        self.counters = collections.Counter(dict.fromkeys(
            ("model_calls", "generated_tokens", "finished", "preemptions", "prefix_cache_hit_tokens",
             "prefill_seconds", "prefill_tokens", "prefill_padded_tokens", "decode_seconds", "decode_tokens",
             "decode_padded_tokens"), 0))
        self._pad_key = key_data(0)

    def _new_cache(self, num_pages: int):
        return init_paged_cache(self.model_config, num_pages, self.config.page_size, self.config.cache_dtype,
                                mesh=self.mesh, kv_dtype=self.config.kv_dtype)

    def _empty_penalty_state(self) -> tuple[jax.Array, jax.Array]:
        """Zero counts and seen flags [max_running + 1, vocab] (the last row is padding rows' scratch), replicated
        over the mesh when there is one (a few MB even at 32 rows of a 92K vocabulary)."""
        shape = (self.config.max_running + 1, self.model_config.vocab_size)
        where = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        return jnp.zeros(shape, jnp.int32, device=where), jnp.zeros(shape, bool, device=where)

    def _on_mesh(self):
        # The mesh found once (not `within_mesh_of(self.params)`, which walks the parameters at every step).
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

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
        check_request(request, vocab_size=self.model_config.vocab_size, max_model_len=self.max_model_len,
                      max_top_n=self.config.max_top_n, has_tokenizer=self.tokenizer is not None)

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
        decode.sort(key=lambda s: -len(s.pages))  # longest first: see ProgramShapes.row_widths
        if decode:
            self._run([(s, 1) for s in decode], (self.programs.decode_batch(len(decode)), 1))
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
                with self._on_mesh():
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
                with self._on_mesh():
                    (chosen, top_ids, top_lps), = score_tokens((self.graphdef, self.params),
                                                               [list(request.prompt_ids)],
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
        (rows, chunk) shape that caches the most tokens per unit of cost (`ProgramShapes.best_prefill`). Prompts
        longer than the chunk continue in later steps."""
        waiting = [seq for seq in self._running if seq.pending > 1]
        if not waiting:
            return [], (0, 0)
        rows, chunk = self.programs.best_prefill([seq.pending for seq in waiting])
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
        shapes = self.programs.all_programs()
        for rows, chunk, width, row_widths in shapes:
            self._call(np.zeros((rows, chunk), np.int32), np.zeros((rows, width), np.int32),
                       *(np.zeros(rows, np.int32) for _ in range(3)), np.full(rows, self.config.max_running, np.int32),
                       np.zeros(rows, bool), np.zeros(rows, np.int32), stack_sampling([], [], rows, self._pad_key),
                       row_widths)
        return len(shapes)

    def _call(self, tokens, page_table, lengths, q_lengths, rope_lengths, slots, emit, steps, sampling, row_widths):
        self.shapes.add((*tokens.shape, page_table.shape[1], row_widths))
        with self._on_mesh():
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
                self.cache = self._new_cache(self.pool.capacity + 1)
                self.pool = PagePool(self.pool.capacity + 1, self.config.page_size,
                                     prefix_caching=self.config.prefix_caching)
                self.counts, self.seen = self._empty_penalty_state()
                failed = [*self._running]
                self._running.clear()
                self._free_slots = list(range(self.config.max_running))[::-1]
            else:
                failed = [seq for seq, _ in rows]
            for seq in failed:
                self._finish(seq, error=f"internal error in the engine step: {type(e).__name__}: {e}")

    def _run_batch(self, rows: list[tuple[Sequence, int]], batch: int, chunk: int) -> None:
        width = self.programs.width(max(len(seq.pages) for seq, _ in rows), chunk)
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
        row_widths = self.programs.row_widths([len(seq.pages) for seq, _ in rows], batch, chunk, width)
        token, logprob, top_ids, top_logprobs = self._call(tokens, page_table, lengths, q_lengths, rope_lengths,
                                                           slots, emit, steps, sampling, row_widths)
        for i, (seq, n) in enumerate(rows):
            seq.num_cached += n
            if seq.num_cached >= seq.prompt_len and not seq.registered:
                self._register_prefix(seq)
            if emit[i]:
                k = seq.request.top_n
                self._append(seq, int(token[i]), float(logprob[i]),
                             dict(zip(top_ids[i, :k].tolist(), top_logprobs[i, :k].tolist(), strict=True)))

    def _register_prefix(self, seq: Sequence) -> None:
        """Offers the sequence's full prompt pages to the prefix cache, once, after its prompt is cached."""
        if self.config.prefix_caching and self._prefix_ok(seq):
            full = seq.prompt_len // self.config.page_size
            keys = self.pool.prefix_keys(seq.tokens, full)
            for i in range(seq.shared_pages, full):
                self.pool.register(seq.pages[i], keys[i])
        seq.registered = True

    def _append(self, seq: Sequence, token: int, logprob: float, top: dict[int, float]) -> None:
        self.counters["generated_tokens"] += 1
        event = append_token(seq, token, logprob, top, tokenizer=self.tokenizer, max_model_len=self.max_model_len)
        self._deliver(seq, event)
        if event.finished:
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
