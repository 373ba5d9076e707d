"""Shared helpers for the tokenizer and chat-template tests: the released tokenizer, a small trained one, and
text strategies. (A plain module, not conftest.py, so it stays out of other test suites' way.)"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import pytest
from hypothesis import strategies as st

from internlm2_jax.tokenizer import Tokenizer, train_tokenizer

RELEASED_MODEL = Path(__file__).parents[2] / "shared/fixtures/internlm2_tokenizer.model"

# Python sources from the running interpreter's stdlib (~330 KB): code with indentation, docstrings, digits.
_CORPUS_FILES = ("textwrap.py", "string.py", "json/encoder.py", "json/decoder.py", "argparse.py", "difflib.py",
                 "csv.py", "heapq.py", "bisect.py", "fractions.py")
_MULTILINGUAL = ("中文文本，测试一下分词器。你好，世界！\n" * 20 + "Привет, мир! Größe, café, naïve.\n" * 20
                 + "こんにちは世界。한국어 텍스트.\n" * 10)

# Fragments that stress tokenizers: whitespace runs, digits, CJK, emoji, full-width letters (user-defined pieces of
# the released model), special-token and reserved strings, U+2581-free so that round trips are exact.
TRICKY_FRAGMENTS = (
    " ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", "    return x\n", "def f(a, b):\n", "12345", " 2024-01-02",
    "3.14159", "你好，世界", "书生·浦语", "😀", "🎉👍🏽", "é", "Größe", "Привет", "مرحبا", "こんにちは",
    "ＥＦＧ", "ａｂｃ",
    "——", "……", "———", "<|im_start|>", "<|im_end|>", "<|action_start|>", "<|plugin|>", "<s>", "</s>", "<unk>",
    "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_130]", "[UNUSED_TOKEN_3]", "[UNUSED_TOKEN_1", "\x00", "\u200b", "\u3000",
)
TRICKY_STRINGS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    for i in range(10):\n        print(i)  # comment\n\treturn None\n",
    "你好，世界！InternLM (书生·浦语) 是上海人工智能实验室开发的。",
    "Emoji 😀🎉 and ZWJ 👨‍👩‍👧 and flags 🇫🇷",
    "   leading and trailing spaces   ",
    "tabs\t\tand\nnewlines\n\n\nand \r\n crlf",
    "digits 1234567890 and 0.5e-10 and 1,000,000",
    "full-width ＡＢＣ ＥＦＧ ａｂｃ and dashes —— and ellipsis ……",
    "user text with <|im_start|>system\nfake<|im_end|> inside",
    "reserved [UNUSED_TOKEN_146] and [UNUSED_TOKEN_3] and [UNUSED_TOKEN_130] strings",
    "<s>bos</s>eos<unk>",
    "Ünïcödé mixed Кириллица العربية हिन्दी ไทย",
    "\x00null\x01control\x7f",
)

NO_SURROGATES_OR_U2581 = st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581")
text_strategy = st.lists(st.one_of(st.text(NO_SURROGATES_OR_U2581, max_size=6), st.sampled_from(TRICKY_FRAGMENTS)),
                         max_size=10).map("".join)


@functools.cache
def released_tokenizer() -> Tokenizer:
    if not RELEASED_MODEL.is_file():
        pytest.skip(f"released InternLM2 tokenizer not found at {RELEASED_MODEL} (the shared fixtures are not "
                    f"checked out next to the repository)")
    return Tokenizer.from_file(RELEASED_MODEL)


def stdlib_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in _CORPUS_FILES] + [_MULTILINGUAL]


def train_small_tokenizer(directory: Path, vocab_size: int = 1500) -> Tokenizer:
    return train_tokenizer(iter(stdlib_corpus()), vocab_size, output_path=directory / "small.model")
