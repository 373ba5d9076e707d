"""ArithTool (agents.md §3): exact integer arithmetic that a small model cannot do in its head but can write as one
line of Python: `×`, `//`, `%`, `pow(a, e, m)` and nested expressions of them. Difficulty d sets the operand size
(d + 1 digits for the main operand, d for the other) and the depth of the nested kind (2 + d // 3 operations);
`product` alone is the "4-digit × 3-digit" distribution of §4.6 at difficulty 3."""

from __future__ import annotations

import random

from internlm2_jax.agents.tasks import Problem

# Operation kinds; the nested form combines two of the plain ones.
KINDS = ("mul", "floordiv", "mod", "powmod", "nested")


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _binary(rng: random.Random, digits: int, kind: str) -> tuple[str, int]:
    """One operation as (Python expression, value). Divisors have fewer digits so quotients are not trivially 0/1."""
    a = _number(rng, digits)
    b = _number(rng, max(1, digits - 1))
    if kind == "mul":
        return f"{a} * {b}", a * b
    if kind == "floordiv":
        n = a * b + rng.randint(0, b - 1)  # a dividend with a (digits)-digit quotient and a remainder
        return f"{n} // {b}", n // b
    if kind == "mod":
        return f"{a} % {b}", a % b
    # powmod: a small exponent keeps the reference program instant; the modulus has `digits` digits.
    e, m = rng.randint(5, 40), _number(rng, digits)
    return f"pow({a}, {e}, {m})", pow(a, e, m)


def _expression(rng: random.Random, digits: int, depth: int) -> tuple[str, int]:
    if depth <= 1:
        return _binary(rng, digits, rng.choice(KINDS[:-1]))
    left, lv = _expression(rng, digits, depth - 1)
    right, rv = _binary(rng, max(1, digits - 1), rng.choice(("mul", "mod")))
    op = rng.choice(("+", "-", "*"))
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv}[op]
    return f"({left}) {op} ({right})", value


def problem(rng: random.Random, pid: str, difficulty: int) -> Problem:
    digits = difficulty + 1
    kind = rng.choice(KINDS)
    if kind == "nested":
        expr, value = _expression(rng, digits, 2 + difficulty // 3)
    else:
        expr, value = _binary(rng, digits, kind)
    return Problem(id=pid, suite="arith", question=f"What is {expr}?", answer=str(value),
                   program=f"print({expr})", needs_tool=True,
                   meta={"difficulty": difficulty, "kind": kind, "expression": expr})


def product(rng: random.Random, pid: str, difficulty: int) -> Problem:
    """The §4.6 distribution only: a (d + 1)-digit × d-digit product (4 × 3 digits at difficulty 3)."""
    a, b = _number(rng, difficulty + 1), _number(rng, max(1, difficulty))
    expr = f"{a} * {b}"
    return Problem(id=pid, suite="arith_mul", question=f"What is {expr}?", answer=str(a * b),
                   program=f"print({expr})", needs_tool=True,
                   meta={"difficulty": difficulty, "kind": "mul", "expression": expr})
