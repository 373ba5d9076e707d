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


# ---- whole examples: SFT conversations and preference pairs -------------------------------------------------------

Sequence_ = tuple[np.ndarray, np.ndarray]  # (token ids, per-token trained mask), e.g. from ChatTemplate.encode


def example_length(example: Sequence[Sequence_]) -> int:
    return sum(len(ids) for ids, _ in example)


class ExamplePacker:
    """Lays whole examples (one or more sequences each) into rows, in arrival order, never cutting one: an example
    that does not fit what is left of the row closes it (padded) and starts the next. Each sequence is its own
    segment, positions restart at 0, and `loss_mask[t]` is the trained mask of token t + 1 of the same sequence, so
    only trained tokens are predicted (for chat: assistant content and its `<|im_end|>`).

    `max_examples` caps the examples per row (preference rows: `pair_mask` has that many slots); with
    `pairs=True` every example is a (chosen, rejected) pair and rows carry `pair_mask [max_examples]`.
    """

    def __init__(self, seq_len: int, pad_id: int, *, max_examples: int | None = None, pairs: bool = False):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if pairs and not max_examples:
            raise ValueError("preference rows need max_examples (the number of pair slots per row)")
        self.seq_len, self.pad_id, self.max_examples, self.pairs = seq_len, pad_id, max_examples, pairs
        self._row: RowBuilder | None = None
        self._count = 0

    def fits(self, example: Sequence[Sequence_]) -> bool:
        """Whether the example fits an empty row at all (callers drop or truncate those that do not)."""
        return example_length(example) <= self.seq_len

    def add(self, example: Sequence[Sequence_]) -> dict[str, np.ndarray] | None:
        """Adds one example; returns the row it closed, if adding it closed one."""
        if not self.fits(example):
            raise ValueError(f"an example of {example_length(example)} tokens does not fit a row of {self.seq_len}")
        if self.pairs and len(example) != 2:
            raise ValueError(f"a preference example is (chosen, rejected), got {len(example)} sequences")
        closed = None
        full = self.max_examples is not None and self._count >= self.max_examples
        if self._row is not None and (full or example_length(example) > self._row.room):
            closed = self.flush()
        if self._row is None:
            self._row = RowBuilder(self.seq_len, self.pad_id)
        for ids, trained in example:
            ids, trained = np.asarray(ids, np.int32), np.asarray(trained, np.float32)
            if len(ids) != len(trained) or not len(ids):
                raise ValueError(f"a sequence needs ids and a trained mask of one non-zero length, got "
                                 f"{len(ids)} and {len(trained)}")
            start = self._row.used
            self._row.add(ids, next_token=None)
            self._row.row["loss_mask"][start:start + len(ids) - 1] = trained[1:]
        self._count += 1
        return closed

    def flush(self) -> dict[str, np.ndarray] | None:
        """The row being filled (padded), or None when it is empty."""
        if self._row is None:
            return None
        row = self._row.finish()
        if self.max_examples is not None and self.pairs:
            row["pair_mask"] = (np.arange(self.max_examples) < self._count).astype(np.float32)
        self._row, self._count = None, 0
        return row


def pack_examples(examples: Iterable[Sequence[Sequence_]], seq_len: int, pad_id: int, *,
                  max_examples: int | None = None, pairs: bool = False) -> dict[str, np.ndarray]:
    """Packs whole examples into `[rows, seq_len]` arrays (plus `pair_mask [rows, max_examples]` for pairs)."""
    packer = ExamplePacker(seq_len, pad_id, max_examples=max_examples, pairs=pairs)
    rows = [row for example in examples if (row := packer.add(example)) is not None]
    if (last := packer.flush()) is not None:
        rows.append(last)
    fields = PACKED_FIELDS + (("pair_mask",) if pairs else ())
    if not rows:
        empty = empty_rows(0, seq_len, pad_id)
        if pairs:
            empty["pair_mask"] = np.zeros((0, max_examples), np.float32)
        return empty
    return {name: np.stack([row[name] for row in rows]) for name in fields}
