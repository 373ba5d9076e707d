"""Answer extraction: turn a model's free-form output into the string a metric compares with the reference.

OpenCompass's postprocessors mis-score silently: the first capital letter of "Apple" counts as option A, the last
number of "The answer is 18. Check: 16 - 7 = 9" wins over the stated answer, and an output with no answer
becomes a wrong prediction nobody looks at. Here an answer the model states outright always beats letters and
numbers met in its reasoning, and `check_extraction` fails the run when too many outputs yield nothing.

Every extractor returns "" when it finds no answer, never None, so the empty share can be counted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

__all__ = [
    "POSTPROCESSORS",
    "ExtractionError",
    "check_extraction",
    "extract_code",
    "first_capital",
    "first_option",
    "get_postprocessor",
    "gsm8k_answer",
]


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice

# "A" and "I" are English words as well as options. Sentence-initially they are capitalised and followed by a
# lowercase word ("A careful reading...", "I think..."), which an option letter rarely is, except "A is correct".
_WORD_LIKE = re.compile(r"\s+(?!is\b)[a-z]")


def _letter(options: str) -> str:
    """An option letter after an explicit cue. A lowercase letter counts only when delimited ("(b)", "b.", "b" at
    the end), because "the answer is a prime" uses "a" as an article; an uppercase one needs only to stand alone.
    A pattern built on it has no other capturing groups."""
    up, low = options.upper(), options.lower()
    return (rf"\**\s*(?:[(（]\s*([{up}{low}])\s*[)）]|(?<![A-Za-z0-9])(?:([{up}])(?![A-Za-z0-9])"
            rf"|([{low}])(?=\**\s*(?:[.,;:!?)。，；：！？]|$))))")


@functools.lru_cache(maxsize=16)
def _option_patterns(options: str) -> tuple[re.Pattern[str], ...]:
    """The cascade, most explicit first: the first pattern that matches anywhere decides, so an explicit
    statement wins even when the reasoning mentions other letters before or after it."""
    if not options.isascii() or not options.isalpha():
        raise ValueError(f"options must be ASCII letters, got {options!r}")
    letter, up = _letter(options), options.upper()
    patterns = [
        rf"\\boxed\{{{letter}\s*\}}",
        # 答案是C, 答案为C, 答案：C, 答案选C, 答案应该是C, 正确答案是C (its tail is 答案是C).
        rf"答案\s*(?:应该|应当|应)?\s*(?:是|为|选择|选)?\s*[:：]?\s*(?:选项)?{letter}",
        # "The answer is (C)", "the correct option is C", "The best choice would be C", "my final answer is: c."
        rf"(?i:\b(?:answer|option|choice)(?:\s+to\s+(?:the|this)\s+question)?\s+(?:is|would\s+be|should\s+be|"
        rf"must\s+be|will\s+be)\s*:?)\s*(?i:(?:option|choice)\s+)?{letter}",
        # "Answer: C", "**Final Answer:** (C)"
        rf"(?i:\banswer)\**\s*[:：]\s*(?i:(?:option|choice)\s+)?{letter}",
        # 故选C, 所以选C, 选择C, but not 不选A; 选项A on its own names an option without choosing it.
        rf"(?<!不)选(?:择|定)?\s*[:：]?\s*{letter}",
        # 选项C正确, C选项正确, C是正确的 (never 不正确: the 不 sits between the letter and 正确).
        rf"(?<![A-Za-z0-9])([{up}])\s*(?:选?项)?\s*(?:是|为)?\s*正确",
        # "C is correct", "(C) is the right answer", not "C is incorrect" or "C is not correct".
        rf"{letter}\s+(?i:is\s+(?:the\s+)?(?:correct|right|best)\b)",
        # A conclusion that ends its line: "Therefore, B.", "So (B)", "所以B。", after a walk through the options.
        rf"(?:(?i:\b(?:therefore|thus|hence|so))[,:\s]+|(?:因此|所以|故|即)[，,：:\s]*)[(（]?([{up}])[)）]?[.。!！]?\**\s*$",
        # An output that opens with its answer: "B", "B. Paris", "(B) Paris", "B: Paris"; never "A careful...".
        rf"\A\s*\**[(（]?([{up}])(?:[.)）:：,，]|\**\s*$)",
        rf"[(（]([{up}])[)）]",
        rf"^\s*([{up}])[.)）]",
    ]
    return tuple(re.compile(p, re.MULTILINE) for p in patterns)


def first_capital(text: str, options: str = "ABCD") -> str:
    """The first option letter that stands alone ("Apple ... B" -> "B"); "" when none."""
    for m in re.finditer(rf"(?<![A-Za-z0-9])[{options}](?![A-Za-z0-9])", text):
        if m.group() in "AI" and _WORD_LIKE.match(text, m.end()):
            continue
        return m.group()
    return ""


def first_option(text: str, options: str = "ABCD") -> str:
    """The option the text states as its answer (see `_option_patterns`), else the first standalone letter.
    Lowercase letters count after an explicit cue ("the answer is b." -> "B"), never on their own."""
    for pattern in _option_patterns(options):
        m = pattern.search(text)
        if m:
            return next(g for g in m.groups() if g).upper()
    return first_capital(text, options.upper())


# ----------------------------------------------------------------------------------------------------------------
# GSM8K

# Thousands separators only in groups of three, so "1,2,3" stays three numbers. No minus after a digit or letter,
# so "16-3" is 16 and 3, not 16 and -3 (U+2212 is a minus too); ASCII letters only, as "答案是18" has no space.
_NUMBER = r"(?<![A-Za-z0-9_.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
# The first statement of the answer; "answer:" also covers "Final Answer:".
_ANSWER_MARKER = re.compile(r"(?i:the\s+(?:final\s+)?answer\s+is)|####|(?i:answer)\**\s*[:：]|答案(?:是|为|[:：])"
                            r"|\\boxed\{")
# A statement can show its working ("The answer is 3 + 4 = 7"): skip operands, keep the result. The group is
# atomic, or backtracking would read "345 + 1" as the operand-free "34".
_RESULT = re.compile(rf"(?>{_NUMBER})(?!\s*[-−+*/×xX÷=]\s*\$?[-−]?\d)")
# A base model under a few-shot prompt keeps writing the next "Question:" and its numbers.
_NEXT_QUESTION = re.compile(r"\n\s*Question:")


def _normalise(number: str) -> str:
    number = number.replace(",", "").replace("−", "-")
    if "." in number and "/" not in number:
        number = number.rstrip("0").rstrip(".")  # "12.0" -> "12", "0.50" -> "0.5"; the integer part has no "."
    return "0" if number == "-0" else number


def gsm8k_answer(text: str) -> str:
    """The number in the first stated answer ("The answer is", "####", "answer:", "答案是", "\\boxed{"), that
    sentence only, so numbers in a check after it never win; else the last number in the text; "" when none."""
    text = _NEXT_QUESTION.split(text, maxsplit=1)[0]
    for marker in _ANSWER_MARKER.finditer(text):
        rest = text[marker.end():].lstrip()
        sentence = re.split(r"\.(?!\d)|[\n。!?！？]", rest, maxsplit=1)[0]
        m = _RESULT.search(sentence)
        if m:
            return _normalise(m.group())
    numbers = re.findall(_NUMBER, text)
    return _normalise(numbers[-1]) if numbers else ""


# ----------------------------------------------------------------------------------------------------------------
# Code

# The fence need not start a line (models write "Here it is: ```python"); a block the model never closed runs
# to the end of the text rather than being dropped.
_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_LANGUAGE_TAGS = {"python": frozenset({"python", "py", "python3"})}


def extract_code(text: str, language: str = "python") -> str:
    """The first fenced block tagged with `language`, else the first fenced block, else the text itself."""
    tags = _LANGUAGE_TAGS.get(language.lower(), frozenset({language.lower()}))
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if not blocks:
        return text
    body = next((body for tag, body in blocks if tag in tags), blocks[0][1])
    # Leading indentation is kept: a HumanEval completion may begin inside the function body.
    return body.rstrip().lstrip("\n")


# ----------------------------------------------------------------------------------------------------------------
# Guard and registry


class ExtractionError(ValueError):
    """Too many outputs yielded no answer: the prompt, the model or the postprocessor is wrong, not the model's
    knowledge, and scoring would report it as a low accuracy."""


def check_extraction(extracted: Sequence[str], *, max_empty_share: float = 0.1, dataset: str = "",
                     outputs: Sequence[str] | None = None) -> None:
    """Raise ExtractionError when more than `max_empty_share` of `extracted` are empty (or whitespace), showing
    up to three of the raw `outputs` behind them."""
    if not 0.0 <= max_empty_share <= 1.0:
        raise ValueError(f"max_empty_share must lie in [0, 1], got {max_empty_share}")
    if outputs is not None and len(outputs) != len(extracted):
        raise ValueError(f"{len(outputs)} outputs for {len(extracted)} extracted predictions")
    empty = [i for i, answer in enumerate(extracted) if not answer.strip()]
    # Division, not empty > share * n: k / n rounds to the same float as the literal share, the product may not.
    if not extracted or len(empty) / len(extracted) <= max_empty_share:
        return
    share = len(empty) / len(extracted)
    lines = [f"{dataset or 'evaluation'}: {len(empty)} of {len(extracted)} predictions ({share:.1%}) extracted to "
             f"an empty answer, above the allowed {max_empty_share:.1%}; check the prompt and the postprocessor."]
    if outputs is not None:
        lines.append("Raw outputs with no answer:")
        lines += [f"  [{i}] {outputs[i][:300]!r}" for i in empty[:3]]
    raise ExtractionError("\n".join(lines))


POSTPROCESSORS: dict[str, Callable[[str], str]] = {
    "first_capital": first_capital,
    "first_option": first_option,
    "gsm8k": gsm8k_answer,
    "code": extract_code,
    "strip": str.strip,
}


def get_postprocessor(name: str) -> Callable[[str], str]:
    try:
        return POSTPROCESSORS[name]
    except KeyError:
        raise KeyError(f"unknown postprocessor {name!r}; registered: {', '.join(sorted(POSTPROCESSORS))}") from None
