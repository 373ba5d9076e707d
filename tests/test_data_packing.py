"""Packing invariants (spec §9.1): segment ids, positions restarting per document, no target across a document
boundary, long documents split with the token before the cut keeping its target, padding, and packed == unpacked."""

import numpy as np
import pytest
from test_data_support import check_row_invariants, documents_from_rows

from internlm2_jax.data import pack_documents
from internlm2_jax.data.packing import SequentialPacker

PAD = 0


def random_documents(seed: int, count: int, max_len: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1000, size=int(rng.integers(2, max_len + 1))).astype(np.int32) for _ in range(count)]


def unpacked_pairs(doc: np.ndarray) -> list[tuple[int, int]]:
    return [(int(doc[i]), int(doc[i + 1])) for i in range(len(doc) - 1)]


def packed_pairs_by_document(packed: dict[str, np.ndarray]) -> list[list[tuple[int, int, int]]]:
    """(input, target, position) of every token with a loss, grouped by document (cut pieces joined)."""
    docs, continuing = [], False
    for row in range(packed["input_ids"].shape[0]):
        seg = packed["segment_ids"][row]
        for s in range(1, int(seg.max()) + 1 if seg.any() else 1):
            idx = np.flatnonzero(seg == s)
            triples = [(int(packed["input_ids"][row, i]), int(packed["targets"][row, i]),
                        int(packed["positions"][row, i])) for i in idx if packed["loss_mask"][row, i] == 1]
            if continuing and s == 1:
                docs[-1].extend(triples)
            else:
                docs.append(triples)
            continuing = bool(packed["loss_mask"][row, idx[-1]] == 1)
    return docs


@pytest.mark.parametrize("split_documents", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_packing_invariants_and_nothing_lost(seed, split_documents):
    seq_len = 32
    docs = random_documents(seed, 40, max_len=3 * seq_len)
    packed = pack_documents(docs, seq_len, PAD, split_documents=split_documents)
    check_row_invariants(packed, seq_len, PAD)
    rebuilt = documents_from_rows([packed])
    assert len(rebuilt) == len(docs)
    for original, again in zip(docs, rebuilt, strict=True):
        np.testing.assert_array_equal(original, again)
    # Every next-token pair of every document is trained on exactly once, and no other pair is.
    packed_docs = packed_pairs_by_document(packed)
    for doc, triples in zip(docs, packed_docs, strict=True):
        assert [(i, t) for i, t, _ in triples] == unpacked_pairs(doc)
    assert packed["loss_mask"].sum() == sum(len(d) - 1 for d in docs)


def test_sequential_packing_has_no_padding_but_the_last_row():
    seq_len = 16
    docs = random_documents(7, 30, max_len=20)
    packed = pack_documents(docs, seq_len, PAD)
    total = sum(len(d) for d in docs)
    assert packed["input_ids"].shape[0] == -(-total // seq_len)
    assert (packed["segment_ids"][:-1] > 0).all()
    assert (packed["segment_ids"][-1] > 0).sum() == total - seq_len * (packed["input_ids"].shape[0] - 1)


def test_packed_equals_unpacked_triples_for_documents_that_fit():
    """Documents no longer than a row are never cut in no-split mode: (input, target, position) are exactly the
    unpacked document's, positions from 0."""
    seq_len = 24
    docs = random_documents(3, 50, max_len=seq_len)
    packed = pack_documents(docs, seq_len, PAD, split_documents=False)
    for doc, triples in zip(docs, packed_pairs_by_document(packed), strict=True):
        assert triples == [(int(doc[i]), int(doc[i + 1]), i) for i in range(len(doc) - 1)]
    # Padding exists here (documents are kept whole) and is fully masked.
    pad = packed["segment_ids"] == 0
    assert pad.any()
    assert (packed["loss_mask"][pad] == 0).all() and (packed["input_ids"][pad] == PAD).all()
    assert (packed["targets"][pad] == PAD).all() and (packed["positions"][pad] == 0).all()


def test_long_document_is_split_into_chunks_that_restart_positions():
    seq_len = 8
    doc = np.arange(100, 100 + 21, dtype=np.int32)  # 21 tokens: chunks of 8, 8, 5
    packed = pack_documents([doc], seq_len, PAD, split_documents=False)
    assert packed["input_ids"].shape == (3, 8)
    np.testing.assert_array_equal(packed["input_ids"][0], doc[:8])
    np.testing.assert_array_equal(packed["input_ids"][1], doc[8:16])
    for row in range(3):
        used = int((packed["segment_ids"][row] > 0).sum())
        np.testing.assert_array_equal(packed["positions"][row][:used], np.arange(used))
    # The token before each cut keeps its true target (the first token of the next chunk) and its loss.
    assert packed["targets"][0, -1] == doc[8] and packed["loss_mask"][0, -1] == 1
    assert packed["targets"][1, -1] == doc[16] and packed["loss_mask"][1, -1] == 1
    # The document's last token has no target; the rest of the last row is padding.
    assert packed["loss_mask"][2, 4] == 0 and packed["targets"][2, 4] == PAD
    assert (packed["segment_ids"][2, 5:] == 0).all()


def test_no_split_mode_moves_a_document_to_the_next_row():
    seq_len = 8
    a, b = np.full(5, 10, np.int32), np.full(6, 20, np.int32)
    kept = pack_documents([a, b], seq_len, PAD, split_documents=False)
    np.testing.assert_array_equal(kept["segment_ids"], [[1] * 5 + [0] * 3, [1] * 6 + [0] * 2])
    cut = pack_documents([a, b], seq_len, PAD, split_documents=True)
    np.testing.assert_array_equal(cut["segment_ids"], [[1] * 5 + [2] * 3, [1] * 3 + [0] * 5])
    np.testing.assert_array_equal(cut["positions"][1, :3], [0, 1, 2])
    assert cut["loss_mask"][0, -1] == 1 and cut["targets"][0, -1] == 20


def test_packer_rejects_tiny_rows_and_empty_input():
    with pytest.raises(ValueError, match="seq_len"):
        SequentialPacker(1, PAD)
    assert pack_documents([], 8, PAD)["input_ids"].shape == (0, 8)
