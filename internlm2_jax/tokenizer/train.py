"""`train_tokenizer`: our own small SentencePiece BPE with InternLM2's settings, for tests and from-scratch runs.

The settings copy the released model's (spec §3.1): BPE, byte fallback, identity normalization, no dummy prefix,
whitespace kept as is, digits split; `<unk>`=0, `<s>`=1, `</s>`=2, no pad piece. Every special token (chat tokens
and the reward token `[UNUSED_TOKEN_130]`) is a user-defined piece of its own name, so `Tokenizer` finds them by
name exactly as in the released model, and the same chat-template and training code runs on both.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from internlm2_jax.tokenizer.special_tokens import ADDED_SPECIAL_TOKENS
from internlm2_jax.tokenizer.tokenizer import Tokenizer

# <unk>, <s>, </s> and the 256 byte pieces <0x00>..<0xFF> that byte_fallback needs.
_FIXED_PIECES = 3 + 256


def min_vocab_size() -> int:
    """The fewest pieces a trained model can have: the fixed pieces, the special tokens and one learned piece."""
    return _FIXED_PIECES + len(ADDED_SPECIAL_TOKENS) + 1


def _chunks(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Yields each text cut at line ends into chunks of at most `max_bytes` UTF-8 bytes.

    SentencePiece silently skips a sentence longer than `max_sentence_length`, which would drop whole documents
    (source files are one long "sentence" with newlines inside). A single line longer than the limit is cut at
    character boundaries.
    """
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer expects an iterable of str, got an item of type {type(text).__name__}")
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            line_size = len(line.encode("utf-8"))
            if size + line_size > max_bytes and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            while line_size > max_bytes:
                head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                yield head
                line = line[len(head):]
                line_size = len(line.encode("utf-8"))
            if line:
                chunk.append(line)
                size += line_size
        if chunk:
            yield "".join(chunk)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, output_path: str | Path,
                    max_sentence_length: int = 16384, num_threads: int = 2,
                    character_coverage: float = 1.0) -> Tokenizer:
    """Trains a SentencePiece BPE on `texts`, writes it to `output_path` (a `.model` file) and loads it.

    `texts` may be any iterable of documents (a generator is consumed once). `character_coverage` is
    SentencePiece's: the share of the corpus's characters that get a piece of their own (1.0: every character seen);
    the others are encoded as bytes.
    """
    if vocab_size < min_vocab_size():
        raise ValueError(f"vocab_size={vocab_size} is too small: it must hold <unk>, <s>, </s>, the 256 byte-fallback "
                         f"pieces and {len(ADDED_SPECIAL_TOKENS)} special tokens ({min_vocab_size() - 1} pieces) "
                         f"plus learned pieces, so at least {min_vocab_size()}")
    if max_sentence_length < 64:
        raise ValueError(f"max_sentence_length={max_sentence_length} bytes is too small to cut text into sentences")
    output_path = Path(output_path)
    input_errors: list[Exception] = []

    def sentences() -> Iterator[str]:
        # SentencePiece turns an exception raised by the iterator into an opaque RuntimeError; keep the original.
        try:
            yield from _chunks(texts, max_sentence_length)
        except Exception as e:  # any error of the caller's iterator, re-raised unchanged below
            input_errors.append(e)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become pieces, as in the release
            split_digits=True,
            max_sentencepiece_length=16,
            max_sentence_length=max_sentence_length,
            character_coverage=character_coverage,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=list(ADDED_SPECIAL_TOKENS),
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high" for a corpus with too few distinct merges
        if input_errors:
            raise input_errors[0] from None
        raise ValueError(f"SentencePiece training with vocab_size={vocab_size} failed: {e}") from e
    if input_errors:
        raise input_errors[0]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_bytes(model.getvalue())
    return Tokenizer.from_file(output_path)
