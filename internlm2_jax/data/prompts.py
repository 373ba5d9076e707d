"""Prompt data for online RL (docs/rlhf.md §2.11): what a rollout starts from.

`PromptBatch` is the contract between prompt sources and the RL loop (`train/rl/loop.py`) and its reward
sources (`train/rl/rewards.py`): numpy arrays the loop places on the mesh, plus each prompt's opaque `meta` (a
doctest, a reference answer) that reaches rule rewards on the host.

`PromptDataIterator` reads prompt records from JSONL and is the SFT iterator without packing: it reuses
`conversations.ConversationIterator` for the files, the mixture, bad records, the multi-host split and the resume
state, and only renders (`_encode`) and batches (`__next__`) differently. A prompt is rendered by the chat template's
own `encode` with `add_generation_prompt=True`, so its ids are those an SFT conversation has before the answer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from internlm2_jax.chat_prompts import DOMAIN_PROMPTS, MessageError, openai_messages, short_repr, with_tools
from internlm2_jax.data.conversations import ConversationIterator

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    prompt_ids: np.ndarray  # [B, P] int32, right-padded with the tokenizer's pad id; each ends the generation prompt
    prompt_lengths: np.ndarray  # [B] int32, 1..P real tokens
    domain_ids: np.ndarray  # [B] int32: index into the source's `domains` tuple, -1 = none
    metas: tuple[Any, ...]  # [B] the records' "meta" values (None when absent), for rule rewards
    # [B] the records' prompts as written ("messages" or "prompt"), for sample dumps and COOL's patch pairs (which
    # the reward model's pair iterator reads back); None from sources without records
    records: tuple[Any, ...] | None = None

    def __post_init__(self):
        rows = np.shape(self.prompt_ids)[0]
        if np.ndim(self.prompt_ids) != 2 or np.shape(self.prompt_lengths) != (rows,) or \
                np.shape(self.domain_ids) != (rows,) or len(self.metas) != rows or \
                (self.records is not None and len(self.records) != rows):
            raise ValueError(f"PromptBatch: prompt_ids must be [B, P] with prompt_lengths, domain_ids and metas of "
                             f"B entries; got {list(np.shape(self.prompt_ids))}, {list(np.shape(self.prompt_lengths))}"
                             f", {list(np.shape(self.domain_ids))}, {len(self.metas)}")

    @property
    def size(self) -> int:
        return int(np.shape(self.prompt_ids)[0])


# ---- records -> prompts -----------------------------------------------------------------------------------------


def prompt_messages(record: Mapping[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """(domain or None, template messages) of a prompt record: `"messages"` or `"prompt"` (a string is one user turn,
    a list is messages), both OpenAI-style and converted as SFT converts them; `"tools"` as for SFT records."""
    domain = record.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise MessageError("domain", f"must be a string, got {short_repr(domain)}")
    keys = [key for key in ("messages", "prompt") if key in record]
    if len(keys) != 1:
        raise MessageError("messages", "a prompt record has exactly one of 'messages' and 'prompt', got "
                                       f"{'both' if keys else 'neither'} (fields: {sorted(record)[:8]})")
    key = keys[0]
    value = record[key]
    messages = openai_messages([{"role": "user", "content": value}] if isinstance(value, str) else value, key)
    if messages[-1]["role"] == "assistant":
        # The RL loop appends the generation prompt and samples the answer: a trailing assistant turn is a response
        # already written, and generating after its <|im_end|> would open a second assistant turn.
        raise MessageError(f"{key}[{len(messages) - 1}].role", "the prompt ends with an assistant turn (a response); "
                                                              "it must end with the turn the policy answers")
    return domain, with_tools(messages, record.get("tools"))


class _Prompt(NamedTuple):
    ids: list[int]
    domain_id: int
    meta: Any
    prompt: Any  # the record's "messages" or "prompt", as written


class PromptDataIterator(ConversationIterator):
    """RL prompts from JSONL: `PromptBatch`es of `batch_size` prompts, one a row, each rendered with the chat
    template and its generation prompt (`<s>...<|im_start|>assistant\\n`), right-padded to `max_prompt_len`.

    Records are `{"domain"?, "messages" | "prompt", "meta"?, "tools"?}`; `domain_ids` index `domains` (a record
    without a domain gets `default_domain`, None -> -1), an unknown domain is a bad record. Prompts longer than
    `max_prompt_len` are skipped and counted ("too_long"). The rest of the contract is `SFTDataIterator`'s
    (conversations.py): the same files, mixture, `weights`, bad-record handling, multi-host split and exact resume.

    Without `repeat`, iteration stops after the last full batch: the prompts left over (fewer than `batch_size`) are
    dropped and counted in `stats["dropped_at_end"]`, because a padded row would be rolled out and scored like a real
    prompt (and a smaller batch would change the compiled shapes).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Tokenizer,
                 max_prompt_len: int, batch_size: int, *, domains: Sequence[str] = tuple(DOMAIN_PROMPTS),
                 default_domain: str | None = None, template: str = "internlm2_chat", seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, process_index: int = 0, process_count: int = 1,
                 strict: bool = False, state: Mapping[str, Any] | None = None,
                 weights: Sequence[float] | None = None):
        self.domains = tuple(domains)
        if not all(isinstance(d, str) for d in self.domains) or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be distinct strings, got {list(domains)}")
        if default_domain is not None and default_domain not in self.domains:
            raise ValueError(f"default_domain {default_domain!r} is not one of {', '.join(self.domains)}")
        self.default_domain = default_domain
        super().__init__(paths, tokenizer, max_prompt_len, batch_size, weights=weights, template=template, seed=seed,
                         shuffle=shuffle, repeat=repeat, process_index=process_index, process_count=process_count,
                         strict=strict, max_examples=None, state=None)
        self._stats["dropped_at_end"] = 0  # before set_state, which restores the saved statistics
        if state is not None:
            self.set_state(state)

    @property
    def max_prompt_len(self) -> int:
        return self.seq_len

    def _new_packer(self) -> None:
        # One prompt a row and every batch is built within one `__next__`: no row stays open between batches, so the
        # state's open row is always empty.
        return None

    def _options(self) -> dict[str, Any]:
        return {"domains": list(self.domains), "default_domain": self.default_domain}

    def _encode(self, record: dict[str, Any]) -> tuple[_Prompt | None, str | None]:
        domain, messages = prompt_messages(record)
        domain = self.default_domain if domain is None else domain
        if domain is not None and domain not in self.domains:
            raise MessageError("domain", f"{domain!r} is unknown; known domains: {', '.join(self.domains)}")
        ids, _ = self.template.encode(messages, self.tokenizer, add_generation_prompt=True)
        if len(ids) > self.seq_len:
            return None, "too_long"
        prompt = record["messages"] if "messages" in record else record["prompt"]
        return _Prompt(ids, -1 if domain is None else self.domains.index(domain), record.get("meta"), prompt), None

    def __next__(self) -> PromptBatch:
        if self._finished:
            raise StopIteration
        prompts: list[_Prompt] = []
        while len(prompts) < self.batch_size:
            pulled = self._pull()
            if pulled is None:  # without repeat, after one pass
                self._finished = True
                self._stats["dropped_at_end"] += len(prompts)
                raise StopIteration
            prompts.append(pulled[1])
        prompt_ids = np.full((self.batch_size, self.seq_len), self.tokenizer.pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            prompt_ids[row, :len(prompt.ids)] = prompt.ids
        lengths = np.asarray([len(prompt.ids) for prompt in prompts], np.int32)
        stats = self._stats
        stats["batches"] += 1
        stats["rows"] += self.batch_size
        stats["tokens"] += int(lengths.sum())
        stats["padding_tokens"] += self.batch_size * self.seq_len - int(lengths.sum())
        stats["padding_fraction"] = stats["padding_tokens"] / (stats["rows"] * self.seq_len)
        return PromptBatch(prompt_ids, lengths, np.asarray([prompt.domain_id for prompt in prompts], np.int32),
                           tuple(prompt.meta for prompt in prompts), tuple(prompt.prompt for prompt in prompts))
