"""MathBench-like questions (agents.md §1.8, §3): three levels, by difficulty, of short math questions asked as cloze
(the answer itself) or as 4-option multiple choice, the way OpenCompass's MathBench asks them.

Levels: 1 arithmetic (sums, products, exact quotients, order of operations), 2 primary school (areas, fractions of
amounts, unit prices, means, time), 3 middle school (linear equations, percentage change, Pythagoras, polygon angles,
probabilities, slopes, powers); a difficulty above 3 is middle school with its numbers scaled by 10**(d - 3). A
kind gives the question, the Python lines that compute `answer`, the exact value and the mistakes people make with
it; the reference program is those lines, and the answer is what they compute here, so the two cannot disagree.

Multiple choice follows OpenCompass's CircularEval: the three distractors are the kind's typical mistakes, topped up
with near misses, all distinct from the answer and from each other; the question is emitted in its 4 rotations of
the options (4 problems, consecutive, sharing `meta["circular"]["group"]`), so the right letter is a different one in
each and a question counts as solved only when all four are answered. An MCQ's answer is its letter, and its program
prints the letter of the value it computes. Cloze answers are integers or fractions "p/q" (`str(Fraction)`).
"""

from __future__ import annotations

import random
from fractions import Fraction

from internlm2_jax.agents.tasks import Problem

LETTERS = "ABCD"
LEVELS = ("arithmetic", "primary", "middle")
MCQ_SHARE = 0.5  # of questions; each MCQ question is 4 problems (its rotations)
MCQ_INSTRUCTION = "Answer with the letter of the correct option."

# A kind: rng, scale -> (question, program lines that set `answer`, exact value, typical wrong values).
Made = tuple[str, list[str], Fraction | int, list[Fraction | int]]


# ---- level 1: arithmetic -----------------------------------------------------------------------------------------


def _add_sub(rng: random.Random, s: int) -> Made:
    a, b = rng.randint(100, 999) * s, rng.randint(100, 999) * s
    c = rng.randint(10, a + b - 1)
    return (f"What is {a} + {b} - {c}?", [f"answer = {a} + {b} - {c}"], a + b - c,
            [a + b + c, a - b + c, a + b - c + 10, a + b - c - 100])


def _product(rng: random.Random, s: int) -> Made:
    a, b = rng.randint(12, 99) * s, rng.randint(12, 99)
    return (f"What is {a} × {b}?", [f"answer = {a} * {b}"], a * b,
            [a * b + a, a * b - b, a * (b // 10) * 10, a + b])


def _quotient(rng: random.Random, s: int) -> Made:
    d, q = rng.randint(3, 29), rng.randint(12, 99) * s
    return (f"What is {d * q} ÷ {d}?", [f"answer = {d * q} // {d}"], q, [q + 1, q - 1, q * 10, d * q - d])


def _order_of_operations(rng: random.Random, s: int) -> Made:
    a, b, c = rng.randint(2, 50) * s, rng.randint(2, 12), rng.randint(2, 12)
    return (f"What is {a} + {b} × {c}?", [f"answer = {a} + {b} * {c}"], a + b * c, [(a + b) * c, a * b + c, a + b + c])


# ---- level 2: primary school -------------------------------------------------------------------------------------


def _rectangle(rng: random.Random, s: int) -> Made:
    length, width = rng.randint(4, 30) * s, rng.randint(2, 20) * s
    if rng.random() < 0.5:
        return (f"A rectangle is {length} cm long and {width} cm wide. What is its area in square centimeters?",
                [f"answer = {length} * {width}"], length * width, [2 * (length + width), length + width])
    return (f"A rectangle is {length} cm long and {width} cm wide. What is its perimeter in centimeters?",
            [f"answer = 2 * ({length} + {width})"], 2 * (length + width), [length * width, length + width])


def _fraction_of(rng: random.Random, s: int) -> Made:
    d = rng.choice((3, 4, 5, 6, 8))
    n = rng.randint(1, d - 1)
    whole = d * rng.randint(3, 25) * s
    return (f"What is {n}/{d} of {whole}?", [f"answer = {whole} * {n} // {d}"], whole * n // d,
            [whole // d, whole * d // n if whole * d % n == 0 else whole - whole * n // d, whole - whole * n // d])


def _add_fractions(rng: random.Random, s: int) -> Made:
    b, d = rng.sample((2, 3, 4, 5, 6, 7, 8, 9, 10, 12), 2)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    value = Fraction(a, b) + Fraction(c, d)
    return (f"What is {a}/{b} + {c}/{d}? Give the answer as a fraction in lowest terms.",
            ["from fractions import Fraction", f"answer = Fraction({a}, {b}) + Fraction({c}, {d})"], value,
            [Fraction(a + c, b + d), Fraction(a + c, b * d), Fraction(a * c, b * d), Fraction(a * d + b * c, b + d)])


def _unit_price(rng: random.Random, s: int) -> Made:
    each, n, m = rng.randint(2, 30) * s, rng.randint(2, 9), rng.randint(2, 12)
    while m == n:
        m += 1
    return (f"{n} pencils cost {each * n} cents. How many cents do {m} pencils cost?",
            [f"answer = {each * n} // {n} * {m}"], each * m, [each * n * m, each * n + m, each * (m + 1)])


def _mean(rng: random.Random, s: int) -> Made:
    k, mean = rng.randint(3, 5), rng.randint(40, 90) * s  # 40: the last value stays positive
    values = [mean + rng.randint(-9, 9) * s for _ in range(k - 1)]
    values.append(mean * k - sum(values))
    listed = ", ".join(map(str, values))
    return (f"What is the mean of {listed}?", [f"values = [{listed}]", "answer = sum(values) // len(values)"], mean,
            [sum(values), mean + 1, mean - 1, sum(values) // (k - 1)])


def _minutes(rng: random.Random, s: int) -> Made:
    h, m = rng.randint(1, 9) * s, rng.randint(1, 59)
    return (f"How many minutes are there in {h} hours and {m} minutes?", [f"answer = {h} * 60 + {m}"], h * 60 + m,
            [h * 100 + m, h * 60, h + m, h * 60 - m])


# ---- level 3: middle school --------------------------------------------------------------------------------------


def _linear_equation(rng: random.Random, s: int) -> Made:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 20) * s, rng.randint(1, 60) * s
    c = a * x + b
    return (f"Solve {a}x + {b} = {c}. What is x?",
            ["from fractions import Fraction", f"answer = Fraction({c} - {b}, {a})"], x,
            [Fraction(c + b, a), c - b, Fraction(c, a) - b])


def _percent_change(rng: random.Random, s: int) -> Made:
    old = rng.randint(2, 40) * 20 * s
    pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75))
    new = old + old * pct // 100
    return (f"A price rises from ${old} to ${new}. By what percent did it rise?",
            [f"answer = ({new} - {old}) * 100 // {old}"], pct,
            [new - old, Fraction((new - old) * 100, new), 100 + pct])


_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (9, 40, 41))


def _hypotenuse(rng: random.Random, s: int) -> Made:
    a, b, c = rng.choice(_TRIPLES)
    k = rng.randint(1, 6) * s
    a, b, c = a * k, b * k, c * k
    return (f"A right triangle has legs of {a} cm and {b} cm. How long is its hypotenuse in centimeters?",
            ["import math", f"answer = math.isqrt({a}**2 + {b}**2)"], c, [a + b, c + k, a * b // 2])


def _polygon_angles(rng: random.Random, s: int) -> Made:
    n = rng.randint(5, 12 + s)
    return (f"What is the sum of the interior angles of a polygon with {n} sides, in degrees?",
            [f"answer = ({n} - 2) * 180"], (n - 2) * 180, [n * 180, (n - 1) * 180, 360, (n - 3) * 180])


def _probability(rng: random.Random, s: int) -> Made:
    red, blue = rng.randint(1, 12) * s, rng.randint(1, 12) * s
    while red == blue:
        blue += s
    return (f"A bag holds {red} red and {blue} blue marbles. One is drawn at random. What is the probability that it "
            "is red? Give the answer as a fraction in lowest terms.",
            ["from fractions import Fraction", f"answer = Fraction({red}, {red} + {blue})"],
            Fraction(red, red + blue), [Fraction(red, blue), Fraction(blue, red + blue), Fraction(1, red + blue)])


def _slope(rng: random.Random, s: int) -> Made:
    x1, y1 = rng.randint(-9, 9) * s, rng.randint(-9, 9) * s
    x2 = x1 + rng.choice([d for d in range(-9, 10) if d]) * s
    y2 = y1 + rng.choice([d for d in range(-9, 10) if d]) * s
    value = Fraction(y2 - y1, x2 - x1)
    return (f"What is the slope of the line through ({x1}, {y1}) and ({x2}, {y2})?",
            ["from fractions import Fraction", f"x1, y1, x2, y2 = {x1}, {y1}, {x2}, {y2}",
             "answer = Fraction(y2 - y1, x2 - x1)"], value,
            [1 / value, -value, Fraction(y2 + y1, x2 + x1) if x2 + x1 else value + 1])


def _powers(rng: random.Random, s: int) -> Made:
    a, b = rng.sample((2, 3, 5), 2)
    m, n = rng.randint(2, 6), rng.randint(1, 3)
    value = a**m * b**n * s
    question, code = f"{a}^{m} × {b}^{n}", f"{a}**{m} * {b}**{n}"
    if s > 1:
        question, code = f"{question} × {s}", f"{code} * {s}"
    return (f"What is {question}?", [f"answer = {code}"], value,
            [a * m * b * n * s, (a * b) ** (m + n) * s if m + n < 6 else value + a, a**m * b * n * s])


KINDS = ((_add_sub, _product, _quotient, _order_of_operations),
         (_rectangle, _fraction_of, _add_fractions, _unit_price, _mean, _minutes),
         (_linear_equation, _percent_change, _hypotenuse, _polygon_angles, _probability, _slope, _powers))


# ---- problems ----------------------------------------------------------------------------------------------------


def text(value: Fraction | int) -> str:
    """The canonical answer: an integer, or a fraction "p/q" in lowest terms (as `print(Fraction)` writes it)."""
    return str(Fraction(value))


def distractors(rng: random.Random, value: Fraction | int, mistakes: list[Fraction | int]) -> list[str]:
    """Three wrong options: the kind's mistakes first (in order), then near misses (±1, ±2, ±10, ×2, ÷2, in a
    random order); all distinct from the answer and from each other. Negative values appear only when the answer is
    negative."""
    answer = Fraction(value)
    near = [answer + 1, answer - 1, answer + 2, answer - 2, answer + 10, answer - 10, answer * 2, answer / 2]
    rng.shuffle(near)
    chosen: list[str] = []
    for candidate in [*map(Fraction, mistakes), *near]:
        option = text(candidate)
        if candidate != answer and option not in chosen and (candidate >= 0 or answer < 0):
            chosen.append(option)
    return chosen[:3]  # never fewer: answer + 1, + 2 and + 10 are three distinct values allowed for any answer


def mcq_question(stem: str, options: list[str]) -> str:
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True))
    return f"{stem}\n{listed}\n{MCQ_INSTRUCTION}"


def question(rng: random.Random, pid: str, difficulty: int) -> list[Problem]:
    """One question: a cloze problem, or an MCQ's 4 rotations (`generate` gives them consecutive ids)."""
    level = min(difficulty, len(LEVELS))
    kind = rng.choice(KINDS[level - 1])
    stem, lines, value, mistakes = kind(rng, 10 ** max(0, difficulty - len(LEVELS)))
    meta = {"difficulty": difficulty, "level": LEVELS[level - 1], "kind": kind.__name__.lstrip("_"),
            "value": text(value)}
    if rng.random() >= MCQ_SHARE:
        return [Problem(id=pid, suite="mathbench", question=stem, answer=text(value),
                        program="\n".join([*lines, "print(answer)"]), needs_tool=True,
                        meta={**meta, "format": "cloze"})]
    options = [text(value), *distractors(rng, value, mistakes)]
    rng.shuffle(options)
    problems = []
    for rotation in range(len(LETTERS)):
        rotated = options[rotation:] + options[:rotation]
        program = [*lines, f"options = {rotated!r}", "print('ABCD'[options.index(str(answer))])"]
        problems.append(Problem(
            id=pid, suite="mathbench", question=mcq_question(stem, rotated), answer=LETTERS[rotated.index(text(value))],
            program="\n".join(program), needs_tool=True,
            meta={**meta, "format": "mcq", "options": dict(zip(LETTERS, rotated, strict=True)),
                  "circular": {"group": pid, "rotation": rotation, "size": len(LETTERS)}}))
    return problems
