"""Passkey retrieval rows for the tiny long-context recipe (`experiments/long_context_tiny.py`): a number hidden at a
random depth of filler text, then asked for, packed into training rows with the loss weighted onto the answer.

The haystack itself is built by a `prompt(length, depth, number) -> ids` callable that the caller passes in (the
recipe hands it `eval.needle.haystack_prompt` over its filler), so the rows a model trains on are exactly the
prompts the needle sweep evaluates, at other lengths and depths. Each document is `prompt + answer(number) + </s>`
(`answer` is e.g. the ids of " 4821."); documents of random lengths are packed into rows (positions restart and
segment ids count up per document; the tail of a row that no document fits is padding, segment 0).

The loss weight is 1 where the target is an answer token or the closing </s>, `context_weight` elsewhere: the filler
is periodic, so full loss on it would teach nothing about retrieval and would swamp the handful of answer tokens.

Passkey rows alone do not teach a tiny model to retrieve in any affordable number of steps: retrieval is copying
(find the earlier "is", emit the digits that followed it, each found by the digits before it), i.e. induction heads,
and the answers give a few bits per document to find them with. A share `copy_share` of the documents are therefore
copy documents (`PasskeyRows.copy_document`: a random sequence, repeated, loss on the repeat), the classic
induction-head curriculum: dozens of copy targets per document. With them a 0.5M-parameter model goes through the
induction "phase change" within a few hundred steps and then retrieves (numbers in the README).

Rows are a pure function of (seed, process, row index), so the iterator's resume state is one counter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from internlm2_jax.tokenizer import Tokenizer, train_tokenizer

# The classic passkey filler (Mohtashami & Jaggi 2023, "Landmark Attention"), reworded: periodic, so the only thing
# in a haystack worth attending to is the needle.
# " is" is left out (it ends the needle's "The secret number is"), so only the needle and the question say it, and
# the filler starts with its space, so that a lone " " token (as before the answer's digits) is rare.
FILLER = " The grass grows green. The sky stays blue. The sun shines yellow. Here we go. There and back again."

Prompt = Callable[[int, float, int], list[int]]  # (length in tokens, depth in [0, 1], number) -> prompt ids
Answer = Callable[[int], list[int]]  # number -> answer ids (no </s>)


def passkey_tokenizer(path: str | Path, texts: Sequence[str], vocab_size: int = 384) -> Tokenizer:
    """A small SentencePiece BPE (digits split, as every tokenizer of ours) trained on `texts` with random
    numbers in place of `{number}`, written to `path`; loaded as it is when `path` already exists."""
    path = Path(path)
    if path.exists():
        return Tokenizer.from_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sample = ["".join(t.format(number=int(rng.integers(1000, 10000))) for t in texts) for _ in range(200)]
    return train_tokenizer(sample, vocab_size, output_path=path)


def pack_lengths(rng: np.random.Generator, seq_len: int, min_length: int, whole_row: float = 0.5) -> list[int]:
    """Document lengths (each >= min_length) filling a row of `seq_len` tokens: one document of the whole row with
    probability `whole_row` (the longest haystacks are the point), else random cuts."""
    if rng.random() < whole_row or seq_len < 2 * min_length:
        return [seq_len]
    lengths, left = [], seq_len
    while left >= min_length:
        n = int(rng.integers(min_length, left + 1))
        if left - n < min_length:
            n = left
        lengths.append(n)
        left -= n
    return lengths


class PasskeyRows:
    """Training rows of passkey documents: `next()` gives input_ids, targets, positions, segment_ids (int32) and
    loss_mask (float32), each [rows, seq_len], as the pretraining iterator does; resumable by `get_state`."""

    def __init__(self, prompt: Prompt, answer: Answer, *, seq_len: int, rows: int, eos_id: int, min_length: int,
                 seed: int = 0, whole_row: float = 0.5, context_weight: float = 0.0, copy_share: float = 0.0,
                 copy_tokens: Sequence[int] = (), bos_id: int = 1, process_index: int = 0, process_count: int = 1):
        self.prompt, self.answer, self.seq_len, self.rows, self.eos_id = prompt, answer, seq_len, rows, eos_id
        self.min_length, self.seed, self.whole_row = min_length, seed, whole_row
        self.context_weight, self.copy_share, self.bos_id = context_weight, copy_share, bos_id
        self.copy_tokens = np.asarray(copy_tokens, np.int32)
        if copy_share > 0 and len(self.copy_tokens) < 2:
            raise ValueError("copy documents need copy_tokens to draw from")
        self.process_index, self.process_count = process_index, process_count
        self.served = self.documents = 0
        answer_tokens = len(answer(1000)) + 1
        if min_length <= answer_tokens:
            raise ValueError(f"min_length={min_length} leaves no room for a haystack before the {answer_tokens} "
                             "answer tokens")

    def document(self, rng: np.random.Generator, total: int) -> tuple[list[int], list[int]]:
        """(ids, answer flags) of one document of exactly `total` tokens: prompt + answer + </s>, or (a share
        `copy_share` of documents) a copy document."""
        if self.copy_share and rng.random() < self.copy_share:
            return self.copy_document(rng, total)
        number = int(rng.integers(1000, 10000))
        answer = [*self.answer(number), self.eos_id]
        prompt = self.prompt(total - len(answer), float(rng.random()), number)
        return prompt + answer, [0] * len(prompt) + [1] * len(answer)

    def copy_document(self, rng: np.random.Generator, total: int) -> tuple[list[int], list[int]]:
        """BOS + a random sequence of `copy_tokens` + the same sequence again (+ padding to `total` with </s>): the
        classic induction task, loss on the repeat. Copying the answer out of a haystack is the same operation
        (find the earlier occurrence of the current token and its predecessor, emit what followed); a dense supply of
        it is what makes the induction heads form within a few hundred steps."""
        n = (total - 1) // 2
        seq = self.copy_tokens[rng.integers(0, len(self.copy_tokens), n)].tolist()
        pad = total - 1 - 2 * n
        # The repeat's first token is not predictable (nothing says the repeat starts): no loss on it.
        return [self.bos_id, *seq, *seq, *[self.eos_id] * pad], [0] * (2 + n) + [1] * (n - 1) + [0] * pad

    def row(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        fields = {k: np.zeros(self.seq_len, np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
        fields["loss_mask"] = np.zeros(self.seq_len, np.float32)
        # One token more than the row: every document's last target (its </s>) has its input inside the row.
        start = 0
        for segment, total in enumerate(pack_lengths(rng, self.seq_len + 1, self.min_length, self.whole_row), 1):
            ids, flags = self.document(rng, total)
            n = min(total - 1, self.seq_len - start)  # inputs of this document that fit the row
            ids, flags = np.asarray(ids), np.asarray(flags)
            fields["input_ids"][start:start + n] = ids[:n]
            fields["targets"][start:start + n] = ids[1:n + 1]
            fields["loss_mask"][start:start + n] = np.where(flags[1:n + 1] == 1, 1.0, self.context_weight)
            fields["positions"][start:start + n] = np.arange(n)
            fields["segment_ids"][start:start + n] = segment
            start += n
            if start >= self.seq_len:
                break
        return fields

    def __next__(self) -> dict[str, np.ndarray]:
        first = (self.served * self.process_count + self.process_index) * self.rows  # global row index
        rows = [self.row(first + i) for i in range(self.rows)]
        self.served += 1
        self.documents += sum(int(r["segment_ids"].max()) for r in rows)
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def get_state(self) -> dict:
        return {"served": self.served, "documents": self.documents}

    def set_state(self, state: dict) -> None:
        self.served, self.documents = int(state["served"]), int(state["documents"])

    @property
    def stats(self) -> dict:
        return {"batches": self.served, "documents": self.documents, "seq_len": self.seq_len}

    def data_hash(self) -> str:
        """A hash of what the rows are: the first two rows' tokens and the packing settings."""
        h = hashlib.sha256(repr((self.seq_len, self.min_length, self.seed, self.whole_row, self.context_weight,
                                 self.copy_share, self.copy_tokens.tolist())).encode())
        for i in range(2):
            h.update(self.row(i)["input_ids"].tobytes())
        return h.hexdigest()[:16]
