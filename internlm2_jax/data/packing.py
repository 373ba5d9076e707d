"""Packing tokenized documents into fixed-length rows with segment ids (spec §9.1, InternEvo's packed dataset).

Each document arrives as `<s> tokens </s>` ids. Rows of `seq_len` are filled **sequentially**: documents are laid one
after another in the order they come, and a document that does not fit into what is left of a row is cut there and
continues at the start of the next row (with `split_documents=True`, the default, InternEvo's behaviour: no padding
except at the very end of the data). With `split_documents=False` a document that would fit into an empty row is not
cut: the row is padded and the document starts the next one; only documents longer than a row are still cut.

Sequential packing was chosen over first-fit/best-fit because its whole state is one number, where the current
document was cut, which makes the iterator's resume state tiny and exact (first-fit keeps a window of open rows).

Per row (all `[seq_len]`):
- `input_ids` (int32): the tokens; padding is `pad_id`.
- `segment_ids` (int32): 1, 2, ... for the pieces of documents in the row, in order; 0 is padding.
- `positions` (int32): restart at 0 for every piece, so a continued document restarts its positions (InternEvo).
- `targets` (int32): the next token of the same document; `pad_id` where there is none.
- `loss_mask` (float32): 1 where `targets` is real. 0 for padding and for a document's last token (`</s>`: its
  "next token" would be the next document's `<s>`). The last token before a cut keeps its true target (the first
  token of the continuation) and its loss, so no target is lost by packing and none crosses a document boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

PACKED_FIELDS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")
_DTYPES = {"input_ids": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
           "loss_mask": np.float32}


def empty_rows(num_rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """All-padding rows (segment 0, loss 0): what a final partial batch is filled up with."""
    rows = {name: np.zeros((num_rows, seq_len), dtype) for name, dtype in _DTYPES.items()}
    rows["input_ids"][:] = pad_id
    rows["targets"][:] = pad_id
    return rows


class RowBuilder:
    """One row being filled; `add` appends a piece of a document, `finish` pads the rest."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.row = {name: value[0] for name, value in empty_rows(1, seq_len, pad_id).items()}
        self.used = 0
        self.num_segments = 0

    @property
    def room(self) -> int:
        return self.seq_len - self.used

    def add(self, piece: np.ndarray, next_token: int | None) -> None:
        """Appends `piece` as a new segment. `next_token` is the document's token after the piece when the document
        continues in the next row (the piece's last token then keeps its target), None when the piece ends it."""
        n = len(piece)
        if not 0 < n <= self.room:
            raise ValueError(f"a piece of {n} tokens does not fit the {self.room} tokens left in the row")
        start, end = self.used, self.used + n
        self.num_segments += 1
        row = self.row
        row["input_ids"][start:end] = piece
        row["segment_ids"][start:end] = self.num_segments
        row["positions"][start:end] = np.arange(n)
        row["targets"][start:end - 1] = piece[1:]
        row["loss_mask"][start:end - 1] = 1.0
        if next_token is not None:
            row["targets"][end - 1] = next_token
            row["loss_mask"][end - 1] = 1.0
        self.used = end

    def finish(self) -> dict[str, np.ndarray]:
        return self.row


@dataclasses.dataclass
class PackItem:
    """A tokenized document and how much of it has been packed already; `key` says where it came from (the iterator
    keeps it in its resume state)."""

    tokens: np.ndarray
    offset: int = 0
    key: Any = None


class SequentialPacker:
    """Fills rows one at a time from a pull function of documents; `carry` is the document cut at the last row end."""

    def __init__(self, seq_len: int, pad_id: int, *, split_documents: bool = True):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len, self.pad_id, self.split_documents = seq_len, pad_id, split_documents
        self.carry: PackItem | None = None

    def next_row(self, pull: Callable[[], PackItem | None]) -> dict[str, np.ndarray] | None:
        """The next full row, or a padded last row when `pull` runs dry, or None when nothing is left at all."""
        builder = RowBuilder(self.seq_len, self.pad_id)
        while builder.room > 0:
            item = self.carry if self.carry is not None else pull()
            if item is None:
                break
            self.carry = item
            remaining = len(item.tokens) - item.offset
            if remaining <= builder.room:  # the rest of the document fits: it ends in this row
                builder.add(item.tokens[item.offset:], next_token=None)
                self.carry = None
            elif not self.split_documents and builder.used > 0 and remaining <= self.seq_len:
                break  # keep the document whole: pad this row, it starts the next one
            else:  # cut here; the continuation starts the next row with positions from 0
                cut = item.offset + builder.room
                builder.add(item.tokens[item.offset:cut], next_token=int(item.tokens[cut]))
                item.offset = cut
        return builder.finish() if builder.used > 0 else None


def pack_documents(documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, pad_id: int, *,
                   split_documents: bool = True) -> dict[str, np.ndarray]:
    """Packs already-tokenized documents (each `<s> ... </s>`, at least one token) into `[rows, seq_len]` arrays."""
    items = (PackItem(np.asarray(doc, np.int32)) for doc in documents)

    def pull() -> PackItem | None:
        for item in items:
            if len(item.tokens):
                return item
        return None

    packer = SequentialPacker(seq_len, pad_id, split_documents=split_documents)
    rows = []
    while (row := packer.next_row(pull)) is not None:
        rows.append(row)
    if not rows:
        return empty_rows(0, seq_len, pad_id)
    return {name: np.stack([row[name] for row in rows]) for name in PACKED_FIELDS}
