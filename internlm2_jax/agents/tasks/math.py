"""MATH-like problems (agents.md §3): linear systems, gcd/lcm, modular inverses, binomials, sums of series, rational
roots and definite integrals, with exact answers (an integer, or a fraction "p/q" as sympy prints it). The answer
is computed here with exact integer and `Fraction` arithmetic; the reference program solves the problem the way a
model with the interpreter would (sympy where it helps), and the tests check that both agree in the sandboxed
interpreter. Difficulty scales the numbers."""

from __future__ import annotations

import math
import random
from fractions import Fraction

from internlm2_jax.agents.tasks import Problem

# A kind: rng, scale -> (question, program, exact answer).
Made = tuple[str, str, Fraction | int]


def _fraction_text(value: Fraction | int) -> str:
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _poly(a: int, b: int, c: int, power: str) -> str:
    """a*x^2 + b*x + c with signs written as people write them (`power` is "^" in questions, "**" in code)."""
    text = f"{a}*x{power}2"
    for coefficient, term in ((b, "*x"), (c, "")):
        text += f" {'-' if coefficient < 0 else '+'} {abs(coefficient)}{term}"
    return text


def _linear_system(rng: random.Random, s: int) -> Made:
    x, y = rng.randint(-9 * s, 9 * s), rng.randint(-9 * s, 9 * s)
    while True:  # coefficients of a system with exactly one solution
        a, b, c, d = (rng.choice([i for i in range(-9, 10) if i]) for _ in range(4))
        if a * d - b * c:
            break
    e, f = a * x + b * y, c * x + d * y
    first, second = f"{a}*x {'-' if b < 0 else '+'} {abs(b)}*y", f"{c}*x {'-' if d < 0 else '+'} {abs(d)}*y"
    question = f"Solve the system {first} = {e} and {second} = {f}. What is x + y?"
    program = ("from sympy import Eq, solve, symbols\nx, y = symbols('x y')\n"
               f"s = solve([Eq({first}, {e}), Eq({second}, {f})], [x, y])\nprint(s[x] + s[y])")
    return question, program, x + y


def _gcd_lcm(rng: random.Random, s: int) -> Made:
    common = rng.randint(2, 30)
    a, b = common * rng.randint(2, 40 * s), common * rng.randint(2, 40 * s)
    if rng.random() < 0.5:
        return (f"What is the greatest common divisor of {a} and {b}?", f"import math\nprint(math.gcd({a}, {b}))",
                math.gcd(a, b))
    return (f"What is the least common multiple of {a} and {b}?", f"import math\nprint(math.lcm({a}, {b}))",
            math.lcm(a, b))


def _modular_inverse(rng: random.Random, s: int) -> Made:
    m = rng.choice([p for p in range(11, 200 * s) if all(p % q for q in range(2, math.isqrt(p) + 1))])
    a = rng.randint(2, m - 1)
    return (f"What is the inverse of {a} modulo {m} (the number x between 0 and {m - 1} with {a}*x = 1 mod {m})?",
            f"print(pow({a}, -1, {m}))", pow(a, -1, m))


def _binomial(rng: random.Random, s: int) -> Made:
    n = rng.randint(6, 12 + 8 * s)
    k = rng.randint(2, n - 2)
    return (f"In how many ways can {k} books be chosen from {n} different books?",
            f"import math\nprint(math.comb({n}, {k}))", math.comb(n, k))


def _series(rng: random.Random, s: int) -> Made:
    n, power = rng.randint(10, 60 * s), rng.randint(1, 3)
    return (f"What is the sum of k^{power} for k from 1 to {n}?",
            f"print(sum(k**{power} for k in range(1, {n + 1})))", sum(k**power for k in range(1, n + 1)))


def _roots(rng: random.Random, s: int) -> Made:
    # (p x - q)(r x - t) with distinct rational roots q/p and t/r; asked for their sum (a fraction in general).
    p, r = rng.randint(1, 4), rng.randint(1, 4)
    q, t = rng.randint(-9 * s, 9 * s), rng.randint(-9 * s, 9 * s)
    while Fraction(q, p) == Fraction(t, r):
        t += 1
    a, b, c = p * r, -(p * t + q * r), q * t
    return (f"What is the sum of the roots of {_poly(a, b, c, '^')} = 0?",
            f"from sympy import solve, symbols\nx = symbols('x')\nprint(sum(solve({_poly(a, b, c, '**')}, x)))",
            Fraction(q, p) + Fraction(t, r))


def _integral(rng: random.Random, s: int) -> Made:
    a, b, c, upper = rng.randint(1, 9), rng.randint(-9, 9), rng.randint(-9, 9), rng.randint(1, 5 * s)
    value = Fraction(a, 3) * upper**3 + Fraction(b, 2) * upper**2 + c * upper
    return (f"What is the integral of {_poly(a, b, c, '^')} from x = 0 to x = {upper}?",
            "from sympy import integrate, symbols\nx = symbols('x')\n"
            f"print(integrate({_poly(a, b, c, '**')}, (x, 0, {upper})))", value)


KINDS = (_linear_system, _gcd_lcm, _modular_inverse, _binomial, _series, _roots, _integral)


def problem(rng: random.Random, pid: str, difficulty: int) -> Problem:
    kind = rng.choice(KINDS)
    question, program, answer = kind(rng, difficulty)
    return Problem(id=pid, suite="math", question=question, answer=_fraction_text(answer), program=program,
                   needs_tool=True, meta={"difficulty": difficulty, "kind": kind.__name__.lstrip("_")})
