"""Helpers shared by the data-pipeline tests (no tests here): a byte-level tokenizer that is instant and exactly
invertible, row decoding back into documents, and a packed-row invariant checker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from internlm2_jax.data import PACKED_FIELDS


class ByteTokenizer:
    """ids = UTF-8 bytes + 3; BOS 1, EOS 2, pad = EOS as in InternLM2."""

    bos_id, eos_id, pad_id = 1, 2, 2

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if i >= 3).decode("utf-8")


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def documents_from_rows(batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Reassembles the token sequences of documents from packed rows, in order: a piece whose last token has a loss
    (a cut, not a document end) continues in the first piece of the next row."""
    docs: list[list[int]] = []
    continuing = False
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][row]
            for s in range(1, int(seg.max()) + 1 if seg.any() else 1):
                idx = np.flatnonzero(seg == s)
                piece = batch["input_ids"][row][idx].tolist()
                if continuing and s == 1:
                    docs[-1].extend(piece)
                else:
                    assert not continuing, "a cut document must continue at the start of the next row"
                    docs.append(piece)
                continuing = bool(batch["loss_mask"][row][idx[-1]] == 1)
    assert not continuing, "the data ended in the middle of a document"
    return [np.asarray(d) for d in docs]


def check_row_invariants(batch: dict[str, np.ndarray], seq_len: int, pad_id: int) -> None:
    assert set(batch) == set(PACKED_FIELDS)
    for name in PACKED_FIELDS:
        assert batch[name].shape[1] == seq_len
        assert batch[name].dtype == (np.float32 if name == "loss_mask" else np.int32), name
    for row in range(batch["input_ids"].shape[0]):
        ids, tgt, pos, seg, mask = (batch[name][row] for name in ("input_ids", "targets", "positions",
                                                                  "segment_ids", "loss_mask"))
        used = int((seg > 0).sum())
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all(), "padding only at the end of a row"
        assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
        if used:
            assert seg[0] == 1
        assert (ids[used:] == pad_id).all() and (mask[used:] == 0).all() and (pos[used:] == 0).all()
        for s in range(1, int(seg.max()) + 1 if used else 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions restart per piece
            inner = idx[:-1]
            np.testing.assert_array_equal(tgt[inner], ids[inner + 1])  # targets within the piece
            assert (mask[inner] == 1).all()
            if mask[idx[-1]] == 0:  # a document's end: no target across the boundary
                assert tgt[idx[-1]] == pad_id
            else:  # a cut keeps its true target, and cuts happen only at the end of a full row
                assert idx[-1] == seq_len - 1
