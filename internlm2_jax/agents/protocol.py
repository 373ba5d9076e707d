"""InternLM2's tool protocol (agents.md §1, §2.2): the system turns that announce tools and the code interpreter, the
parser that reads a call out of generated **token ids**, the environment turn that carries a result back, and the
ids that stop or ban a call.

A call is `<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>` or
`<|action_start|><|interpreter|>\\n```python\\n...\\n```<|action_end|>`. The template encodes message content as plain
text, so a user can make the model *repeat* the marker text; only the control ids mean a call, and `parse_ids`
looks at nothing else. `parse_text` exists for backends that return text only, and says so in its warnings.

Pure: the chat template's converters, the tokenizer, the argument validator (`agents.validate`, shared with the
tools) and the standard library; no model, no JAX.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from internlm2_jax.agents.validate import argument_errors, json_type
from internlm2_jax.chat_prompts import with_tools
from internlm2_jax.tokenizer import ACTION_END, ACTION_START, EOS, IM_END, INTERPRETER, PLUGIN
from internlm2_jax.tokenizer.special_tokens import CHAT_SPECIAL_TOKENS

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

# ---- the prompts InternLM ships (agents.md §1.3, verbatim) -------------------------------------------------------

# lagent's plain meta prompt: "When tools and code are enabled, choose the appropriate tool according to the need".
META_CN = "当开启工具以及代码时，根据需求选择合适的工具进行调用"
# InternLM chat_format.md's interpreter system turn.
INTERPRETER_PROMPT_EN = (
    "You now have access to a Jupyter notebook environment supporting Python code execution. Just send code to python "
    "to run in this stateful environment. This feature is suitable for:\n"
    "- Data analysis or processing (such as data manipulation and graphic creation)\n"
    "- Complex calculations (such as math and physics problems)\n"
    "- Programming examples (for understanding programming concepts or language features)\n"
    "- Text processing and analysis (including text analysis and natural language processing)\n"
    "- Machine learning and data science (model training and data visualization)\n"
    "- File operations and data import (handling CSV, JSON, etc. formats)")
# lagent's INTERPRETER_CN: the same content as one Chinese paragraph.
INTERPRETER_PROMPT_CN = (
    "你现在已经能够在一个有状态的 Jupyter 笔记本环境中运行 Python 代码。当你向 python 发送含有 Python 代码的"
    "消息时，它将在该环境中执行。这个工具适用于多种场景，如数据分析或处理（包括数据操作、统计分析、图表绘制）"
    "，复杂的计算问题（解决数学和物理难题），编程示例（理解编程概念或特性），文本处理和分析（比如文本解析和自"
    "然语言处理），机器学习和数据科学（用于展示模型训练和数据可视化），以及文件操作和数据导入（处理CSV、JSON"
    "等格式的文件）。")
# The prompt behind the published "MATH with code interpreter" numbers, used with no meta turn (note the trailing
# space before the final newline, as in the source).
MATH_INTERPRETER_PROMPT = (
    "Integrate step-by-step reasoning and Python code to solve math problems using the following guidelines:\n"
    "- Just write jupyter code to solve the problem without giving your thought;\n"
    "- Present the final result in LaTeX using a '\\boxed{}' without any units. \n")
# lagent's PLUGIN_CN around the indented tool list: "You can use the following tools: ... If you already have enough
# information, answer directly. Avoid unnecessary tool calls! Mind which tools you can use; do not make them up!"
PLUGIN_PROMPT_CN = ("你可以使用如下工具：\n{prompt}\n如果你已经获得足够信息，请直接给出答案. 避免不必要的工具调用! "
                    "同时注意你可以使用的工具，不要随意捏造！")

INTERPRETER_TOOL_NAME = "python"  # what an interpreter call is called outside the protocol (OpenAI tool calls)
MAX_BODY_BYTES = 64 * 1024
RESULT_LIMIT_CHARS = 4000

# Names a text-only backend may leave in its output; parse_text treats them as control tokens. (Not "<s>", which is
# also HTML; a backend that keeps control tokens ends with "</s>" at most.)
_TEXT_CONTROL = re.compile("|".join(re.escape(name) for name in (*CHAT_SPECIAL_TOKENS, EOS)))
_OPENING_FENCE = re.compile(r"```[\w+.\-]*[ \t]*\n?")
_KINDS = {PLUGIN: "plugin", INTERPRETER: "interpreter"}
# Tokens that may follow a call without being "text after the call".
_ENDINGS = {ACTION_END, IM_END, EOS}


@dataclasses.dataclass(frozen=True)
class Call:
    """What the model asked for."""

    kind: Literal["plugin", "interpreter"]
    name: str  # plugin: the function's name; interpreter: "python"
    arguments: dict[str, Any]  # plugin: its parameters; interpreter: {"code": str}
    raw: str  # the body as generated, kept for traces


@dataclasses.dataclass(frozen=True)
class ParseError:
    """Why a call could not be taken; `message` is written to be shown to the model."""

    code: Literal["invalid_json", "not_a_call", "unknown_tool", "invalid_arguments", "truncated_call",
                  "unknown_action_kind", "too_large", "empty_code"]
    message: str
    raw: str  # the body as generated


@dataclasses.dataclass(frozen=True)
class Parsed:
    content: str  # the text before the call, control tokens removed
    call: Call | None  # also set beside an unknown_tool / invalid_arguments error, for traces
    error: ParseError | None = None
    warnings: tuple[str, ...] = ()  # "missing_action_end", "text_after_call_ignored", "trailing_text_after_json", ...


# Name -> JSON Schema of its parameters (None: not checked). `tool_specs` builds it from OpenAI tool definitions.
ToolSpecs = Mapping[str, Mapping[str, Any] | None]


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What running a call gave. Plugins fill `value` (any JSON-serialisable object) or `error`; the interpreter
    fills the streams, `value` (the last expression's repr, like Jupyter's execute_result), `images` (figures it
    saved, announced after the value) and `error` (the traceback).

    `status` says how it went; anything but "ok" is a failure that `error` explains to the model:
    - "ok": the tool ran (for the interpreter, without raising);
    - the interpreter's (`sandbox.CellResult`): "error" (the code raised), "timeout" (interrupted at the time
      limit, variables kept), "memory" (over the memory limit), "restarted" (the interpreter died and was
      restarted: variables lost), "sandbox_error" (no sandbox could be started);
    - the executor's (`tools.ToolExecutor`): "unknown_tool", "invalid_arguments" (against the tool's schema),
      "tool_error" (the function raised), "timeout" (a plugin past its `timeout_s`);
    - a call that could not be parsed (the agent loop feeds it back): `ParseError.code`, e.g. "invalid_json".
    """

    value: Any = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    status: str = "ok"
    images: tuple[str, ...] = ()  # file names in the interpreter's work directory (plots)


# ---- system turns and tools --------------------------------------------------------------------------------------


def system_turns(*, meta: str | None = None, interpreter_prompt: str | None = None, tools: Sequence[Any] | None = None,
                 style: Literal["compact", "lagent"] = "compact") -> list[dict[str, Any]]:
    """Template messages announcing the tools, in InternLM's order: plain system, `name=interpreter`, `name=plugin`.

    `tools` are OpenAI tool definitions or bare function schemas. "compact": the schemas as compact JSON, exactly as
    SFT data renders them (`chat_prompts.with_tools`); "lagent": lagent's PLUGIN_CN around the schemas indented by 4
    (the schemas as given, not rewritten into lagent's own parameter-list form).
    """
    turns = []
    if meta is not None:
        turns.append({"role": "system", "content": meta})
    if interpreter_prompt is not None:
        turns.append({"role": "system", "name": "interpreter", "content": interpreter_prompt})
    if tools:
        [plugin] = with_tools([], list(tools))
        if style == "lagent":
            schemas = json.dumps(json.loads(plugin["content"]), ensure_ascii=False, indent=4)
            plugin["content"] = PLUGIN_PROMPT_CN.format(prompt=schemas)
        elif style != "compact":
            raise ValueError(f"style is {style!r}; expected 'compact' or 'lagent'")
        turns.append(plugin)
    return turns


def tool_specs(tools: Sequence[Any]) -> dict[str, Mapping[str, Any] | None]:
    """Name -> parameters schema of OpenAI tool definitions or bare function schemas (what `parse_ids` checks)."""
    specs = {}
    for tool in tools:
        schema = tool.get("function", tool)
        specs[schema["name"]] = schema.get("parameters")
    return specs


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Decoding with tools stops at EOS, `<|im_end|>` and `<|action_end|>` (as LMDeploy and InternLM's scripts do),
    so a model cannot go on to invent the environment's answer."""
    return (tokenizer.eos_id, tokenizer.token_id(IM_END), tokenizer.token_id(ACTION_END))


def action_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids to ban when no call may be made: without `<|action_start|>` no call can begin."""
    return (tokenizer.token_id(ACTION_START),)


# ---- parsing -----------------------------------------------------------------------------------------------------

# A model output as control tokens and text between them: (name, text) for a control token, (None, text) for text.
_Piece = tuple[str | None, str]


def parse_ids(ids: Sequence[int], tokenizer: Tokenizer, *, finish_reason: str | None = "stop",
              tools: ToolSpecs | None = None, interpreter: bool = True) -> Parsed:
    """The content and call of a generated assistant turn (ids in the vocabulary, a stop id may end them).

    `finish_reason` "length" turns a call without `<|action_end|>` into `truncated_call`. `tools=None` accepts any
    plugin name; a mapping (even empty) must name it. Never raises on any id sequence; linear in its length.
    """
    names = {token_id: name for name, token_id in tokenizer.special_tokens.items()}
    pieces: list[_Piece] = []
    run: list[int] = []
    for token_id in map(int, ids):  # numpy and jax integers too
        name = names.get(token_id)
        if name is None:
            run.append(token_id)
            continue
        if run:
            pieces.append((None, tokenizer.decode(run)))
            run = []
        pieces.append((name, name))
    if run:
        pieces.append((None, tokenizer.decode(run)))
    return _parse(pieces, finish_reason, tools, interpreter, ())


def parse_text(text: str, *, finish_reason: str | None = "stop", tools: ToolSpecs | None = None,
               interpreter: bool = True) -> Parsed:
    """`parse_ids` for backends that return only text (control tokens kept as their names). Typed marker text and a
    real call look the same here, so the result carries the warning "text_level_parse"."""
    pieces: list[_Piece] = []
    start = 0
    for match in _TEXT_CONTROL.finditer(text):
        if match.start() > start:
            pieces.append((None, text[start:match.start()]))
        pieces.append((match.group(), match.group()))
        start = match.end()
    if start < len(text):
        pieces.append((None, text[start:]))
    return _parse(pieces, finish_reason, tools, interpreter, ("text_level_parse",))


class _Rejected(Exception):
    """Raised inside the parser only: `_parse` turns it into `Parsed.error`, so no caller ever sees it."""

    def __init__(self, code: str, message: str, raw: str, call: Call | None = None, warnings: tuple[str, ...] = ()):
        super().__init__(message)
        self.error, self.call, self.warnings = ParseError(code, message, raw), call, warnings


def _parse(pieces: list[_Piece], finish_reason: str | None, tools: ToolSpecs | None, interpreter: bool,
           warnings: tuple[str, ...]) -> Parsed:
    start = next((i for i, (name, _) in enumerate(pieces) if name == ACTION_START), len(pieces))
    content = "".join(text for name, text in pieces[:start] if name is None)
    if start == len(pieces):
        return Parsed(content, None, None, warnings)
    try:
        kind, body, found = _action(pieces[start + 1:], finish_reason)
        warnings += found
        if kind == "interpreter":
            call = _interpreter_call(body)
        else:
            call, found = _plugin_call(body)
            warnings += found
        _check_declared(call, tools, interpreter)
    except _Rejected as rejected:
        return Parsed(content, rejected.call, rejected.error, warnings + rejected.warnings)
    return Parsed(content, call, None, warnings)


def _action(pieces: list[_Piece], finish_reason: str | None) -> tuple[str, str, tuple[str, ...]]:
    """(kind, body, warnings) of what follows `<|action_start|>`."""
    rest = "".join(text for _, text in pieces)
    kind_at = 0  # whitespace between <|action_start|> and the kind is tolerated
    while kind_at < len(pieces) and pieces[kind_at][0] is None and not pieces[kind_at][1].strip():
        kind_at += 1
    if kind_at == len(pieces) and finish_reason == "length":
        raise _Rejected("truncated_call", "the output ended (length limit) inside a tool call", rest)
    if kind_at == len(pieces) or pieces[kind_at][0] not in _KINDS:
        raise _Rejected("unknown_action_kind", f"<|action_start|> must be followed by {PLUGIN} or {INTERPRETER}",
                        rest)
    end = next((i for i in range(kind_at + 1, len(pieces)) if pieces[i][0] is not None), len(pieces))
    body = "".join(text for _, text in pieces[kind_at + 1:end])
    warnings = ()
    if end == len(pieces) and finish_reason == "length":
        raise _Rejected("truncated_call", "the output ended (length limit) before <|action_end|>", body)
    if end == len(pieces) or pieces[end][0] != ACTION_END:
        warnings += ("missing_action_end",)
    after = pieces[end + 1:] if end < len(pieces) and pieces[end][0] == ACTION_END else pieces[end:]
    if any((name is None and text.strip()) or (name is not None and name not in _ENDINGS) for name, text in after):
        warnings += ("text_after_call_ignored",)  # e.g. a second call: one call per turn
    if len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        raise _Rejected("too_large", f"the call is over {MAX_BODY_BYTES} bytes", body[:MAX_BODY_BYTES],
                        warnings=warnings)
    return _KINDS[pieces[kind_at][0]], body, warnings


def _interpreter_call(body: str) -> Call:
    """The code between the first opening fence (any info string) and the last closing fence; no fence: the whole
    body. Taking the *last* fence keeps code that has a ``` inside a string whole (lagent's non-greedy match cuts
    it)."""
    opening = _OPENING_FENCE.search(body)
    if opening is None:
        code = body.strip()
    else:
        close = body.rfind("```", opening.end())
        code = body[opening.end():].rstrip() if close < 0 else body[opening.end():close].removesuffix("\n")
    if not code.strip():
        raise _Rejected("empty_code", "the interpreter call has no code", body)
    return Call("interpreter", INTERPRETER_TOOL_NAME, {"code": code}, body)


def _plugin_call(body: str) -> tuple[Call, tuple[str, ...]]:
    """The call of a plugin body and the warnings it raised: one ```json fence unwrapped, the JSON object from the
    first `{`, `parameters` or `arguments`, parameters given as JSON text decoded once."""
    text = body.strip()
    if text.startswith("```"):
        text = text[text.find("\n") + 1:] if "\n" in text else text[3:]
        text = text.strip().removesuffix("```")
    first = text.find("{")
    if first < 0:
        raise _Rejected("not_a_call", 'a plugin call is a JSON object {"name": ..., "parameters": {...}}', body)
    try:
        value, stop = json.JSONDecoder().raw_decode(text, first)
    except json.JSONDecodeError as e:
        raise _Rejected("invalid_json", f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", body) from None
    except RecursionError:  # CPython's decoder recurses once per nesting level
        raise _Rejected("invalid_json", "invalid JSON: nested too deeply", body) from None
    except ValueError as e:  # e.g. an integer over the interpreter's digit limit
        raise _Rejected("invalid_json", f"invalid JSON: {e}", body) from None
    warnings = ("trailing_text_after_json",) if text[stop:].strip() else ()
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise _Rejected("not_a_call", 'a plugin call is a JSON object {"name": str, "parameters": {...}}', body,
                        warnings=warnings)
    if "parameters" not in value and "arguments" not in value:
        arguments, warnings = {}, (*warnings, "missing_parameters")
    else:
        arguments = value.get("parameters", value.get("arguments"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            pass  # reported just below as not an object
    if not isinstance(arguments, dict):
        raise _Rejected("not_a_call", f'"parameters" must be a JSON object, got {json_type(arguments)}', body,
                        warnings=warnings)
    return Call("plugin", value["name"], arguments, body), warnings


def _check_declared(call: Call, tools: ToolSpecs | None, interpreter: bool) -> None:
    if call.kind == "interpreter":
        if not interpreter:
            raise _Rejected("unknown_tool", "the code interpreter is not enabled; call one of the declared tools",
                            call.raw, call)
        return
    if tools is not None and call.name not in tools:
        declared = f"declared tools: {', '.join(tools)}" if tools else "no tools are declared"
        raise _Rejected("unknown_tool", f"unknown tool {call.name!r}; {declared}", call.raw, call)
    problems = argument_errors(call.arguments, (tools or {}).get(call.name))
    if problems:  # the same check and wording as `ToolExecutor`'s, so the model is told one thing either way
        raise _Rejected("invalid_arguments", f"{call.name}: {'; '.join(problems)}", call.raw, call)


# ---- results -----------------------------------------------------------------------------------------------------

_STATUS_LINES = {"timeout": "Timeout (interrupted; variables kept).",
                 "restarted": "The interpreter was restarted; all variables were lost."}


def result_turn(call: Call, result: ToolResult, *, limit_chars: int = RESULT_LIMIT_CHARS) -> dict[str, Any]:
    """The environment message that carries `result` back: plugin results as JSON (errors as
    `{"error": {"type", "message"}}`), interpreter results as Jupyter-like text (stdout, stderr, the value, a
    `![fig-001](fig-001.png)` line per figure, the traceback, a status line); capped at `limit_chars`."""
    if call.kind == "plugin":
        if result.status != "ok" or result.error is not None:
            body = {"error": {"type": "error" if result.status == "ok" else result.status,
                              "message": result.error or ""}}
            text = json.dumps(body, ensure_ascii=False)
        else:
            try:
                text = json.dumps(result.value, ensure_ascii=False)
            except (TypeError, ValueError):  # not JSON-serialisable (or circular): its str is the best we have
                text = str(result.value)
    else:
        value = result.value if result.value is None or isinstance(result.value, str) else repr(result.value)
        figures = "".join(f"![{name.rpartition('.')[0] or name}]({name})\n" for name in result.images)
        parts = (result.stdout, result.stderr, value, figures, result.error, _STATUS_LINES.get(result.status))
        text = "\n".join(part.rstrip("\n") for part in parts if part)
    return {"role": "environment", "name": call.kind, "content": cap(text, limit_chars)}


def cap(text: str, limit_chars: int = RESULT_LIMIT_CHARS) -> str:
    """`text` if it fits, else its first 3/4 and last 1/5 of `limit_chars` around a marker saying how much is gone
    (3,000 + 800 of 4,000): the end of a traceback matters as much as its start."""
    if len(text) <= limit_chars:
        return text
    head, tail = limit_chars * 3 // 4, limit_chars // 5
    return f"{text[:head]}\n…[{len(text) - head - tail} characters omitted]…\n{text[-tail:]}"
