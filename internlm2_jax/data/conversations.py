"""Conversation data for fine-tuning: OpenAI-style messages, Alpaca records and preference pairs -> packed rows.

Record formats (JSONL, one record a line; the file is read into memory whole, records are tokenized when drawn):
- `"messages"`: `{"messages": [...], "tools": [...]?}`, OpenAI chat messages (roles system, developer, user,
  assistant, tool, and our environment; `tool_calls`; content as a string, null or text parts) plus the template's
  own fields (`name`, `tool_call`, and `"loss": false` to leave an assistant turn untrained).
- `"alpaca"`: `{"instruction", "input"?, "output", "system"?}` -> system?, user (instruction, a newline and the input
  when there is one), assistant (output).
- preference pairs (XTuner's layout): `{"domain"?, "prompt", "chosen", "rejected"}`, each a message list; a plain
  string is one user message (prompt) or one assistant message (chosen, rejected).

OpenAI messages become template messages through `chat_prompts` (`openai_messages`, `with_tools`), the converter
the server uses too, so a conversation trains and serves as the same ids.

Examples (lists of `(ids, trained mask)` sequences, packed whole by `ExamplePacker`):
- SFT: the conversation through the chat template; longer than a row, it is cut to `seq_len` ("truncated"), and
  dropped when no trained token survives the cut ("no_trained_tokens") or none was there ("no_assistant_turn").
- reward (InternLM2's COOL RLHF conditional reward model): per response, a system turn saying which preference the
  domain judges by (`chat_prompts.DOMAIN_PROMPTS` by default), the prompt, the response, then the reward token,
  whose hidden state the model scores (`chat_prompts.reward_sequence`, which scoring reuses). Nothing is trained
  token-wise: the mask is all zeros.
- DPO: per response, prompt + response through the template, trained only on the response's assistant turns.
- A pair that does not fit one row is dropped ("too_long"): cutting a response would change what is preferred.

`SFTDataIterator` and `PairDataIterator` keep `PretrainDataIterator`'s contract (iterator.py): deterministic, exact
resume from a small JSON state, process p of P owning records p, p + P, ..., bad records counted by kind with
`file:line` examples (or `BadDataError` with `strict=True`). Each pass ("epoch") draws this process's records in a
fresh seeded permutation. The state is the number of records drawn so far, plus the draws in the open row, which
`set_state` re-tokenizes and re-adds: the packer's row is rebuilt exactly rather than stored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from internlm2_jax.chat_prompts import (
    DOMAIN_PROMPTS,
    MessageError,
    openai_messages,
    reward_sequence,
    short_repr,
    with_tools,
)
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.data.iterator import MAX_EXAMPLES, BadDataError, finish_batch
from internlm2_jax.data.packing import ExamplePacker
from internlm2_jax.data.readers import INVALID_UTF8, MALFORMED_JSON, BadRecord

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SFT_FORMATS = ("messages", "alpaca")
PAIR_KINDS = ("reward", "dpo")
STATE_VERSION = 1
# Bad-record kinds besides the readers' malformed_json and invalid_utf8.
INVALID_EXAMPLE = "invalid_example"
UNKNOWN_DOMAIN = "unknown_domain"
# Examples skipped for their length or content: counted, never errors.
SKIPS = ("truncated", "no_trained_tokens", "no_assistant_turn", "too_long")


# ---- records -> conversations -----------------------------------------------------------------------------------


def conversation(record: Mapping[str, Any], format: str = "messages") -> list[dict[str, Any]]:
    """The template messages of one SFT record in `format` ("messages" or "alpaca")."""
    if format == "alpaca":
        return _alpaca(record)
    return with_tools(openai_messages(record.get("messages")), record.get("tools"))


def _alpaca(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    def field(key: str, required: bool) -> str:
        value = record.get(key)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise MessageError(key, "is missing" if value is None else f"must be a string, got {short_repr(value)}")
        return value

    instruction, extra, output, system = (field("instruction", True), field("input", False), field("output", True),
                                          field("system", False))
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction},
                       {"role": "assistant", "content": output}]


def preference_pair(record: Mapping[str, Any]) -> tuple[str | None, list, list, list]:
    """(domain or None, prompt, chosen, rejected) of a preference record, as template messages."""
    domain = record.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise MessageError("domain", f"must be a string, got {short_repr(domain)}")

    def turns(key: str, role: str) -> list[dict[str, Any]]:
        if key not in record:
            raise MessageError(key, "is missing")
        value = record[key]
        return openai_messages([{"role": role, "content": value}] if isinstance(value, str) else value, key)

    prompt = with_tools(turns("prompt", "user"), record.get("tools"))
    return domain, prompt, turns("chosen", "assistant"), turns("rejected", "assistant")


# ---- iterators --------------------------------------------------------------------------------------------------

Example = list[tuple[list[int], list[int]]]


def _new_stats() -> dict[str, Any]:
    return {"batches": 0, "rows": 0, "examples": 0, "tokens": 0, "target_tokens": 0, "padding_tokens": 0,
            "padding_fraction": 0.0, **dict.fromkeys(SKIPS, 0), "bad_records": 0, "bad_by_kind": {},
            "bad_examples": {}}


class _ConversationIterator:
    """Records from JSONL files -> examples (`_encode`, per subclass) -> whole-example packed batches."""

    pairs = False

    def __init__(self, paths: str | Path | Sequence[str | Path], tokenizer: Tokenizer, seq_len: int,
                 batch_size: int, *, template: str, seed: int, shuffle: bool, repeat: bool, process_index: int,
                 process_count: int, strict: bool, max_examples: int | None, state: Mapping[str, Any] | None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in range(process_count={process_count})")
        self.tokenizer, self.template = tokenizer, get_chat_template(template)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.shuffle, self.repeat, self.strict = shuffle, repeat, strict
        self.process_index, self.process_count, self.max_examples = int(process_index), int(process_count), max_examples
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]

        digest = hashlib.sha256()
        records: list[tuple[bytes, str]] = []  # (line, "file:line"); blank lines are no records
        for path in self.paths:
            data = path.read_bytes()
            digest.update(hashlib.sha256(data).digest())
            records += [(line, f"{path}:{number}") for number, line in enumerate(data.splitlines(), 1)
                        if line.strip()]
        self.data_sha256 = digest.hexdigest()
        self._records = records[self.process_index::self.process_count]
        if not self._records:
            raise ValueError(f"process {self.process_index}/{self.process_count} has no records among the "
                             f"{len(records)} of {', '.join(map(str, self.paths))}")
        self.packer = self._new_packer()
        self._cursor = 0  # records drawn so far, over all epochs
        self._open: list[int] = []  # the draws packed into the packer's open row
        self._finished = False
        self._skipped_in_a_row = 0
        self._stats = _new_stats()
        self._permutation: tuple[int, np.ndarray] | None = None
        if state is not None:
            self.set_state(state)

    def _new_packer(self) -> ExamplePacker:
        return ExamplePacker(self.seq_len, self.tokenizer.pad_id, max_examples=self.max_examples, pairs=self.pairs)

    def _encode(self, record: dict[str, Any]) -> tuple[Example | None, str | None]:
        """(example or None when skipped, the skip kind or None)."""
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- records ----------------------------------------------------------------------------------------------

    def _record_at(self, draw: int) -> int:
        epoch, position = divmod(draw, len(self._records))
        if not self.shuffle:
            return position
        if self._permutation is None or self._permutation[0] != epoch:
            rng = np.random.default_rng([self.seed, self.process_index, epoch])
            self._permutation = (epoch, rng.permutation(len(self._records)))
        return int(self._permutation[1][position])

    def _load(self, draw: int) -> tuple[Example | None, str | None] | BadRecord:
        line, where = self._records[self._record_at(draw)]
        try:
            record = json.loads(line)
        except UnicodeDecodeError as e:
            return BadRecord(INVALID_UTF8, where, f"invalid UTF-8 at byte {e.start}")
        except json.JSONDecodeError as e:
            return BadRecord(MALFORMED_JSON, where, f"{e.msg} at column {e.colno}")
        if not isinstance(record, dict):
            return BadRecord(MALFORMED_JSON, where, f"a record is a JSON object, got {type(record).__name__}")
        try:
            return self._encode(record)
        except MessageError as e:
            return BadRecord(UNKNOWN_DOMAIN if e.field == "domain" else INVALID_EXAMPLE, where, str(e))
        except (TypeError, ValueError) as e:  # the template's checks (naming messages[i]), text no tokenizer takes
            return BadRecord(INVALID_EXAMPLE, where, str(e))

    def _count_bad(self, bad: BadRecord) -> None:
        if self.strict:
            raise BadDataError(f"{bad.message()} (strict mode; pass strict=False to count and skip bad records)")
        self._stats["bad_records"] += 1
        by_kind, examples = self._stats["bad_by_kind"], self._stats["bad_examples"].setdefault(bad.kind, [])
        by_kind[bad.kind] = by_kind.get(bad.kind, 0) + 1
        if len(examples) < MAX_EXAMPLES:
            examples.append(bad.message())
            logger.warning("skipping bad record %s", bad.message())

    def _pull(self) -> tuple[int, Example] | None:
        """(draw, example) of the next usable record; None once a pass ends without `repeat`."""
        while self.repeat or self._cursor < len(self._records):
            draw = self._cursor
            self._cursor += 1
            loaded = self._load(draw)
            example = None
            if isinstance(loaded, BadRecord):
                self._count_bad(loaded)
            else:
                example, skip = loaded
                if skip is not None:
                    self._stats[skip] += 1
            if example is not None:
                self._skipped_in_a_row = 0
                self._stats["examples"] += 1
                return draw, example
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row > len(self._records):  # only with repeat: it would loop forever
                skipped = {kind: self._stats[kind] for kind in SKIPS}
                raise BadDataError(f"no usable example in a whole pass over the data; skipped {skipped}, bad "
                                   f"records: {self._stats['bad_examples']}")
        return None

    # ---- batches ----------------------------------------------------------------------------------------------

    def __iter__(self) -> _ConversationIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._finished:
            raise StopIteration
        rows = []
        while len(rows) < self.batch_size:
            pulled = self._pull()
            if pulled is None:  # without repeat, after one pass
                self._finished = True
                if (last := self.packer.flush()) is not None:
                    rows.append(last)
                self._open = []
                break
            draw, example = pulled
            if (closed := self.packer.add(example)) is not None:
                rows.append(closed)
                self._open = []
            self._open.append(draw)
        if not rows:
            raise StopIteration
        return finish_batch(rows, self.batch_size, self.seq_len, self.tokenizer.pad_id, self._stats,
                            pair_slots=self.max_examples if self.pairs else None)

    # ---- state and statistics ---------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """What must match for a state to be resumed here."""
        return {"data_sha256": self.data_sha256, "tokenizer_sha256": getattr(self.tokenizer, "sha256", None),
                "template": self.template.name, "seed": self.seed, "seq_len": self.seq_len,
                "process_index": self.process_index, "process_count": self.process_count, "shuffle": self.shuffle,
                "repeat": self.repeat, **self._options()}

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable dict; resuming from it continues with exactly the next batch."""
        return {"version": STATE_VERSION, **self._identity(), "cursor": self._cursor, "open_row": list(self._open),
                "finished": self._finished, "skipped_in_a_row": self._skipped_in_a_row,
                "stats": copy.deepcopy(self._stats)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        differ = [f"{key}: state has {state.get(key)!r}, this iterator {value!r}"
                  for key, value in self._identity().items() if state.get(key) != value]
        if differ:
            raise ValueError("cannot resume this data iterator from the given state:\n  " + "\n  ".join(differ))
        self._cursor, self._finished = int(state["cursor"]), bool(state["finished"])
        self._skipped_in_a_row = int(state["skipped_in_a_row"])
        self._stats = copy.deepcopy(dict(state["stats"]))
        self.packer, self._open = self._new_packer(), []
        for draw in state["open_row"]:
            loaded = self._load(int(draw))
            if isinstance(loaded, BadRecord) or loaded[0] is None:
                raise ValueError(f"draw {draw} of the saved open row no longer gives an example")
            self.packer.add(loaded[0])  # these examples shared one row, so none of them closes it
            self._open.append(int(draw))

    @property
    def stats(self) -> dict[str, Any]:
        """Examples, rows, tokens, padding fraction, skipped examples by reason, bad records by kind (with examples)."""
        return copy.deepcopy(self._stats)


class SFTDataIterator(_ConversationIterator):
    """Supervised fine-tuning batches: dicts of numpy arrays `[batch_size, seq_len]` (`input_ids`, `targets`,
    `positions`, `segment_ids`, `loss_mask`; see packing.py), one conversation per segment, loss on assistant turns.
    `format` is "messages" or "alpaca" (module docstring)."""

    def __init__(self, paths: str | Path | Sequence[str | Path], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 *, format: str = "messages", template: str = "internlm2_chat", seed: int = 0, shuffle: bool = True,
                 repeat: bool = True, process_index: int = 0, process_count: int = 1, strict: bool = False,
                 state: Mapping[str, Any] | None = None):
        if format not in SFT_FORMATS:
            raise ValueError(f"format {format!r}; expected one of {', '.join(SFT_FORMATS)}")
        self.format = format
        super().__init__(paths, tokenizer, seq_len, batch_size, template=template, seed=seed, shuffle=shuffle,
                         repeat=repeat, process_index=process_index, process_count=process_count, strict=strict,
                         max_examples=None, state=state)

    def _options(self) -> dict[str, Any]:
        return {"format": self.format}

    def _encode(self, record: dict[str, Any]) -> tuple[Example | None, str | None]:
        ids, mask = self.template.encode(conversation(record, self.format), self.tokenizer)
        if not any(mask):
            return None, "no_assistant_turn"
        if len(ids) <= self.seq_len:
            return [(ids, mask)], None
        ids, mask = ids[:self.seq_len], mask[:self.seq_len]
        # Token 0 is never predicted, so a trained token must remain after it.
        return ([(ids, mask)], "truncated") if any(mask[1:]) else (None, "no_trained_tokens")


class PairDataIterator(_ConversationIterator):
    """Preference batches: the SFT fields plus `pair_mask [batch_size, max_pairs]`; row slot k holds the k-th pair
    as segments 2k + 1 (chosen) and 2k + 2 (rejected). `kind="reward"` renders reward-model samples (domain system
    turn, reward token; `domain_prompts` defaults to DOMAIN_PROMPTS, `default_domain` serves records without one),
    `kind="dpo"` policy samples trained on the response only."""

    pairs = True

    def __init__(self, paths: str | Path | Sequence[str | Path], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 *, kind: str = "reward", max_pairs: int = 8, domain_prompts: Mapping[str, str] | None = None,
                 default_domain: str | None = None, template: str = "internlm2_chat", seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, process_index: int = 0, process_count: int = 1,
                 strict: bool = False, state: Mapping[str, Any] | None = None):
        if kind not in PAIR_KINDS:
            raise ValueError(f"kind {kind!r}; expected one of {', '.join(PAIR_KINDS)}")
        self.kind = kind
        self.domain_prompts = dict(DOMAIN_PROMPTS if domain_prompts is None else domain_prompts)
        if default_domain is not None and default_domain not in self.domain_prompts:
            raise ValueError(f"default_domain {default_domain!r} is not one of {', '.join(self.domain_prompts)}")
        self.default_domain = default_domain
        super().__init__(paths, tokenizer, seq_len, batch_size, template=template, seed=seed, shuffle=shuffle,
                         repeat=repeat, process_index=process_index, process_count=process_count, strict=strict,
                         max_examples=max_pairs, state=state)

    def _options(self) -> dict[str, Any]:
        prompts = json.dumps(self.domain_prompts, sort_keys=True).encode()
        return {"kind": self.kind, "max_pairs": self.max_examples, "default_domain": self.default_domain,
                "domain_prompts_sha256": hashlib.sha256(prompts).hexdigest()}

    def _encode(self, record: dict[str, Any]) -> tuple[Example | None, str | None]:
        domain, prompt, chosen, rejected = preference_pair(record)
        if self.kind == "reward":
            domain = self.default_domain if domain is None else domain
            if domain is None:  # training is conditional by design: a record without a domain is a data error
                raise MessageError("domain", f"is missing (and no default_domain); known domains: "
                                             f"{', '.join(self.domain_prompts)}")
            example = []
            for response in (chosen, rejected):
                ids = reward_sequence(prompt + response, domain, self.tokenizer, self.domain_prompts,
                                      self.template.name)
                example.append((ids, [0] * len(ids)))
        else:
            context = [{**message, "loss": False} if message["role"] == "assistant" else message for message in prompt]
            example = [self.template.encode(context + response, self.tokenizer) for response in (chosen, rejected)]
            if not all(any(mask) for _, mask in example):
                return None, "no_assistant_turn"
        return (example, None) if self.packer.fits(example) else (None, "too_long")
