"""`calculator`: arithmetic that is parsed, never `eval`ed (agents.md §2.5, D17).

The expression is parsed with `ast` and evaluated node by node; only numbers, `+ - * / // % **`, unary `+ -`,
parentheses, comparisons, the constants `pi e tau inf` and the functions in FUNCTIONS are understood, so there is
nothing to reach through (`().__class__`, `__import__`, lambdas and comprehensions are refused by name of what they
are). AgentLego's calculator `eval`s with `__builtins__` removed, which attribute walks get around.

Exact where it matters: integers are Python's unbounded ints, decimal literals are read as the exact fractions they
spell (`0.1` is 1/10), and `/` of exact numbers is a `Fraction`, so `0.1 + 0.2 == 0.3` and `1/3 * 3 == 1`. A
result is shown as an int when it is integral, else as the nearest float; floats enter only through irrational
functions, constants and fractional powers.

Bounded: the expression is at most MAX_CHARS long, and no integer (or numerator, or denominator) may exceed MAX_BITS,
checked *before* the operations that could blow up (`**`, factorial, comb, perm) from their operands' sizes, so
`9**9**9` and `factorial(10**6)` are refused at once instead of computed.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import warnings
from fractions import Fraction
from typing import Any

from internlm2_jax.agents.tools.base import ToolError, tool

MAX_CHARS = 1000
# Just under Python's 4,300-digit limit on int <-> str conversions, so every result can be written back as JSON.
MAX_BITS = 14_000
MAX_ROUND_DIGITS = 1000

# The parser warns on stderr about suspicious literals ("11inf") that are then refused anyway; the filter matches only
# sources parsed under this file name.
_SOURCE_NAME = "<calculator>"
warnings.filterwarnings("ignore", category=SyntaxWarning, module=re.escape(_SOURCE_NAME))

Number = int | float | Fraction
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}


def _log(x: Number, base: Number = math.e) -> float:
    return math.log(x, base)


def _round(x: Number, digits: int | None = None) -> Number:
    if digits is None:
        return round(x)
    if isinstance(digits, int) and abs(digits) > MAX_ROUND_DIGITS:  # round(1/3, 10**9) would compute 10**(10**9)
        raise ToolError(f"round: digits must be within ±{MAX_ROUND_DIGITS}, got {digits}")
    return round(x, digits)


FUNCTIONS = {
    "abs": abs, "round": _round, "min": min, "max": max,
    "sqrt": math.sqrt, "cbrt": math.cbrt, "exp": math.exp, "log": _log, "log2": math.log2, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh, "hypot": math.hypot,
    "degrees": math.degrees, "radians": math.radians, "floor": math.floor, "ceil": math.ceil, "trunc": math.trunc,
    "isqrt": math.isqrt, "gcd": math.gcd, "lcm": math.lcm, "factorial": math.factorial, "comb": math.comb,
    "perm": math.perm,
}
# log2 of the result of functions whose result can be far larger than their arguments, from the arguments alone.
_RESULT_BITS = {
    "factorial": lambda n: math.lgamma(n + 1) / math.log(2),
    "comb": lambda n, k: 0 if k > n else (
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2),
    "perm": lambda n, k=None: 0 if k is not None and k > n else (
        math.lgamma(n + 1) - math.lgamma(n - (n if k is None else k) + 1)) / math.log(2),
}
_WHOLE_NUMBERS = {"isqrt", "gcd", "lcm", "factorial", "comb", "perm"}  # functions of integers only
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_REFUSED = {ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Lambda: "lambda",
            ast.ListComp: "a comprehension", ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
            ast.GeneratorExp: "a comprehension", ast.NamedExpr: "assignment", ast.BoolOp: "and/or",
            ast.IfExp: "if/else", ast.JoinedStr: "a string", ast.List: "a list", ast.Tuple: "a tuple",
            ast.Set: "a set", ast.Dict: "a dict", ast.Starred: "unpacking", ast.Await: "await"}


@tool
def calculator(expression: str) -> int | float | bool | str:
    """Evaluate an arithmetic expression exactly, e.g. "(3 + 4) * 2**10 / 7" or "sqrt(2) * pi". Supports + - * / //
    % ** (not ^), parentheses, comparisons, pi, e, tau, inf and abs, round, min, max, sqrt, cbrt, exp, log(x[, base]),
    log2, log10, sin, cos, tan, asin, acos, atan, atan2, sinh, cosh, tanh, hypot, degrees, radians, floor, ceil,
    trunc, isqrt, gcd, lcm, factorial, comb, perm.

    Args:
        expression: The expression to evaluate.
    """
    return present(evaluate(expression))


def evaluate(expression: str) -> Number | bool:
    """The exact value of `expression`; raises ToolError saying what is wrong."""
    if len(expression) > MAX_CHARS:
        raise ToolError(f"the expression is {len(expression)} characters long; the limit is {MAX_CHARS}")
    try:
        tree = ast.parse(expression.strip(), _SOURCE_NAME, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"invalid expression: {exc.msg} (column {exc.offset})") from None
    except (ValueError, RecursionError) as exc:  # a literal over the digit limit, absurd nesting
        raise ToolError(f"invalid expression: {exc}") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None


def present(value: Number | bool) -> int | float | bool | str:
    """What the model is shown: ints and bools as they are, exact fractions as the nearest float, "inf"/"nan" as
    text (JSON has no such numbers)."""
    if isinstance(value, Fraction):
        try:
            value = float(value)
        except OverflowError:  # beyond the float range: the exact fraction is all there is
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _eval(node: ast.AST) -> Number | bool:
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        if isinstance(node.op, ast.Div) and not isinstance(left, float) and not isinstance(right, float):
            return _checked(Fraction(left) / Fraction(right))
        if type(node.op) not in _BINARY:
            hint = "; use ** for powers" if isinstance(node.op, ast.BitXor) else ""
            raise ToolError(f"the operator {_source(node.op)} is not supported{hint}")
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise ToolError(f"the operator {_source(node.op)} is not supported")
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Compare):
        left, result = _eval(node.left), True
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            if type(op) not in _COMPARE:
                raise ToolError(f"the comparison {_source(op)} is not supported")
            right = _eval(comparator)
            result, left = result and _COMPARE[type(op)](left, right), right
        return result
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            raise ToolError(f"{node.id} is a function; call it, e.g. {node.id}(2)")
        raise ToolError(f"unknown name {node.id!r}; the constants are {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        return _call(node)
    raise _not_allowed(node)


def _not_allowed(node: ast.AST) -> ToolError:
    what = _REFUSED.get(type(node), type(node).__name__)
    return ToolError(f"{what} is not allowed: only numbers, operators, parentheses and the listed functions are")


def _call(node: ast.Call) -> Number:
    if not isinstance(node.func, ast.Name):
        if type(node.func) in _REFUSED:
            raise _not_allowed(node.func)
        raise ToolError(f"{ast.unparse(node.func)} is not a function")
    if node.func.id not in FUNCTIONS:
        raise ToolError(f"unknown function {node.func.id!r}; the functions are {', '.join(FUNCTIONS)}")
    name = node.func.id
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise ToolError(f"{name}: pass plain positional arguments")
    args = [_eval(arg) for arg in node.args]
    shown = ", ".join(str(present(arg)) for arg in args)
    if name in _WHOLE_NUMBERS and not all(isinstance(arg, int) for arg in args):
        raise ToolError(f"{name} takes whole numbers, got {name}({shown})")
    try:
        if _predicted_bits(name, args) > MAX_BITS:
            raise ToolError(f"{name}({shown}) is too large (over {MAX_BITS} bits)")
        return _checked(FUNCTIONS[name](*args))
    except (TypeError, ValueError) as exc:  # wrong arity, math domain error, factorial(2.5), ...
        raise ToolError(f"{name}: {exc}") from None


def _predicted_bits(name: str, args: list[Number]) -> float:
    if name not in _RESULT_BITS or any(arg < 0 for arg in args):
        return 0  # negative arguments: the function's own error says so
    try:
        return _RESULT_BITS[name](*args)
    except TypeError:  # the wrong number of arguments: the function's own error says so
        return 0


def _number(value: Any) -> Number:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a complex number" if isinstance(value, complex) else f"a {type(value).__name__}"
        raise ToolError(f"{kind} is not allowed: only real numbers are")
    if isinstance(value, float) and math.isfinite(value):
        return _checked(Fraction(repr(value)))  # the decimal as written: 0.1 is 1/10, not the nearest binary float
    return _checked(value)


def _power(base: Number, exponent: Number) -> Number:
    exact = not isinstance(base, float)
    if exact and isinstance(exponent, (int, Fraction)) and Fraction(exponent).denominator == 1:
        exponent = int(exponent)
        base = Fraction(base)
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if size > 1 and (size - 1) * abs(exponent) > MAX_BITS:  # a lower bound on the result's size
            raise ToolError(f"the power is too large (over {MAX_BITS} bits)")
        return base**exponent
    result = float(base) ** float(exponent)
    if isinstance(result, complex):
        raise ToolError("the result is not a real number (a fractional power of a negative number)")
    return result


def _checked(value: Number | bool) -> Number | bool:
    """`value` in its simplest exact form, if it is within MAX_BITS."""
    if isinstance(value, Fraction):
        if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
            raise ToolError(f"the result is too large (over {MAX_BITS} bits)")
        return value.numerator if value.denominator == 1 else value
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ToolError(f"the result is too large (over {MAX_BITS} bits)")
    return value


def _source(node: ast.AST) -> str:
    symbols = {ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>",
               ast.MatMult: "@", ast.Invert: "~", ast.Not: "not", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
               ast.NotIn: "not in"}
    return symbols.get(type(node)) or ast.unparse(node)
