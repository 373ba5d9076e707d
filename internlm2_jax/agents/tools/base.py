"""Tools an agent may call: `Tool` (a name, a description, the JSON Schema of its parameters, a function), `@tool`
that writes the schema from the function's type hints and docstring, and `ToolExecutor`, the one place where a
parsed `protocol.Call` becomes a `protocol.ToolResult`.

How failures come back (agents.md §1.5, §2.5): always as a result the model can read, never as an exception in the
agent loop. `ToolResult.status` is the error's type, `ToolResult.error` its message:

- `unknown_tool`: the name is not declared (the message lists the declared names);
- `invalid_arguments`: the arguments break the schema (each problem names its field);
- `tool_error`: the function raised; `ToolError`'s message is shown as is, any other exception as
  `TypeName: message` (the tool's traceback is ours, not something the model can act on);
- `timeout`: a tool with `timeout_s` ran past it.

Timeouts: a thread cannot be stopped, and `signal.alarm` works only in the main thread, so a tool with `timeout_s`
runs in a child process (`python -c`, fresh: no fork of a process that holds JAX threads) that is killed, with its
process group, at the deadline. Such a function must be importable by its module and name. A tool without
`timeout_s` runs in the caller's thread and must be bounded by construction (the calculator's size limits, the docs
index's caps). The child process isolates time, not trust: untrusted code belongs in the sandbox (`PythonTool`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from internlm2_jax.agents.protocol import INTERPRETER_PROMPT_EN, Call, ToolResult, system_turns
from internlm2_jax.agents.tools.schema import from_json, function_schema
from internlm2_jax.agents.validate import argument_errors

if TYPE_CHECKING:
    from internlm2_jax.agents.tools.python import PythonTool

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names

# Runs one call of a tool with a timeout. Reads two pickles on stdin, the parent's sys.path (first, so that the
# arguments' own classes can be imported) and then (module, qualname, kwargs); writes ("ok", value) or ("error",
# exception type, message) as a pickle on the original stdout. The tool's prints go to stderr so they cannot corrupt
# the reply.
_CHILD = """
import importlib, os, pickle, sys
sys.path[:] = pickle.load(sys.stdin.buffer)
request = pickle.load(sys.stdin.buffer)
reply = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
try:
    fn = importlib.import_module(request["module"])
    for part in request["qualname"].split("."):
        fn = getattr(fn, part)
    fn = getattr(fn, "fn", fn)  # the module attribute is the Tool that @tool made of the function
    result = ("ok", fn(**request["kwargs"]))
except Exception as exc:
    result = ("error", f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc))
pickle.dump(result, reply)
"""


class ToolError(Exception):
    """A failure the tool explains to the model: its message is shown as is."""


class ToolTimeout(Exception):
    """A tool with `timeout_s` ran past it (`Tool.run` raises it; the executor makes it a `timeout` result)."""

    def __init__(self, seconds: float):
        super().__init__(f"the tool did not finish within {seconds:g} s and was stopped")


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]  # JSON Schema of an object: the call's arguments
    fn: Callable[..., Any]
    timeout_s: float | None = None  # None: runs in the caller's thread; seconds: in a child process killed after it
    # Parameter hints for turning JSON arguments into the values the function expects (set by @tool).
    hints: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r}: must match {NAME.pattern} (letters, digits, _ and -, at most "
                             "64 characters)")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON Schema with \"type\": \"object\"")
        if self.timeout_s is not None:
            if not self.timeout_s > 0:
                raise ValueError(f"tool {self.name!r}: timeout_s must be positive, got {self.timeout_s}")
            qualname, module = getattr(self.fn, "__qualname__", ""), getattr(self.fn, "__module__", None)
            if not qualname or "<" in qualname or module in (None, "__main__"):
                raise TypeError(f"tool {self.name!r}: a tool with a timeout runs in a child process, which finds the "
                                f"function by module and name; {qualname or self.fn!r} in {module} cannot be found "
                                "that way (use a module-level function)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The function itself: a decorated function stays callable as before."""
        return self.fn(*args, **kwargs)

    def spec(self) -> dict[str, Any]:
        """The OpenAI tool definition."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}}

    def run(self, arguments: Mapping[str, Any]) -> Any:
        """Call the function with already validated JSON arguments (converted by the hints when it has them)."""
        hints = self.hints or {}
        kwargs = {name: from_json(value, hints[name]) if name in hints else value for name, value in arguments.items()}
        if self.timeout_s is None:
            return self.fn(**kwargs)
        return _run_in_child(self.fn, kwargs, self.timeout_s)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout_s: float | None = None) -> Any:
    """`@tool` or `@tool(name=..., description=..., timeout_s=...)`: a `Tool` whose parameters schema comes from the
    function's type hints (see `schema`) and whose description is its docstring's text before `Args:`."""

    def make(fn: Callable[..., Any]) -> Tool:
        doc, parameters, hints = function_schema(fn)
        return Tool(name or fn.__name__, doc if description is None else description, parameters, fn, timeout_s,
                    hints)

    return make if fn is None else make(fn)


class ToolExecutor:
    """The declared tools by name (registration refuses a second tool of the same name, like AgentLego's), the OpenAI
    `tools` list and system turns that announce them, and `executor(call) -> ToolResult`. Interpreter calls go to
    `interpreter` (a `PythonTool`) when there is one."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), *, interpreter: PythonTool | None = None):
        self._tools: dict[str, Tool] = {}
        self.interpreter = interpreter
        for item in tools:
            self.register(item)

    def register(self, item: Tool | Callable[..., Any]) -> Tool:
        """Declare a tool (a plain function goes through `@tool` first); returns it."""
        made = item if isinstance(item, Tool) else tool(item)
        if made.name in self._tools:
            raise ValueError(f"a tool named {made.name!r} is already registered")
        self._tools[made.name] = made
        return made

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def openai_tools(self) -> list[dict[str, Any]]:
        """The OpenAI `tools` list, in registration order (the order the model is shown)."""
        return [item.spec() for item in self._tools.values()]

    def specs(self) -> dict[str, Mapping[str, Any]]:
        """Name -> parameters schema: what `protocol.parse_ids(tools=...)` checks calls against."""
        return {name: item.parameters for name, item in self._tools.items()}

    def system_turns(self, *, meta: str | None = None, interpreter_prompt: str = INTERPRETER_PROMPT_EN,
                     style: Literal["compact", "lagent"] = "compact") -> list[dict[str, Any]]:
        """The system turns announcing these tools (and the interpreter when there is one)."""
        return system_turns(meta=meta, interpreter_prompt=interpreter_prompt if self.interpreter else None,
                            tools=self.openai_tools() or None, style=style)

    def __call__(self, call: Call) -> ToolResult:
        target = self.interpreter if call.kind == "interpreter" else self._tools.get(call.name)
        if target is None:
            what = f"unknown tool {call.name!r}" if call.kind == "plugin" else "the code interpreter is not enabled"
            return _failure("unknown_tool", f"{what}; {self._declared()}")
        problems = argument_errors(call.arguments, target.parameters)
        if problems:
            return _failure("invalid_arguments", f"{call.name}: {'; '.join(problems)}")
        if call.kind == "interpreter":
            return self.interpreter(call.arguments["code"])  # the session makes a result of whatever the code does
        try:
            return ToolResult(value=target.run(call.arguments))
        except ToolTimeout as exc:
            return _failure("timeout", f"{call.name}: {exc}")
        except ToolError as exc:
            return _failure("tool_error", f"{call.name}: {exc}")
        except Exception as exc:  # whatever the tool raised is the model's to read, not the agent loop's to die of
            return _failure("tool_error", f"{call.name}: {_describe(type(exc).__qualname__, str(exc))}")

    def _declared(self) -> str:
        return f"declared tools: {', '.join(self._tools)}" if self._tools else "no tools are declared"

    def close(self) -> None:
        if self.interpreter is not None:
            self.interpreter.close()

    def __enter__(self) -> ToolExecutor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _failure(status: str, message: str) -> ToolResult:
    return ToolResult(status=status, error=message)


def _describe(type_name: str, message: str) -> str:
    return f"{type_name}: {message}" if message else type_name


def _run_in_child(fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float) -> Any:
    request = pickle.dumps(sys.path) + pickle.dumps({"module": fn.__module__, "qualname": fn.__qualname__,
                                                     "kwargs": kwargs})
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(request, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its process group: whatever the tool started goes too
        except ProcessLookupError:
            pass  # it ended just now; its output is dropped all the same
        proc.communicate()
        raise ToolTimeout(timeout_s) from None
    try:
        reply = pickle.loads(out)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise ToolError(f"the tool's process ended without a result ({last[0]})") from exc
    if reply[0] == "ok":
        return reply[1]
    type_name, message = reply[1], reply[2]
    if type_name == f"{ToolError.__module__}.{ToolError.__qualname__}":
        raise ToolError(message)
    raise ToolError(_describe(type_name.rpartition(".")[2], message))
