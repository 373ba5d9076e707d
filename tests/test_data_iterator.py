"""The iterator: weighted mixture and epochs, determinism, exact resume from a JSON state, multi-process
disjointness, statistics, and the real tokenizer's `<s> text </s>`."""

import json
from collections import Counter

import numpy as np
import pytest
from test_data_support import ByteTokenizer, check_row_invariants, documents_from_rows, write_jsonl

from internlm2_jax.data import MixtureSampler, PretrainDataIterator, make_manifest

TOK = ByteTokenizer()


def make_sources(tmp_path, sizes=(("web", 40, 1.0, 1.0), ("code", 15, 2.0, 3.0), ("books", 7, 0.5, 0.5)),
                 bad_every=0):
    """JSONL shards of uniquely named documents of varied lengths; returns (manifest, {source: texts})."""
    rng = np.random.default_rng(0)
    shards, texts = [], {}
    for source, count, weight, epochs in sizes:
        docs = [f"{source}-{i}:" + "x" * int(rng.integers(1, 90)) for i in range(count)]
        lines = [json.dumps({"text": d}) for d in docs]
        if bad_every:
            for i in range(bad_every - 1, len(lines), bad_every):
                lines.insert(i, "{broken")
        (tmp_path / f"{source}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        shards.append({"path": f"{source}.jsonl", "format": "jsonl", "source": source, "tier": source,
                       "weight": weight, "epochs": epochs})
        texts[source] = docs
    return make_manifest(shards, base_dir=tmp_path), texts


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_mixture_weights_are_honoured_over_many_draws():
    sampler = MixtureSampler([10**6] * 3, [1.0, 2.0, 5.0], [1.0] * 3, seed=3)
    counts = Counter(sampler.next()[0] for _ in range(16000))
    fractions = np.array([counts[s] for s in range(3)]) / 16000
    np.testing.assert_allclose(fractions, [1 / 8, 2 / 8, 5 / 8], atol=0.015)


def test_epochs_are_respected_and_weight_zero_is_never_read():
    sampler = MixtureSampler([10, 7, 5, 9], [1.0, 3.0, 1.0, 0.0], [3.0, 1.0, 0.4, 1.0], seed=0, repeat=False)
    draws = []
    while (draw := sampler.next()) is not None:
        draws.append(draw)
    counts = Counter(draws)
    assert {r: counts[(0, r)] for r in range(10)} == {r: 3 for r in range(10)}  # every record exactly 3 times
    assert {r: counts[(1, r)] for r in range(7)} == {r: 1 for r in range(7)}
    assert sum(counts[(2, r)] for r in range(5)) == 2 and all(counts[(2, r)] <= 1 for r in range(5))
    assert not any(shard == 3 for shard, _ in draws)
    assert len(draws) == 30 + 7 + 2
    # Each pass over a shard is a permutation: the first 10 reads of shard 0 are all distinct.
    first_pass = [r for s, r in draws if s == 0][:10]
    assert sorted(first_pass) == list(range(10))


def test_repeat_starts_new_rounds_with_new_orders():
    sampler = MixtureSampler([20], [1.0], [1.0], seed=0, repeat=True)
    rounds = [[sampler.next()[1] for _ in range(20)] for _ in range(2)]
    assert sorted(rounds[0]) == sorted(rounds[1]) == list(range(20))
    assert rounds[0] != rounds[1]


def test_iterator_covers_each_source_epochs_times(tmp_path):
    manifest, texts = make_sources(tmp_path)
    it = PretrainDataIterator(manifest, TOK, seq_len=48, batch_size=3, seed=1, repeat=False)
    batches = list(it)
    for batch in batches:
        check_row_invariants(batch, 48, TOK.pad_id)
    seen = Counter(TOK.decode(d) for d in documents_from_rows(batches))
    assert all(seen[d] == 1 for d in texts["web"]) and all(seen[d] == 3 for d in texts["code"])
    books = [d for d in texts["books"] if seen[d]]
    assert len(books) == 4 and all(seen[d] == 1 for d in books)  # round(0.5 * 7) = 4 of the 7
    assert sum(seen.values()) == 40 + 45 + 4
    stats = it.stats
    assert stats["documents"] == 89
    assert stats["documents_by_source"] == {"web": 40, "code": 45, "books": 4}
    assert stats["tokens"] == sum(len(d.encode()) + 2 for d in seen.elements())
    assert stats["target_tokens"] == stats["tokens"] - stats["documents"]
    assert 0 < stats["padding_fraction"] < 0.05  # only the last row and the empty rows of the last batch


def test_mixture_proportions_in_documents(tmp_path):
    manifest, _ = make_sources(tmp_path, sizes=(("a", 400, 1.0, 1.0), ("b", 400, 3.0, 1.0)))
    it = PretrainDataIterator(manifest, TOK, seq_len=64, batch_size=4, seed=5)
    take(it, 40)  # about 300 documents, well before either source runs out
    by_source = it.stats["documents_by_source"]
    assert by_source["b"] / (by_source["a"] + by_source["b"]) == pytest.approx(0.75, abs=0.07)


def test_deterministic_and_seed_dependent(tmp_path):
    manifest, _ = make_sources(tmp_path)
    a = take(PretrainDataIterator(manifest, TOK, 32, 2, seed=7), 6)
    b = take(PretrainDataIterator(manifest, TOK, 32, 2, seed=7), 6)
    c = take(PretrainDataIterator(manifest, TOK, 32, 2, seed=8), 6)
    assert_same_batches(a, b)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(("n", "m", "split_documents", "repeat"), [
    (3, 5, True, True),     # a document cut at the batch boundary (seq_len 24, documents up to ~100 tokens)
    (30, 40, True, True),   # across the end of a round (about 55 batches) into the next one
    (4, 6, False, True),
    (25, 10, True, False),  # to the end of the data: the padded last batch, then StopIteration
])
def test_resume_gives_exactly_the_next_batches(tmp_path, n, m, split_documents, repeat):
    manifest, _ = make_sources(tmp_path, bad_every=9)
    kwargs = dict(seq_len=24, batch_size=4, seed=11, split_documents=split_documents, repeat=repeat)
    first = PretrainDataIterator(manifest, TOK, **kwargs)
    take(first, n)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    if n == 3:
        assert state["carry"] is not None and state["carry"]["offset"] > 0
    assert len(json.dumps(state)) < 4000
    expected = list(first)[:m] if not repeat else take(first, m)
    resumed = PretrainDataIterator(manifest, TOK, **kwargs, state=state)
    got = list(resumed)[:m] if not repeat else take(resumed, m)
    assert_same_batches(expected, got)
    assert resumed.stats == first.stats  # statistics continue too (bad records included)
    if n + m >= 35:
        assert first.stats["bad_records"] > 0
    if n == 30:
        assert state["mixture"]["round"] == 0 and resumed.get_state()["mixture"]["round"] == 1
    if not repeat:
        with pytest.raises(StopIteration):
            next(resumed)


def test_resume_refuses_a_different_setup(tmp_path):
    manifest, _ = make_sources(tmp_path)
    it = PretrainDataIterator(manifest, TOK, 32, 2, seed=1)
    next(it)
    state = it.get_state()
    with pytest.raises(ValueError, match="seed: state has 1, this iterator 2"):
        PretrainDataIterator(manifest, TOK, 32, 2, seed=2, state=state)
    other, _ = make_sources(tmp_path, sizes=(("web", 40, 1.0, 2.0),))
    with pytest.raises(ValueError, match="manifest_hash"):
        PretrainDataIterator(other, TOK, 32, 2, seed=1).set_state(state)
    with pytest.raises(ValueError, match="process_count"):
        PretrainDataIterator(manifest, TOK, 32, 2, seed=1, process_count=2).set_state(state)


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_read_disjoint_parts_that_cover_everything(tmp_path, process_count):
    manifest, texts = make_sources(tmp_path, sizes=(("web", 41, 1.0, 1.0), ("code", 16, 2.0, 1.0),
                                                    ("books", 5, 1.0, 1.0)))
    per_process = []
    for p in range(process_count):
        it = PretrainDataIterator(manifest, TOK, 40, 2, seed=0, process_index=p, process_count=process_count,
                                  repeat=False)
        per_process.append([TOK.decode(d) for d in documents_from_rows(list(it))])
    for docs in per_process:
        assert len(docs) == len(set(docs))
    seen = [set(docs) for docs in per_process]
    for i in range(process_count):
        for j in range(i + 1, process_count):
            assert not seen[i] & seen[j]
    assert set().union(*seen) == {d for docs in texts.values() for d in docs}


def test_real_tokenizer_documents_are_bos_text_eos(tmp_path):
    from tokenizer_testing import train_small_tokenizer

    tokenizer = train_small_tokenizer(tmp_path)
    docs = ["def f(x):\n    return x + 1\n", "plain <|im_start|> text stays text", "中文 and English"]
    write_jsonl(tmp_path / "d.jsonl", docs)
    it = PretrainDataIterator([{"path": str(tmp_path / "d.jsonl"), "format": "jsonl", "source": "s"}], tokenizer,
                              seq_len=256, batch_size=1, shuffle=False, repeat=False)
    batch = next(it)
    check_row_invariants(batch, 256, tokenizer.pad_id)
    rebuilt = documents_from_rows([batch])
    assert len(rebuilt) == 3
    im_start = tokenizer.special_tokens["<|im_start|>"]
    for doc, ids in zip(docs, rebuilt, strict=True):
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert tokenizer.decode(ids[1:-1].tolist()) == doc
        assert im_start not in ids  # document content is plain text
    assert it.get_state()["tokenizer_sha256"] == tokenizer.sha256
