"""Chat templates: the one place that turns a conversation into display text and into token ids + loss mask.

SFT, evaluation and the server all call this module, so training and serving see the same ids
(conventions.md, "Tokens and templates"). Templates live in a small registry (`get_chat_template(name)`,
`register_chat_template`); a model directory names its template in tokenizer_config.json ("chat_template_name",
written with the jinja form by `save_chat_template`, read by `chat_template_for_directory`).

Messages are OpenAI-like dicts:

    {"role": "system" | "user" | "assistant" | "environment",
     "content": str,                      # required, may be "" (e.g. an assistant turn that only calls a tool)
     "name": str,                         # optional sub-role: "plugin" / "interpreter" become <|plugin|> /
                                          #   <|interpreter|>; other names ("file") are written as is
     "tool_call": {"type": "plugin", "name": str, "parameters": dict}    # optional, assistant only
                | {"type": "interpreter", "code": str},
     "loss": bool}                        # optional, assistant only: False excludes the turn from the loss

`internlm2_chat` (spec §4) renders each message as

    <|im_start|>{role}[ name={name}]\\n{content}[{tool call}]<|im_end|>\\n

after a leading `<s>`, where a tool call is `<|action_start|><|plugin|>\\n{json}<|action_end|>\\n` or
`<|action_start|><|interpreter|>\\n```python\\n{code}\\n```<|action_end|>\\n`; `add_generation_prompt` appends
`<|im_start|>assistant\\n`.

Token ids are the concatenation of per-part encodings, with BOS added once as an id: template text (role headers,
`<|im_end|>`, the newline, tool-call markers) is encoded with `allow_special=True`, because the template means its
control tokens; message content (and the tool-call body) with `allow_special=False`, so a user who types
`<|im_start|>system` gets plain text, never a control token. For ordinary content these ids equal the HF tokenizer's
ids of the rendered text; they differ only where SentencePiece would merge across a part boundary (content that
starts with a newline, which the whole text would encode together with the header's newline as "\\n\\n"), and then
the per-part ids are the ones we train and serve.

The loss mask is 1 exactly on assistant content (tool calls included) and its `<|im_end|>`, as in xtuner's
`internlm2_chat` template (SUFFIX = `<|im_end|>` is trained; SEP = "\\n" is not, since the next turn's header, not
the model, follows it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from etils import epath

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

# Default system prompt of InternLM2-Chat's `chat()` (spec §4.1).
META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文."
)

ROLES = ("system", "user", "assistant", "environment")
_MESSAGE_KEYS = {"role", "content", "name", "tool_call", "loss"}
_NAME_TOKENS = {"plugin": "<|plugin|>", "interpreter": "<|interpreter|>"}
# Other names are written into the header as text; keeping them to this alphabet means a name can never contain a
# special-token string (the header is encoded with allow_special=True).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation.

    `special`: template text whose special-token names are meant (encoded with allow_special=True); otherwise the
    text is content and is encoded as plain text. `trained`: its tokens get loss-mask 1.
    """

    text: str
    special: bool
    trained: bool = False


class ChatTemplate:
    """A conversation format: subclasses give `segments`; rendering and encoding follow from them, so the display
    text and the ids can never disagree about what the conversation is."""

    name: str
    jinja: str  # for tokenizer_config.json: renders the same text for plain system/user/assistant messages

    def segments(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> list[Segment]:
        raise NotImplementedError

    def render_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as display text (what HF `apply_chat_template(tokenize=False)` shows)."""
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))

    def encode(self, messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer,
               add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(token ids, loss mask): the per-part encodings concatenated; mask 1 on trained segments."""
        ids: list[int] = []
        mask: list[int] = []
        for segment in self.segments(messages, add_generation_prompt):
            part = tokenizer.encode(segment.text, allow_special=segment.special)
            ids += part
            mask += [int(segment.trained)] * len(part)
        return ids, mask


class InternLM2ChatTemplate(ChatTemplate):
    """InternLM2-Chat's ChatML variant with the environment role and tool calls (spec §4)."""

    name = "internlm2_chat"
    jinja = ("{{ bos_token }}{% for message in messages %}"
             "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

    def segments(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> list[Segment]:
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of message dicts, got {type(messages).__name__}")
        segments = [Segment("<s>", special=True)]
        for index, message in enumerate(messages):
            segments += self._message_segments(index, message)
        if add_generation_prompt:
            segments.append(Segment("<|im_start|>assistant\n", special=True))
        return segments

    def _message_segments(self, index: int, message: Mapping[str, Any]) -> list[Segment]:
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(message).__name__}")
        unknown = set(message) - _MESSAGE_KEYS
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}; allowed: {sorted(_MESSAGE_KEYS)}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise TypeError(f"{where}.content must be a str (use \"\" for none), got {type(content).__name__}")
        loss = message.get("loss", role == "assistant")
        if not isinstance(loss, bool) or (loss and role != "assistant"):
            raise ValueError(f"{where}.loss is {loss!r}; it must be a bool, and only assistant turns are trained on")

        header = f"<|im_start|>{role}{self._name_suffix(where, message.get('name'))}\n"
        segments = [Segment(header, special=True), Segment(content, special=False, trained=loss)]
        if "tool_call" in message:
            if role != "assistant":
                raise ValueError(f"{where}.tool_call is only allowed on assistant messages, not {role!r}")
            segments += self._tool_call_segments(f"{where}.tool_call", message["tool_call"], loss)
        segments += [Segment("<|im_end|>", special=True, trained=loss), Segment("\n", special=True)]
        return segments

    @staticmethod
    def _name_suffix(where: str, name: Any) -> str:
        if name is None:
            return ""
        if not isinstance(name, str) or not (name in _NAME_TOKENS or _PLAIN_NAME.fullmatch(name)):
            raise ValueError(f"{where}.name is {name!r}; use 'plugin', 'interpreter' or a plain word such as "
                             f"'file' (letters, digits, '_', '.', '-')")
        return f" name={_NAME_TOKENS.get(name, name)}"

    @staticmethod
    def _tool_call_segments(where: str, call: Any, trained: bool) -> list[Segment]:
        if not isinstance(call, Mapping) or call.get("type") not in _NAME_TOKENS:
            raise ValueError(f"{where} must be a dict with type 'plugin' or 'interpreter', got {call!r}")
        if call["type"] == "plugin":
            expected = {"type", "name", "parameters"}
            if set(call) != expected or not isinstance(call["name"], str) or not isinstance(call["parameters"],
                                                                                             Mapping):
                raise ValueError(f"{where}: a plugin call is {{'type': 'plugin', 'name': str, 'parameters': dict}}, "
                                 f"got {call!r}")
            try:
                body = "\n" + json.dumps({"name": call["name"], "parameters": call["parameters"]},
                                         ensure_ascii=False)
            except TypeError as e:
                raise ValueError(f"{where}.parameters is not JSON-serialisable: {e}") from e
        else:
            if set(call) != {"type", "code"} or not isinstance(call["code"], str):
                raise ValueError(f"{where}: an interpreter call is {{'type': 'interpreter', 'code': str}}, "
                                 f"got {call!r}")
            body = f"\n```python\n{call['code']}\n```"
        # The body (model-written JSON or code) is content: encoded as plain text, like any message content.
        return [Segment(f"<|action_start|>{_NAME_TOKENS[call['type']]}", special=True, trained=trained),
                Segment(body, special=False, trained=trained),
                Segment("<|action_end|>\n", special=True, trained=trained)]


_REGISTRY: dict[str, ChatTemplate] = {}


def register_chat_template(template: ChatTemplate, *, replace: bool = False) -> None:
    """Makes `template` available by `template.name`; refuses to shadow an existing name unless `replace`."""
    if template.name in _REGISTRY and not replace:
        raise ValueError(f"a chat template named {template.name!r} is already registered (pass replace=True)")
    _REGISTRY[template.name] = template


def get_chat_template(name: str) -> ChatTemplate:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def save_chat_template(directory: str | os.PathLike, template: str | ChatTemplate) -> epath.Path:
    """Names `template` in the model directory's tokenizer_config.json ("chat_template_name") with its jinja form for
    transformers ("chat_template"), keeping the tokenizer's own entries (`Tokenizer.save_pretrained` writes them;
    the tokenizer knows no template). Returns the config's path."""
    if isinstance(template, str):
        template = get_chat_template(template)
    config_path = epath.Path(directory) / TOKENIZER_CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config.update(chat_template=template.jinja, chat_template_name=template.name)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return config_path


def chat_template_for_directory(directory: str | os.PathLike) -> ChatTemplate:
    """The template a model directory names in tokenizer_config.json (written by `save_chat_template`)."""
    config_path = epath.Path(directory) / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {TOKENIZER_CONFIG_FILE}; is it a model directory?")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "chat_template_name" not in config:
        raise ValueError(f"{config_path} has no \"chat_template_name\"")
    return get_chat_template(config["chat_template_name"])


register_chat_template(InternLM2ChatTemplate())
