"""Answer postprocessors: golden (model output, expected answer) pairs a careful human would agree with, including
the cases OpenCompass's postprocessors mis-score, and the guard that fails a run whose answers went missing."""

from __future__ import annotations

import pytest

from internlm2_jax.eval.postprocess import (
    POSTPROCESSORS,
    ExtractionError,
    check_extraction,
    extract_code,
    first_capital,
    first_option,
    get_postprocessor,
    gsm8k_answer,
)

FIRST_CAPITAL = [
    ("B", "B"),
    ("  C\n", "C"),
    ("D.", "D"),
    ("(A)", "A"),
    ("Apple is a fruit, so B", "B"),  # OpenCompass: "A", the capital of "Apple"
    ("Based on the passage, C", "C"),  # OpenCompass: "B", the capital of "Based"
    ("Clearly D", "D"),  # OpenCompass: "C"
    ("DNA replication happens in the nucleus: A", "A"),
    ("A careful reading shows B", "B"),  # sentence-initial "A" followed by a word is the article
    ("A is the answer", "A"),  # ... but "A is" names the option
    ("A", "A"),
    ("A.", "A"),
    ("A, because the others are wrong", "A"),
    ("B and C are both wrong", "B"),
    ("选C", "C"),
    ("答案是B。", "B"),
    ("The option B", "B"),
    ("", ""),
    ("no capital letter here", ""),
    ("Every Fine Grain", ""),
    ("ABCD", ""),
    ("I think the answer is C", "C"),
    ("The answer: D!", "D"),
    ("option b", ""),  # lowercase letters never count on their own
]


@pytest.mark.parametrize("text, expected", FIRST_CAPITAL)
def test_first_capital(text, expected):
    assert first_capital(text) == expected


FIRST_OPTION = [
    # Chinese answer forms.
    ("答案是C", "C"),
    ("答案为C", "C"),
    ("答案：C", "C"),
    ("答案: C", "C"),
    ("答案选C", "C"),
    ("正确答案是C", "C"),
    ("故选C", "C"),
    ("选项C正确", "C"),
    ("选C", "C"),
    ("答案是 (C)", "C"),
    ("答案应该是D。", "D"),
    ("答案是：选项B", "B"),
    ("C选项正确，A和B都不对。", "C"),
    ("分析：选项A错误，因为它忽略了摩擦力；选项B错误。故选C。", "C"),
    ("选项A不正确，选项D正确。", "D"),  # 不正确 is not 正确
    ("不选A，选B", "B"),  # OpenCompass: "A"
    ("A说法错误，B说法错误，答案是D", "D"),
    ("答案是c", "C"),
    # English answer forms.
    ("The answer is (C)", "C"),
    ("The answer is C.", "C"),
    ("answer: C", "C"),
    ("Answer: C.", "C"),
    ("the correct option is C", "C"),
    ("The correct answer is option D, since the others fail.", "D"),
    ("C is correct", "C"),
    ("(C)", "C"),
    ("C. 42 meters", "C"),
    ("C) 42 meters", "C"),
    ("**Final Answer:** (B)", "B"),  # OpenCompass: "A", the letter in "Answer"
    ("The answer is **B**.", "B"),
    ("Therefore, the answer is $\\boxed{D}$.", "D"),
    ("The best choice would be A.", "A"),
    ("The answer to the question is B", "B"),
    # The explicit statement wins over letters in the reasoning, before or after it.
    ("The answer is B, because option A is wrong.", "B"),
    ("The answer is B. Option A ignores friction and (C) double counts it.", "B"),
    ("Option A ignores friction. Option C double counts it. The answer is B.", "B"),
    ("Let's check each option.\nA. wrong units\nB. wrong sign\nThe correct answer is (C).", "C"),  # OpenCompass: "A"
    ("Answer: B\nExplanation: A is wrong.", "B"),
    ("B is the best answer because A is wrong", "B"),
    ("解析：A项错误。B项错误。C项正确。D项错误。", "C"),  # OpenCompass: "A"
    ("答案是B。选项A的说法忽略了摩擦力。", "B"),
    ("A careful reading of the passage shows that the answer is D.", "D"),
    ("A is incorrect because it ignores friction. D is correct.", "D"),  # OpenCompass: "A"
    # A conclusion at the end of a line, after the options were walked through; the first standalone letter is "A".
    ("Consider option A. It is wrong.\nConsider option B. It is right.\nTherefore B.", "B"),
    ("A. wrong units\nB. wrong sign\nC. consistent\nSo C", "C"),
    ("A说法错误，B说法错误，所以C。", "C"),
    # Lowercase counts after an explicit cue, when the letter is delimited ("a" alone is an article).
    ("the answer is b", "B"),  # OpenCompass: "", it knows no lowercase
    ("the answer is b.", "B"),
    ("The answer is (d) because of symmetry.", "D"),
    ("answer: a", "A"),
    ("The answer is a prime number, so C", "C"),
    # An output that opens with its answer.
    ("B", "B"),
    ("B. Paris is the capital of France.", "B"),
    ("B\nBecause the capital of France is Paris, not (A) Lyon.", "B"),
    ("(D) All of the above", "D"),
    # Only the standalone fallback is left.
    ("Apple and Banana are fruits; I pick C", "C"),
    ("I would go with D", "D"),
    ("Hmm, hard to say. Maybe C?", "C"),
    # Nothing to extract.
    ("", ""),
    ("I don't know.", ""),
    ("None of these options seem right to me.", ""),
    ("The answer is a mystery.", ""),
    ("答案不确定。", ""),
]


@pytest.mark.parametrize("text, expected", FIRST_OPTION)
def test_first_option(text, expected):
    assert first_option(text) == expected


FIRST_OPTION_ABCDE = [
    ("The answer is E.", "E"),
    ("答案是E", "E"),
    ("E", "E"),
    ("Everything considered, E", "E"),
    ("Option F is not offered, the answer is (E)", "E"),
]


@pytest.mark.parametrize("text, expected", FIRST_OPTION_ABCDE)
def test_first_option_five_options(text, expected):
    assert first_option(text, options="ABCDE") == expected


def test_first_option_rejects_letters_outside_options():
    assert first_option("The answer is E.") == ""
    assert first_option("The answer is E.", options="ABCDE") == "E"
    with pytest.raises(ValueError, match="ASCII letters"):
        first_option("A", options="A-D")


GSM8K = [
    ("The answer is 18.", "18"),
    ("The answer is 18", "18"),
    ("#### 18", "18"),
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
    ("answer: 42", "42"),
    ("Final Answer: 42", "42"),
    ("答案是18", "18"),
    ("答案是：18元", "18"),
    # A number in the reasoning after the answer must not win (OpenCompass takes the last number).
    ("The answer is 18. Check: 16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "18"),
    ("The answer is 5. This is 2 more than 3", "5"),
    ("The answer is 12. Verification: 3 * 4 = 12, and 12 / 2 = 6.", "12"),
    ("The answer is 7.\n\nQuestion: Tom has 3 apples and buys 9 more.", "7"),
    # The first stated answer wins.
    ("The answer is 10. Wait, re-reading: the answer is 10.", "10"),
    # Working inside the statement: the result, not the first operand.
    ("The answer is 3 + 4 = 7.", "7"),
    ("The answer is $18 because 16 - 3 - 4 = 9.", "18"),
    ("#### 16 - 7 = 9", "9"),
    # No statement: the last number.
    ("Janet has 16 eggs. She eats 3 and bakes 4, so she sells 9 and makes 9 * 2 = 18 dollars.", "18"),
    ("So she has 5 apples left", "5"),
    ("42", "42"),
    ("The answer is: she makes 18 dollars.", "18"),
    ("The answer is clear once we add them up: 20 + 22 = 42", "42"),
    # Formatting.
    ("The answer is 1,234.", "1234"),
    ("The answer is $1,234,567.", "1234567"),
    ("The answer is 25%.", "25"),
    ("The answer is $18.00.", "18"),
    ("The answer is 12.0", "12"),
    ("The answer is 8 x 3 = 24", "24"),
    ("The answer is \u22125", "-5"),  # U+2212, the typographic minus
    ("The answer is 0.50", "0.5"),
    ("The answer is 3.75 hours.", "3.75"),
    ("The answer is -5.", "-5"),
    ("The temperature drops to -12 degrees", "-12"),
    ("The answer is 1/2.", "1/2"),
    ("She eats 1/2 of the pie", "1/2"),
    ("16-3=13", "13"),
    ("The numbers are 1,2,3", "3"),
    ("The answer is **18**.", "18"),
    ("The answer is \\boxed{18}.", "18"),
    ("\\boxed{1,000}", "1000"),
    ("The final answer is 100", "100"),
    # Nothing to extract.
    ("", ""),
    ("I cannot solve this problem.", ""),
    ("The answer is unknown.", ""),
]


@pytest.mark.parametrize("text, expected", GSM8K)
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


EXTRACT_CODE = [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1"),
    ("```py\nx = 1\n```", "x = 1"),
    ("```Python\nx = 1\n```", "x = 1"),
    ("```python3\nx = 1\n```", "x = 1"),
    ("Here it is:\n```python\nx = 1\n```\nThat sets x.", "x = 1"),
    ("Here it is: ```python\nx = 1\n```", "x = 1"),
    # Multiple blocks: the first python one, wherever it is.
    ("```python\nx = 1\n```\nAnd a test:\n```python\nassert x == 1\n```", "x = 1"),
    ("Run:\n```bash\npip install numpy\n```\nThen:\n```python\nimport numpy\n```", "import numpy"),
    ("```\nx = 1\n```\n```python\ny = 2\n```", "y = 2"),
    # No python block: the first block of any kind.
    ("```\nx = 1\n```", "x = 1"),
    ("```bash\nls\n```\n```text\nout\n```", "ls"),
    # No block: the text itself, untouched.
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),
    ("    return a + b", "    return a + b"),
    ("", ""),
    # Unterminated: the rest of the text.
    ("```python\ndef f():\n    return 1\n", "def f():\n    return 1"),
    ("Sure!\n```python\nx = 1\ny = 2", "x = 1\ny = 2"),
    ("```python\nx = 1\n```\n```python\ny = 2", "x = 1"),
    # The body's indentation survives; blank lines around it do not.
    ("```python\n    return a + b\n```", "    return a + b"),
    ("```python\n\n\ndef f():\n    pass\n\n\n```", "def f():\n    pass"),
    ("```python\nx = 1```", "x = 1"),
    ("```python title=solution.py\nx = 1\n```", "x = 1"),
]


@pytest.mark.parametrize("text, expected", EXTRACT_CODE)
def test_extract_code(text, expected):
    assert extract_code(text) == expected


def test_extract_code_other_language():
    text = "```python\nprint(1)\n```\n```cpp\nint main() {}\n```"
    assert extract_code(text, language="cpp") == "int main() {}"
    assert extract_code(text, language="rust") == "print(1)"


# ----------------------------------------------------------------------------------------------------------------
# check_extraction


def test_check_extraction_passes_at_the_threshold():
    check_extraction(["A"] * 9 + [""], max_empty_share=0.1)  # exactly 10%
    check_extraction(["A"] * 71 + [""] * 29, max_empty_share=0.29)  # 29 > 0.29 * 100 in floats, yet 29% passes
    check_extraction(["A", "B"])
    check_extraction([])
    check_extraction(["", ""], max_empty_share=1.0)


def test_check_extraction_fails_above_the_threshold_with_examples():
    extracted = ["A", "", "B", "", "", "", "C", "D", "A", "B"]
    outputs = [f"output {i}" if e else f"I am not sure about question {i}" for i, e in enumerate(extracted)]
    with pytest.raises(ExtractionError) as info:
        check_extraction(extracted, max_empty_share=0.3, dataset="mmlu_physics", outputs=outputs)
    message = str(info.value)
    assert message.startswith("mmlu_physics: 4 of 10 predictions (40.0%) extracted to an empty answer")
    assert "30.0%" in message
    assert "I am not sure about question 1" in message
    assert "question 3" in message and "question 4" in message
    assert "question 5" not in message  # at most three examples
    assert "output 0" not in message  # only outputs that yielded nothing


def test_check_extraction_one_over_the_threshold():
    with pytest.raises(ExtractionError, match=r"2 of 10 predictions \(20.0%\)") as info:
        check_extraction(["A"] * 8 + ["", "  "])  # whitespace is no answer either
    assert "Raw outputs" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_check_extraction_truncates_long_outputs():
    with pytest.raises(ExtractionError) as info:
        check_extraction([""], outputs=["x" * 10_000], dataset="gsm8k")
    assert len(str(info.value)) < 1000


def test_check_extraction_rejects_bad_arguments():
    with pytest.raises(ValueError, match="outputs"):
        check_extraction(["A", ""], outputs=["only one"])
    with pytest.raises(ValueError, match="max_empty_share"):
        check_extraction(["A"], max_empty_share=1.5)


def test_end_to_end_guard_on_extracted_outputs():
    outputs = ["The answer is B.", "Hmm.", "I refuse.", "答案是A"]
    extracted = [first_option(o) for o in outputs]
    assert extracted == ["B", "", "", "A"]
    with pytest.raises(ExtractionError, match="'Hmm.'"):
        check_extraction(extracted, dataset="ceval", outputs=outputs)


# ----------------------------------------------------------------------------------------------------------------
# Registry


def test_registry():
    assert set(POSTPROCESSORS) == {"first_capital", "first_option", "gsm8k", "code", "strip"}
    assert get_postprocessor("first_option")("The answer is (C)") == "C"
    assert get_postprocessor("first_capital")("Apple B") == "B"
    assert get_postprocessor("gsm8k")("The answer is 1,234.") == "1234"
    assert get_postprocessor("code")("```python\nx = 1\n```") == "x = 1"
    assert get_postprocessor("strip")("  Paris \n") == "Paris"


def test_unknown_postprocessor_lists_the_registered_names():
    with pytest.raises(KeyError) as info:
        get_postprocessor("first-capital")
    assert "'first-capital'" in str(info.value)
    for name in POSTPROCESSORS:
        assert name in str(info.value)
