"""The continuous-batching engine: the paged cache equals full recomputation, every request's output equals the same
request run alone (preemption, prefix sharing, chunked prefill, sampling and penalties included), and limits, stops,
cancellation and internal errors behave."""

import importlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode_cache import forward

from internlm2_jax.config import preset
from internlm2_jax.decode.engine import Engine, EngineConfig
from internlm2_jax.decode.generate import generate_ids
from internlm2_jax.decode.requests import EngineFull, Request, RequestRejected
from internlm2_jax.decode.sampling import SamplingConfig
from internlm2_jax.kernels.decode_attention import paged_cpu_kernel_available
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.paged_cache import init_paged_cache, pages_for_budget

CFG = preset("tiny")  # max_position_embeddings 64, dynamic NTK beyond


@pytest.fixture(scope="module")
def model():
    return InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0))


def prompts(n, low, high, seed=0):
    rng = np.random.RandomState(seed)
    return [tuple(rng.randint(3, CFG.vocab_size, rng.randint(low, high)).tolist()) for _ in range(n)]


@jax.jit
def paged_forward(model, cache, tokens, page_table, lengths, q_lengths):
    hidden, cache = model.model(tokens, cache=cache.with_step(page_table, lengths, q_lengths, lengths))
    return model.logits(hidden), cache


def test_paged_cache_equals_full_recomputation(model):
    """Ragged rows on shuffled, non-contiguous pages, fed in chunks that straddle page boundaries, then one token at
    a time: the logits at every position equal one forward over the whole sequence."""
    page_size, chunks = 4, [5, 3, 7, 1, 1, 1, 6, 1]
    seqs = [np.random.RandomState(i).randint(3, CFG.vocab_size, sum(chunks) - 2 * i) for i in range(3)]
    cache = init_paged_cache(CFG, 40, page_size)
    order = np.random.RandomState(9).permutation(np.arange(1, 40))
    table = np.zeros((3, 8), np.int32)
    table[:, :] = order[:24].reshape(3, 8)
    got = [[] for _ in seqs]
    done = np.zeros(3, int)
    for size in chunks:
        q_lengths = np.array([min(size, len(s) - d) for s, d in zip(seqs, done, strict=True)], np.int32)
        tokens = np.zeros((3, size), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, :q_lengths[i]] = s[done[i]:done[i] + q_lengths[i]]
        logits, cache = paged_forward(model, cache, tokens, table, jnp.asarray(done + q_lengths, jnp.int32),
                                      jnp.asarray(q_lengths))
        for i in range(3):
            got[i] += list(np.asarray(logits[i, :q_lengths[i]]))
        done += q_lengths
    assert sum(chunks) <= CFG.max_position_embeddings
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(np.stack(got[i]), np.asarray(forward(model, s[None]))[0], atol=1e-4, rtol=0)


def solo(model, request):
    return generate_ids(model, [list(request.prompt_ids)], max_new_tokens=request.max_new_tokens,
                        sampling=request.sampling, top_n=request.top_n, stop_ids=request.stop_ids)[0]


def assert_same_completion(got, ref, model, request):
    """Greedy: the conventions' tolerance rule against a full forward of the reference's tokens."""
    full = np.asarray(forward(model, np.array([list(request.prompt_ids) + ref.tokens])))[0]
    logits = full[len(request.prompt_ids) - 1:-1]
    ref_logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for step, token in enumerate(got.tokens):
        top2 = np.sort(logits[step])[-2:]
        np.testing.assert_allclose(got.logprobs[step], ref_logprobs[step, token], atol=1e-4)
        if top2[1] - top2[0] < 1e-3:
            return
        assert token == ref.tokens[step], f"step {step}"
    assert got.finish_reason == ref.finish_reason


def test_every_request_equals_itself_alone_under_preemption_and_prefix_sharing(model):
    """A budget of 20 pages of 8 tokens for 6 concurrent sequences: pages run out and sequences are preempted and
    recomputed; half the prompts share a 24-token system prefix. Outputs equal each request alone."""
    system = prompts(1, 24, 25, seed=7)[0]
    reqs = [Request((system + p) if i % 2 else p, 20, top_n=3) for i, p in enumerate(prompts(12, 1, 20))]
    engine = Engine(model, None, EngineConfig(max_model_len=64, kv_budget_tokens=160, page_size=8, max_running=6,
                                              prefill_chunk=32, max_prefill_rows=2))
    out = engine.generate(reqs)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] >= 24, stats
    assert stats["kv_pages_available"] == stats["kv_pages_total"] and stats["running"] == 0
    for request, got in zip(reqs, out, strict=True):
        assert len(got.tokens) == 20 and all(len(top) == 3 for top in got.top_logprobs)
        assert_same_completion(got, solo(model, request), model, request)


def test_decode_rows_sorted_into_stepped_widths_equal_each_request_alone(model, monkeypatch):
    """Decoding with XLA's page gather (as without the CPU kernel): 16 rows of very different lengths at the widest
    page table run as four groups of stepped-down widths (`row_widths`); every output still equals the request run
    alone."""
    for module in ("internlm2_jax.decode.engine", "internlm2_jax.model.attention"):
        monkeypatch.setattr(importlib.import_module(module), "decode_reads_pages_in_place", lambda *args: False)
    reqs = [Request(p, 10, top_n=2) for p in prompts(16, 1, 50, seed=3)]
    engine = Engine(model, None, EngineConfig(max_model_len=64, kv_budget_tokens=2048, page_size=4, max_running=16,
                                              prefill_chunk=64))
    out = engine.generate(reqs)
    assert engine.programs.row_profiles == [(16, 12, 8, 4), (16, 16, 12, 8)]
    assert any(shape[3] is not None for shape in engine.shapes), engine.shapes
    for request, got in zip(reqs, out, strict=True):
        assert_same_completion(got, solo(model, request), model, request)


def test_sampled_and_penalised_requests_do_not_depend_on_their_batch(model):
    sampled = SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=3)
    penalised = SamplingConfig(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4)
    reqs = [Request(p, 12, sampling=[sampled, penalised, SamplingConfig(temperature=1.0, seed=i)][i % 3])
            for i, p in enumerate(prompts(9, 2, 20, seed=1))]
    crowd = Engine(model, None, EngineConfig(max_model_len=64, kv_budget_tokens=512, page_size=8, max_running=8))
    alone = Engine(model, None, EngineConfig(max_model_len=64, kv_budget_tokens=512, page_size=8, max_running=1))
    together, one_by_one = crowd.generate(reqs), [alone.generate([r])[0] for r in reqs]
    for a, b in zip(together, one_by_one, strict=True):
        assert a.tokens == b.tokens
    for request, got in zip(reqs[1::3], together[1::3], strict=True):  # penalties: as the static path applies them
        assert got.tokens == solo(model, request).tokens


def test_chunked_prefill_beyond_max_positions_matches_static_generation(model):
    """Dynamic NTK: a 90-token prompt (max_position_embeddings 64) prefilled in chunks of 16 takes the base of the
    whole prompt, as one-shot prefill does, then each step its own length."""
    request = Request(prompts(1, 90, 91, seed=4)[0], 30)
    engine = Engine(model, None, EngineConfig(max_model_len=160, kv_budget_tokens=320, page_size=16,
                                              prefill_chunk=16))
    got, ref = engine.generate([request])[0], solo(model, request)
    agree = next((i for i, (a, b) in enumerate(zip(got.tokens, ref.tokens, strict=True)) if a != b), 30)
    np.testing.assert_allclose(got.logprobs[:agree], ref.logprobs[:agree], atol=1e-4)
    assert agree > 20


def test_prompt_logprobs_stops_and_lengths(model, trained):
    tiny = InternLM2ForCausalLM(preset("tiny", vocab_size=trained.vocab_size), rngs=nnx.Rngs(2))
    engine = Engine(tiny, trained, EngineConfig(max_model_len=64, kv_budget_tokens=256, page_size=8))
    ids = tuple(trained.encode("def f(x): return x", add_bos=True))
    events = []
    engine.submit(Request(ids, 0, prompt_logprobs=2), events.append)
    while not engine.idle:
        engine.step()
    (event,) = events
    hidden = tiny(jnp.asarray([ids]), return_hidden=True)
    expected = np.asarray(tiny.token_logprobs(hidden[:, :-1], jnp.asarray([ids[1:]])))[0]
    assert event.finished and event.prompt_logprobs[0] is None and event.tokens == []
    np.testing.assert_allclose(event.prompt_logprobs[1:], expected, atol=1e-5)
    assert all(len(t) == 2 and max(t.values()) >= lp - 1e-5
               for t, lp in zip(event.prompt_top_logprobs[1:], event.prompt_logprobs[1:], strict=True))

    free = engine.generate([Request(ids, 12)])[0]
    stop_token = free.tokens[3]
    by_id = engine.generate([Request(ids, 12, stop_ids=(stop_token,))])[0]
    assert by_id.tokens == free.tokens[:free.tokens.index(stop_token) + 1] and by_id.finish_reason == "stop"
    if len(free.text) > 3:
        stop = free.text[2:4]
        events = []
        engine.submit(Request(ids, 12, stop_strings=(stop,)), events.append)
        while not engine.idle:
            engine.step()
        assert events[-1].text == free.text[:free.text.index(stop)] and events[-1].finish_reason == "stop"
        texts = [e.text for e in events]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # streamed text never shrinks
    capped = engine.generate([Request(ids, 64 - len(ids))])[0]
    assert len(ids) + len(capped.tokens) == 64 and capped.finish_reason == "length"


def test_rejections_queue_limit_cancel_and_errors(model, monkeypatch):
    engine = Engine(model, None, EngineConfig(max_model_len=32, kv_budget_tokens=64, page_size=8, max_running=1,
                                              max_waiting=1))
    with pytest.raises(RequestRejected, match="max_model_len=32") as err:
        engine.submit(Request(tuple(range(3, 30)), 10), print)
    assert err.value.field == "max_tokens"
    for request, field in [(Request((), 4), "prompt"), (Request((3, 10_000), 4), "prompt"),
                           (Request((3,), 4, sampling=SamplingConfig(top_p=0)), "top_p"),
                           (Request((3,), 4, top_n=99), "top_n")]:
        with pytest.raises(RequestRejected) as err:
            engine.submit(request, print)
        assert err.value.field == field
    events = {0: [], 1: []}
    first = engine.submit(Request((5, 6, 7), 20), events[0].append)
    second = engine.submit(Request((8, 9), 20), events[1].append)
    with pytest.raises(EngineFull):
        engine.submit(Request((5,), 2), print)
    engine.step()
    engine.cancel(first)
    while not engine.idle:
        engine.step()
    assert events[0][-1].finish_reason == "abort" and events[1][-1].finish_reason == "length"
    assert engine.stats()["kv_pages_available"] == engine.stats()["kv_pages_total"]
    assert first != second

    def broken(*args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine, "_step", broken)
    failed = []
    engine.submit(Request((5, 6), 4), failed.append)
    engine.step()
    assert failed[-1].finished and "device fell over" in failed[-1].error and engine.idle
    monkeypatch.undo()
    assert len(engine.generate([Request((5, 6), 4)])[0].tokens) == 4  # the engine goes on


def test_background_loop_serves_threads_and_bounds_compiled_shapes(model):
    engine = Engine(model, None, EngineConfig(max_model_len=64, kv_budget_tokens=1024, page_size=8, max_running=8,
                                              prefill_chunk=32))
    programs = engine.warmup()
    warm = set(engine.shapes)
    # decode: rows 1, 2, 4, 8 x widths {2, 8} (only 8 when the CPU kernel reads pages in place);
    # prefill: (rows, chunk) (1, 16), (1, 32), (2, 16) x widths {2, 8}
    assert engine.decode_reads_pages_in_place == paged_cpu_kernel_available()
    assert programs == len(warm) == 4 * (1 if engine.decode_reads_pages_in_place else 2) + 3 * 2
    engine.start()
    results, lock = {}, threading.Lock()

    def client(i, prompt):
        done = threading.Event()
        got = []

        def on_event(event):
            got.append(event)
            if event.finished:
                done.set()

        engine.submit(Request(prompt, 4 + i % 9), on_event)
        assert done.wait(120)
        with lock:
            results[i] = got

    threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(prompts(24, 1, 50, seed=5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.stop()
    assert sorted(results) == list(range(24))
    assert all(sum(len(e.tokens) for e in results[i]) == 4 + i % 9 for i in results)
    assert engine.shapes == warm  # the load ran only programs compiled at warm-up
    assert pages_for_budget(CFG, 8, tokens=1024) == 129
