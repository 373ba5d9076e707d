"""`agents.tools` (agents.md §2.5, §4: B20, C4-C6, D17): schemas written from type hints (golden), the argument
validator (table-driven, and checked against `jsonschema`), the executor's results and refusals, the calculator's
arithmetic and its refusals, BM25 search over the standard library's docs, the sandboxed interpreter tool, and the
tools list rendered through the chat template and parsed back from the released tokenizer's ids."""

import dataclasses
import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Annotated, Literal, NotRequired, Optional, TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from internlm2_jax.agents.protocol import Call, ToolResult, parse_ids, result_turn, system_turns
from internlm2_jax.agents.tools import (
    BUILTIN_TOOLS,
    DocIndex,
    Document,
    PythonTool,
    Tool,
    ToolError,
    ToolExecutor,
    argument_errors,
    open_doc,
    search_docs,
    tool,
)
from internlm2_jax.agents.tools import calculator as calculator_module
from internlm2_jax.agents.tools.calculator import calculator
from internlm2_jax.agents.tools import python as python_module
from internlm2_jax.agents.tools.docs import stdlib_index
from internlm2_jax.agents.tools.python import to_result
from internlm2_jax.chat_prompts import with_tools
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.sandbox import CellResult, SandboxError

TEMPLATE = get_chat_template("internlm2_chat")


@pytest.fixture(scope="module")
def reference():
    """An independent JSON Schema validator (`jsonschema` is installed with the test tools, not declared by us)."""
    return pytest.importorskip("jsonschema", reason="jsonschema, the reference validator, is not installed")


# ---- schemas from type hints -------------------------------------------------------------------------------------


class Point(TypedDict):
    x: float
    y: float
    label: NotRequired[str]


@dataclasses.dataclass
class Box:
    corner: tuple[float, ...]
    size: float = 1.0


def weather(city: str, days: int = 3, unit: Literal["c", "f"] = "c", metric: bool = True, note: str | None = None):
    """Current weather in a city,
    wrapped over two lines.

    A second paragraph.

    Args:
        city: The city's name,
            continued here.
        days (int): How many days ahead.
        unit: Celsius or Fahrenheit.

    Returns:
        The forecast.
    """


def shapes(points: list[Point], box: Box, tags: dict[str, float],
           k: Annotated[int, "how many", {"minimum": 1, "maximum": 10}] = 2, scale: Optional[float] = None):
    """Shapes."""


GOLDEN_SCHEMAS = {
    weather: ("Current weather in a city, wrapped over two lines.\nA second paragraph.", {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city's name, continued here."},
            "days": {"type": "integer", "description": "How many days ahead.", "default": 3},
            "unit": {"type": "string", "enum": ["c", "f"], "description": "Celsius or Fahrenheit.", "default": "c"},
            "metric": {"type": "boolean", "default": True},
            "note": {"type": ["string", "null"], "default": None},
        },
        "required": ["city"],
        "additionalProperties": False}),
    shapes: ("Shapes.", {
        "type": "object",
        "properties": {
            "points": {"type": "array", "items": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}, "label": {"type": "string"}},
                "required": ["x", "y"], "additionalProperties": False}},
            "box": {"type": "object",
                    "properties": {"corner": {"type": "array", "items": {"type": "number"}},
                                   "size": {"type": "number"}},
                    "required": ["corner"], "additionalProperties": False},
            "tags": {"type": "object", "additionalProperties": {"type": "number"}},
            "k": {"type": "integer", "description": "how many", "minimum": 1, "maximum": 10, "default": 2},
            "scale": {"type": ["number", "null"], "default": None},
        },
        "required": ["points", "box", "tags"],
        "additionalProperties": False}),
}


@pytest.mark.parametrize("fn", GOLDEN_SCHEMAS, ids=lambda fn: fn.__name__)
def test_schema_from_hints_is_golden(fn, reference):
    made = tool(fn)
    description, parameters = GOLDEN_SCHEMAS[fn]
    assert (made.name, made.description, made.parameters) == (fn.__name__, description, parameters)
    assert json.dumps(made.parameters) == json.dumps(parameters)  # key order too: the prompt must be byte-stable
    reference.Draft202012Validator.check_schema(made.parameters)
    assert made.spec() == {"type": "function",
                           "function": {"name": fn.__name__, "description": description, "parameters": parameters}}


def test_arguments_are_converted_to_what_the_hints_ask_for():
    seen = {}

    def record(points: list[Point], box: Box, scale: float, corner: tuple[int, ...] = ()):
        seen.update(points=points, box=box, scale=scale, corner=corner)
        return "done"

    executor = ToolExecutor([record])
    arguments = {"points": [{"x": 1, "y": 2}], "box": {"corner": [0, 1]}, "scale": 2, "corner": [1.0, 2]}
    assert executor(Call("plugin", "record", arguments, "")) == ToolResult(value="done")
    assert seen == {"points": [{"x": 1.0, "y": 2.0}], "box": Box(corner=(0.0, 1.0)), "scale": 2.0, "corner": (1, 2)}
    assert isinstance(seen["scale"], float) and isinstance(seen["box"].corner[0], float)


def _no_hint(x):
    """."""


def _var_args(*values: int):
    """."""


def _complex(z: complex):
    """."""


def _int_keys(table: dict[int, str]):
    """."""


def _pair(pair: tuple[int, str]):
    """."""


def test_decorator_options():
    made = tool(name="weather-now", description="Now.", timeout_s=5)(weather)
    assert (made.name, made.description, made.timeout_s) == ("weather-now", "Now.", 5)
    assert made.parameters == GOLDEN_SCHEMAS[weather][1] and made("Paris") is None  # still the function


@pytest.mark.parametrize("fn, message", [
    (_no_hint, "_no_hint(x): has no type hint"),
    (_var_args, "*args, **kwargs and positional-only"),
    (_complex, "_complex(z): <class 'complex'> has no JSON Schema"),
    (_int_keys, "JSON object keys are strings"),
    (_pair, "only tuple[X, ...]"),
])
def test_unsupported_hints_are_refused_when_the_tool_is_made(fn, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        tool(fn)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "lagent.Tool"}, "must match"),
    ({"name": "x" * 65}, "must match"),
    ({"name": "calculator\n"}, "must match"),
    ({"parameters": {"type": "array"}}, '"type": "object"'),
    ({"fn": lambda: 1, "timeout_s": 1.0}, "use a module-level function"),
    ({"timeout_s": 0}, "timeout_s must be positive"),
])
def test_bad_tools_are_refused(kwargs, message):
    fields = {"name": "ok", "description": "", "parameters": {"type": "object"}, "fn": textwrap.shorten, **kwargs}
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        Tool(**fields)


# ---- the validator (B20) -----------------------------------------------------------------------------------------

WEATHER = tool(weather).parameters
SHAPES = tool(shapes).parameters
GOOD_SHAPES = {"points": [{"x": 1, "y": 2.5}], "box": {"corner": []}, "tags": {}}

VALIDATOR_TABLE = [
    # (schema, arguments, expected errors)
    (WEATHER, {"city": "Paris"}, []),
    (WEATHER, {"city": "Paris", "days": 2.0, "note": None}, []),  # 2.0 is an integer to JSON Schema
    (WEATHER, {}, ["argument 'city' is required"]),
    (WEATHER, {"city": 3}, ["argument 'city' must be string, got integer"]),
    (WEATHER, {"city": "Paris", "days": True}, ["argument 'days' must be integer, got boolean"]),
    (WEATHER, {"city": "Paris", "days": 2.5}, ["argument 'days' must be integer, got number"]),
    (WEATHER, {"city": "Paris", "unit": "k"}, ['argument \'unit\' must be one of "c", "f"; got "k"']),
    (WEATHER, {"city": "Paris", "colour": "red"},
     ["argument 'colour' is not expected (expected: city, days, unit, metric, note)"]),
    (WEATHER, {"days": "x", "metric": 1},
     ["argument 'city' is required", "argument 'days' must be integer, got string",
      "argument 'metric' must be boolean, got integer"]),
    (WEATHER, ["Paris"], ["the arguments must be object, got array"]),
    (SHAPES, GOOD_SHAPES, []),
    (SHAPES, {**GOOD_SHAPES, "k": 11}, ["argument 'k' must be ≤ 10, got 11"]),
    (SHAPES, {**GOOD_SHAPES, "k": 0}, ["argument 'k' must be ≥ 1, got 0"]),
    (SHAPES, {**GOOD_SHAPES, "points": [{"x": 1, "y": 2}, {"x": "1", "y": 2}]},
     ["argument 'points[1].x' must be number, got string"]),
    (SHAPES, {**GOOD_SHAPES, "points": [{"x": 1}]}, ["argument 'points[0].y' is required"]),
    (SHAPES, {**GOOD_SHAPES, "box": {"corner": [1, "a"], "depth": 1}},
     ["argument 'box.corner[1]' must be number, got string", "argument 'box.depth' is not expected (expected: "
      "corner, size)"]),
    (SHAPES, {**GOOD_SHAPES, "tags": {"a": "b"}}, ["argument 'tags.a' must be number, got string"]),
    (SHAPES, {**GOOD_SHAPES, "scale": "big"}, ["argument 'scale' must be number or null, got string"]),
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 3},
                                       "a": {"type": "array", "minItems": 1, "maxItems": 2},
                                       "n": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}},
     {"s": "abcd", "a": [], "n": 1},
     ["argument 's' must have at most 3 characters, got 4", "argument 'a' must have at least 1 items, got 0",
      "argument 'n' must be < 1, got 1"]),
    ({"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "array"}]}}}, {"v": "x"},
     ["argument 'v' must be integer or array, got string"]),
    ({"type": "object", "properties": {"v": {"const": 1}}}, {"v": True}, ["argument 'v' must be 1; got true"]),
    ({"type": "object", "properties": {"v": {"type": "integer"}}}, {"v": 1, "w": None}, []),  # extra keys allowed
    ({"type": "object", "required": [f"a{i}" for i in range(9)]}, {}, [f"argument 'a{i}' is required"
                                                                       for i in range(5)]),  # capped
]


@pytest.mark.parametrize("schema, arguments, expected", VALIDATOR_TABLE)
def test_validator_names_the_field_and_agrees_with_jsonschema(schema, arguments, expected, reference):
    assert argument_errors(arguments, schema) == expected
    assert reference.Draft202012Validator(schema).is_valid(arguments) == (not expected)


json_leaves = (st.none() | st.booleans() | st.integers(-20, 20) | st.floats(-20, 20, allow_nan=False)
               | st.sampled_from(["c", "f", "k", "", "Paris"]))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["x", "y", "label", "corner", "size", "a"]), inner, max_size=3), max_leaves=6)
near_valid = st.dictionaries(st.sampled_from([*WEATHER["properties"], *SHAPES["properties"], "extra"]),
                             json_values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(arguments=near_valid, schema=st.sampled_from([WEATHER, SHAPES]))
def test_validator_agrees_with_jsonschema_on_random_arguments(reference, arguments, schema):
    assert (not argument_errors(arguments, schema)) == reference.Draft202012Validator(schema).is_valid(arguments)


def test_no_schema_checks_nothing():
    assert argument_errors({"anything": 1}, None) == []


# ---- the executor (C4-C6) ----------------------------------------------------------------------------------------


def _failing(kind: str) -> str:
    """Fails as asked."""
    if kind == "tool":
        raise ToolError("the city is not on the map")
    if kind == "value":
        raise ValueError("bad value")
    raise KeyError(kind)


def test_registry_refuses_duplicates_and_lists_what_is_declared():
    executor = ToolExecutor([calculator, _failing])
    assert executor.names == ("calculator", "_failing") and "calculator" in executor
    with pytest.raises(ValueError, match="a tool named 'calculator' is already registered"):
        executor.register(calculator)
    assert executor.specs() == {"calculator": calculator.parameters, "_failing": tool(_failing).parameters}
    assert executor.openai_tools() == [calculator.spec(), tool(_failing).spec()]


@pytest.mark.parametrize("call, status, error", [
    (Call("plugin", "delete_all", {}, ""), "unknown_tool",
     "unknown tool 'delete_all'; declared tools: calculator, _failing"),
    (Call("interpreter", "python", {"code": "1"}, ""), "unknown_tool",
     "the code interpreter is not enabled; declared tools: calculator, _failing"),
    (Call("plugin", "calculator", {"expr": "1"}, ""), "invalid_arguments",
     "calculator: argument 'expression' is required; argument 'expr' is not expected (expected: expression)"),
    (Call("plugin", "_failing", {"kind": "tool"}, ""), "tool_error", "_failing: the city is not on the map"),
    (Call("plugin", "_failing", {"kind": "value"}, ""), "tool_error", "_failing: ValueError: bad value"),
    (Call("plugin", "_failing", {"kind": "other"}, ""), "tool_error", "_failing: KeyError: 'other'"),
    (Call("plugin", "calculator", {"expression": "1/0"}, ""), "tool_error", "calculator: division by zero"),
])
def test_executor_errors_are_results(call, status, error):
    result = ToolExecutor([calculator, _failing])(call)
    assert (result.status, result.error, result.value) == (status, error, None)
    content = result_turn(call, result)["content"]  # what the model reads, never a traceback
    if call.kind == "plugin":
        assert json.loads(content) == {"error": {"type": status, "message": error}}
    else:
        assert content == error


def test_executor_success():
    result = ToolExecutor([calculator])(Call("plugin", "calculator", {"expression": "2**10 / 4"}, ""))
    assert result == ToolResult(value=256)


SHORTEN = {"type": "object", "properties": {"text": {"type": "string"}, "width": {"type": "integer"}},
           "required": ["text", "width"]}
RUN = {"type": "object", "properties": {"args": {"type": "array", "items": {"type": "string"}}}}


def test_timeout_tools_run_in_a_child_process():
    shorten = Tool("shorten", "", SHORTEN, textwrap.shorten, timeout_s=30)
    # The module attribute is a Tool made by @tool: the child takes its function.
    calc = Tool("calc", "", calculator.parameters, calculator.fn, timeout_s=30)
    executor = ToolExecutor([shorten, calc])
    assert executor(Call("plugin", "shorten", {"text": "Hello there world", "width": 12}, "")).value == "Hello [...]"
    failed = executor(Call("plugin", "shorten", {"text": "x", "width": 1}, ""))
    assert (failed.status, failed.error) == ("tool_error", "shorten: ValueError: placeholder too large for max width")
    assert executor(Call("plugin", "calc", {"expression": "1/3*3"}, "")).value == 1
    failed = executor(Call("plugin", "calc", {"expression": "1/0"}, ""))
    assert (failed.status, failed.error) == ("tool_error", "calc: division by zero")  # ToolError: shown as is


def test_a_tool_past_its_timeout_is_stopped_with_what_it_started():
    marker = f"{os.getpid() % 97 + 31}.{time.monotonic_ns() % 10**6}"  # a sleep no one else runs
    slow = Tool("run", "", RUN, subprocess.run, timeout_s=1.0)
    start = time.monotonic()
    result = ToolExecutor([slow])(Call("plugin", "run", {"args": ["sleep", marker]}, ""))
    assert time.monotonic() - start < 5
    assert (result.status, result.error) == ("timeout", "run: the tool did not finish within 1 s and was stopped")

    def alive() -> bool:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                    return True
            except OSError:
                continue  # it ended while we looked
        return False

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(), "the tool's own child process outlived the timeout"


# ---- calculator (D17) --------------------------------------------------------------------------------------------

CALCULATIONS = [
    ("0.1 + 0.2", 0.3), ("1/3 * 3", 1), ("2/3", 2 / 3), ("7 // 2", 3), ("-7 % 3", 2), ("2**-2", 0.25),
    ("2**0.5", 2**0.5), ("sqrt(2) * pi", 2**0.5 * 3.141592653589793), ("(3 + 4) * 2**10 / 7", 1024),
    ("10**30 + 1", 10**30 + 1), ("factorial(20)", 2432902008176640000), ("comb(52, 5)", 2598960),
    ("log(8, 2)", 3.0), ("max(1, 7/2)", 3.5), ("round(2/3, 3)", 0.667), ("3 < 4 <= 4", True), ("1 > 2", False),
    ("abs(-2.5)", 2.5), ("gcd(12, 18)", 6), ("floor(-0.5)", -1), ("1e999", "inf"), ("-inf", "-inf"),
    ("2**13999 > 0", True),
]


@pytest.mark.parametrize("expression, expected", CALCULATIONS)
def test_calculator_is_right(expression, expected):
    value = calculator(expression)
    assert value == expected and type(value) is type(expected)


REFUSALS = [
    ("__import__('os')", "unknown function '__import__'"),
    ("().__class__.__bases__[0].__subclasses__()", "attribute access is not allowed"),
    ("(1).__class__", "attribute access is not allowed"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("lambda: 1", "lambda is not allowed"),
    ("[x for x in (1, 2)]", "a comprehension is not allowed"),
    ("(x := 1)", "assignment is not allowed"),
    ("x", "unknown name 'x'"),
    ("sqrt", "sqrt is a function"),
    ("f'{1}'", "a string is not allowed"),
    ("'a' * 10**9", "a str is not allowed"),
    ("1j", "a complex number is not allowed"),
    ("2 ^ 10", "use ** for powers"),
    ("1 if 1 else 2", "if/else is not allowed"),
    ("9**9**9", "too large"),
    ("10**10**10", "too large"),
    ("2**14000", "too large"),
    ("factorial(10**6)", "too large"),
    ("comb(10**9, 10**8)", "too large"),
    ("2.0**100000", "too large"),
    ("round(1/3, 10**9)", "digits must be within"),
    ("round(5, -10**9)", "digits must be within"),
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("log(0)", "math domain error"),
    ("factorial(2.5)", "takes whole numbers"),
    ("(-8) ** (1/3)", "not a real number"),
    ("1 +", "invalid expression"),
    ("(" * 300 + "1" + ")" * 300, "invalid expression"),
    ("-" * 999 + "1", "nested too deeply"),
    ("1+" * 600 + "1", "the limit is 1000"),
]


@pytest.mark.parametrize("expression, message", REFUSALS, ids=lambda value: value[:40])
def test_calculator_refuses_escapes_and_bombs_quickly(expression, message):
    start = time.process_time()  # CPU time: what a bomb would burn, and steady on a shared, loaded machine
    with pytest.raises(ToolError, match=re.escape(message)):
        calculator(expression)
    assert time.process_time() - start < 0.1


def test_calculator_never_evals():
    source = Path(calculator_module.__file__).read_text()
    assert not re.search(r"\b(eval|exec|compile)\(", source)


# ---- docs search -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ("parse command line arguments", {"argparse"}),
    ("compress data gzip", {"gzip", "zlib"}),
    ("decimal fixed point arithmetic", {"decimal"}),  # documented in its pure-Python twin, _pydecimal
    ("send an email with smtp", {"smtplib"}),
    ("heap queue priority", {"heapq"}),
])
def test_search_docs_finds_the_module(query, expected):
    results = search_docs(query, 3)
    assert len(results) == 3 and expected & {result["title"] for result in results}
    assert all(len(result["snippet"]) <= 302 for result in results)


def test_docs_index_is_built_once_and_ranks_deterministically():
    assert stdlib_index() is stdlib_index()
    index = DocIndex([Document("b", "same words here"), Document("a", "same words here"), Document("c", "other")])
    assert [doc.title for doc, _ in index.search("same words", 5)] == ["a", "b"]  # ties by title; c shares nothing
    assert index.search("nothing matches", 3) == []
    with pytest.raises(ValueError, match="unique"):
        DocIndex([Document("a", "x"), Document("a", "y")])


def test_open_doc_pages_and_suggests_titles():
    text = stdlib_index().get("argparse").text
    first = open_doc("argparse")
    assert first.startswith(text[:2000]) and first.endswith("more characters; read on with offset=2000]")
    assert open_doc("argparse", 2000).startswith(text[2000:4000])
    with pytest.raises(ToolError, match="no document titled 'argprse'; did you mean argparse"):
        open_doc("argprse")


def test_a_folder_of_documents(tmp_path):
    (tmp_path / "guide").mkdir()
    (tmp_path / "guide" / "install.md").write_text("# Install\nRun pip install to install the package.")
    (tmp_path / "usage.md").write_text("# Usage\nCall the function with arguments.")
    index = DocIndex.from_folder(tmp_path)
    assert [doc.title for doc, _ in index.search("how to install", 2)] == ["guide/install.md"]


# ---- the interpreter tool ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_tool():
    interpreter = PythonTool(timeout_s=5)
    probe = interpreter("1")
    if probe.status == "sandbox_error":
        interpreter.close()
        pytest.skip(f"the sandbox cannot start on this host: {probe.error}")
    yield interpreter
    interpreter.close()


def test_python_tool_keeps_state_and_reports_errors(python_tool):
    executor = ToolExecutor(interpreter=python_tool)
    assert executor(Call("interpreter", "python", {"code": "x = 6\nprint('six')"}, "")) == ToolResult(stdout="six\n")
    assert executor(Call("interpreter", "python", {"code": "x * 7"}, "")) == ToolResult(value="42")
    failed = executor(Call("interpreter", "python", {"code": "x / 0"}, ""))
    assert failed.status == "error" and failed.error.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "worker.py" not in failed.error  # the sandbox's own frames are not the model's
    bad = executor(Call("interpreter", "python", {}, ""))
    assert (bad.status, bad.error) == ("invalid_arguments", "python: argument 'code' is required")
    python_tool.reset()
    assert "NameError" in executor(Call("interpreter", "python", {"code": "x"}, "")).error


def test_interpreter_call_from_ids_to_environment_turn(released, python_tool):
    executor = ToolExecutor(interpreter=python_tool)
    history = [*executor.system_turns(), {"role": "user", "content": "What is 123*456?"}]
    turn = {"role": "assistant", "content": "", "tool_call": {"type": "interpreter", "code": "print(123 * 456)"}}
    prompt, _ = TEMPLATE.encode(history, released, add_generation_prompt=True)
    whole, _ = TEMPLATE.encode([*history, turn], released)
    parsed = parse_ids(whole[len(prompt):], released, tools=executor.specs())
    assert parsed.error is None and parsed.call.arguments == {"code": "print(123 * 456)"}
    assert result_turn(parsed.call, executor(parsed.call)) == {"role": "environment", "name": "interpreter",
                                                               "content": "56088"}


def test_cell_results_keep_figures_and_say_what_was_cut():
    cell = CellResult("ok", stdout="plotted\n", images=("fig-001.png",), truncated_bytes=10)
    result = to_result(cell)
    assert result == ToolResult(stdout="plotted\n", stderr="\n[10 more bytes of output were not kept]\n",
                                images=("fig-001.png",))
    turn = result_turn(Call("interpreter", "python", {"code": "plt.show()"}, ""),
                       dataclasses.replace(result, value="<Figure>"))
    assert turn["content"] == ("plotted\n\n[10 more bytes of output were not kept]\n<Figure>\n"
                               "![fig-001](fig-001.png)")  # the figure link after the value


def test_python_tool_without_a_sandbox_is_an_error_result(monkeypatch):
    def unavailable(*args, **kwargs):
        raise SandboxError("no sandbox here")

    monkeypatch.setattr(python_module, "PythonSession", unavailable)
    assert PythonTool()("1") == ToolResult(status="sandbox_error", error="no sandbox here")


# ---- through the chat template and the released tokenizer -------------------------------------------------------


def test_tools_list_renders_and_parses_back(released):
    executor = ToolExecutor(BUILTIN_TOOLS)
    turns = executor.system_turns()
    assert turns == system_turns(tools=executor.openai_tools()) == with_tools([], executor.openai_tools())
    assert json.loads(turns[0]["content"]) == [spec["function"] for spec in executor.openai_tools()]
    call = {"role": "assistant", "content": "Let me compute.",
            "tool_call": {"type": "plugin", "name": "calculator", "parameters": {"expression": "2**10 / 3"}}}
    history = [*turns, {"role": "user", "content": "What is 2**10 / 3?"}]
    prompt, _ = TEMPLATE.encode(history, released, add_generation_prompt=True)
    assert "<|im_start|>system name=<|plugin|>\n[{\"name\": \"calculator\"" in released.decode(prompt)
    whole, _ = TEMPLATE.encode([*history, call], released)
    parsed = parse_ids(whole[len(prompt):], released, tools=executor.specs())
    assert parsed.error is None and parsed.content == "Let me compute."
    assert (parsed.call.name, parsed.call.arguments) == ("calculator", {"expression": "2**10 / 3"})
    environment = result_turn(parsed.call, executor(parsed.call))
    assert environment == {"role": "environment", "name": "plugin", "content": "341.3333333333333"}
    rendered = released.decode(TEMPLATE.encode([*history, call, environment], released)[0])
    assert rendered.endswith("<|im_start|>environment name=<|plugin|>\n341.3333333333333<|im_end|>\n")
    # A call the model got wrong is refused by the parser and by the executor alike.
    wrong = dict(call, tool_call={**call["tool_call"], "parameters": {"expression": 3}})
    whole, _ = TEMPLATE.encode([*history, wrong], released)
    refused = parse_ids(whole[len(prompt):], released, tools=executor.specs())
    assert refused.error.code == "invalid_arguments" and "'expression'" in refused.error.message
    assert executor(refused.call).status == "invalid_arguments"
