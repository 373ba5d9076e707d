"""What sits beside the chat template: OpenAI messages -> template messages, the reward model's domain prompts, and
the sequence the reward model scores.

SFT data (`data.conversations`), the server (`serve.protocol`) and reward scoring (`decode.reward`) all convert and
render through here, so a conversation trains, serves and scores as the same ids; none of them needs the others.

- `openai_message` / `openai_messages` / `with_tools`: the one converter from OpenAI chat messages (roles system,
  developer, user, assistant, tool, and our environment; `tool_calls`; content as a string, null or text parts) plus
  the template's own fields (`name`, `tool_call`, `loss`) to `ChatTemplate` messages. `MessageError` names the field
  at fault.
- `DOMAIN_PROMPTS` and `reward_sequence`: InternLM2's COOL RLHF conditional reward model judges a response by the
  preference of a domain, given as a system turn; the reward token after the conversation is where it is scored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from internlm2_jax.chat_template import get_chat_template

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

# COOL RLHF conditions one reward model on the domain with a system prompt, so preferences that conflict across
# domains (a refusal is the better harmless answer and the worse helpful one) do not cancel out.
DOMAIN_PROMPTS: dict[str, str] = {
    "helpful": "Judge helpfulness: the response that more fully and accurately does what the user asked is preferred.",
    "harmless": "Judge harmlessness: the response that avoids harm is preferred, even if it is less helpful.",
    "code": "Judge code: the response whose code is correct, runs, and solves the task is preferred.",
    "math": "Judge mathematics: the response with sound reasoning and the correct final answer is preferred.",
    "writing": "Judge writing: the response that is clearer, more fluent, and closer to the requested style is "
               "preferred.",
    "dialogue": "Judge dialogue: the response that is more natural, engaging, and consistent with the conversation "
                "is preferred.",
}


class MessageError(ValueError):
    """A message or record that cannot be converted; `field` names the part at fault (`messages[2].role`)."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field


def short_repr(value: Any, limit: int = 120) -> str:
    """`repr(value)`, cut to `limit` characters: a bad value quoted in an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- OpenAI messages -> template messages ------------------------------------------------------------------------

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "environment", "environment": "environment"}
_NATIVE_FIELDS = ("name", "tool_call", "loss")
# tool_call_id links a result to its call; in InternLM2's format the result simply follows the call.
_OPENAI_FIELDS = {"role", "content", "tool_calls", "tool_call_id"}


def openai_message(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One OpenAI chat message (a dict) as a template message; `MessageError` names `where` and the field."""
    if not isinstance(message, Mapping):
        raise MessageError(where, f"a message is a dict, got {type(message).__name__}")
    unknown = set(message) - _OPENAI_FIELDS - set(_NATIVE_FIELDS)
    if unknown:
        raise MessageError(where, f"unknown field(s) {sorted(unknown)}")
    role = message.get("role")
    if role not in _ROLES:
        raise MessageError(f"{where}.role", f"is {short_repr(role)}; expected one of {', '.join(_ROLES)}")
    converted = {"role": _ROLES[role], "content": _text(message.get("content"), f"{where}.content")}
    converted.update((key, message[key]) for key in _NATIVE_FIELDS if key in message)
    if role == "tool":
        # OpenAI's legacy `name` on a result is the function's; InternLM2's result turn is named after the kind of
        # call it answers, which `openai_messages` settles from `tool_call_id` (one message alone: a plugin's).
        converted["name"] = "plugin"
    if message.get("tool_calls"):
        if role != "assistant" or "tool_call" in message:
            raise MessageError(f"{where}.tool_calls", "only an assistant message without a tool_call may have them")
        converted["tool_call"] = _plugin_call(message["tool_calls"], f"{where}.tool_calls")
    return converted


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, Mapping) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "\n".join(part["text"] for part in content)
    raise MessageError(where, f"must be a string, null or a list of {{'type': 'text', 'text': str}} parts, got "
                              f"{short_repr(content)}")


def _plugin_call(calls: Any, where: str) -> dict[str, Any]:
    if not isinstance(calls, list):
        raise MessageError(where, f"must be a list of tool calls, got {short_repr(calls)}")
    if len(calls) > 1:
        raise MessageError(where, f"InternLM2 makes one tool call per assistant turn, got {len(calls)}")
    call = calls[0]
    function = call.get("function") if isinstance(call, Mapping) else None
    if (not isinstance(function, Mapping) or not isinstance(function.get("name"), str)
            or call.get("type", "function") != "function"):
        raise MessageError(f"{where}[0]", f"a tool call is {{'type': 'function', 'function': {{'name': str, "
                                          f"'arguments': ...}}}}, got {short_repr(call)}")
    arguments = function.get("arguments")
    if isinstance(arguments, str):  # OpenAI sends JSON text; datasets often store the object itself
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        raise MessageError(f"{where}[0].function.arguments",
                           f"must be a JSON object, got {short_repr(function.get('arguments'))}")
    return {"type": "plugin", "name": function["name"], "parameters": arguments}


def openai_messages(messages: Any, where: str = "messages", *,
                    interpreter_tool: str | None = None) -> list[dict[str, Any]]:
    """A non-empty list of OpenAI messages as template messages. `interpreter_tool`: the function name that stands
    for the code interpreter (the server's `python` extension): a call of it with `{"code": str}` arguments becomes
    an interpreter call. A tool result is an `environment` turn named after the kind of the call its `tool_call_id`
    names (without one: the latest call's), and an id that answers no earlier call is an error."""
    if not isinstance(messages, list) or not messages:
        raise MessageError(where, f"must be a non-empty list of messages, got {short_repr(messages)}")
    converted = [openai_message(message, f"{where}[{i}]") for i, message in enumerate(messages)]
    _route_tool_calls(messages, converted, where, interpreter_tool)
    return converted


def _route_tool_calls(messages: list[Mapping[str, Any]], converted: list[dict[str, Any]], where: str,
                      interpreter_tool: str | None) -> None:
    kinds: dict[str, str] = {}  # tool_call_id -> "plugin" | "interpreter"
    latest = "plugin"
    for index, (message, turn) in enumerate(zip(messages, converted, strict=True)):
        if message.get("tool_calls"):
            call = turn["tool_call"]
            if call["name"] == interpreter_tool:
                code = call["parameters"].get("code")
                if set(call["parameters"]) != {"code"} or not isinstance(code, str):
                    raise MessageError(f"{where}[{index}].tool_calls[0].function.arguments",
                                       f'a {interpreter_tool} call\'s arguments are {{"code": str}}')
                turn["tool_call"] = {"type": "interpreter", "code": code}
            latest = turn["tool_call"]["type"]
            call_id = message["tool_calls"][0].get("id")
            if call_id is not None:
                kinds[call_id] = latest
        elif message["role"] == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and call_id not in kinds:
                raise MessageError(f"{where}[{index}].tool_call_id", f"{call_id!r} answers no earlier tool call")
            turn["name"] = kinds.get(call_id, latest)


def with_tools(messages: Sequence[dict[str, Any]], tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """`messages` with the tools' schemas as a `system` turn named `plugin` after the leading system turns (where
    InternLM2 was trained to find it). A tool is OpenAI's `{"type": "function", "function": {...}}` or the bare
    function schema."""
    if not tools:
        return list(messages)
    if not isinstance(tools, list):
        raise MessageError(where, f"must be a list of tools, got {short_repr(tools)}")
    schemas = []
    for i, tool in enumerate(tools):
        schema = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(schema, Mapping) or not isinstance(schema.get("name"), str):
            raise MessageError(f"{where}[{i}]", f"a tool is {{'type': 'function', 'function': {{'name': str, ...}}}}, "
                                                f"got {short_repr(tool)}")
        schemas.append(schema)
    lead = next((i for i, message in enumerate(messages) if message["role"] != "system"), len(messages))
    turn = {"role": "system", "name": "plugin", "content": json.dumps(schemas, ensure_ascii=False)}
    return [*messages[:lead], turn, *messages[lead:]]


# ---- the conditional reward model's input -----------------------------------------------------------------------


def reward_sequence(messages: Sequence[Mapping[str, Any]], domain: str | None, tokenizer: Tokenizer,
                    domain_prompts: Mapping[str, str] = DOMAIN_PROMPTS, template: str = "internlm2_chat") -> list[int]:
    """The ids the conditional reward model scores: the domain's system turn, `messages` (template messages ending
    with the response to judge), then the reward token. Training and scoring both render through here.
    `domain=None` scores without a conditional system turn (how the released reward models were benchmarked)."""
    if domain is not None and domain not in domain_prompts:
        raise MessageError("domain", f"{domain!r} is unknown; known domains: {', '.join(domain_prompts)}")
    system = [] if domain is None else [{"role": "system", "content": domain_prompts[domain]}]
    ids, _ = get_chat_template(template).encode([*system, *messages], tokenizer)
    return ids + [tokenizer.reward_token_id]
