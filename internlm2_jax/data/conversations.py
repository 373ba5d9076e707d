"""Conversation data for fine-tuning: OpenAI-style messages, Alpaca records and preference pairs -> packed rows.

Record formats (JSONL, one record a line; blank lines are no records):
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
resume from a small JSON state, process p of P owning records p, p + P, ... of every file, bad records counted by kind
with `file:line` examples (or `BadDataError` with `strict=True`). Files are read as the pretraining shards are
(`readers.JsonlReader`, through etils.epath, so they may be in a bucket): each is indexed once (line offsets, one
streaming pass), then a process reads only the records it draws. Which file the next record comes from is the
pretraining mixture (`mixture.MixtureSampler`): without `weights` every record once per pass, in a fresh seeded order
each pass; with `weights`, each file's share of the examples drawn (`mixture.share_epochs`: the file with the most
records per unit of weight is read once per pass, the others repeated as their weight asks). The state is the
mixture's counters plus the (file, record) draws in the open row, which `set_state` re-tokenizes and re-adds: the
packer's row is rebuilt exactly rather than stored.

The data hash (`data_sha256`, what checkpoints record and resuming checks) is cheap and stable: a sha256 of each
file's line offsets, known from its index (`JsonlReader.fingerprint`), in file order; paths are left out, so data
moved into a bucket keeps its hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from etils import epath

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
from internlm2_jax.data.mixture import MixtureSampler, share_epochs
from internlm2_jax.data.packing import ExamplePacker
from internlm2_jax.data.readers import INVALID_UTF8, MALFORMED_JSON, BadRecord, JsonlReader

if TYPE_CHECKING:
    from internlm2_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SFT_FORMATS = ("messages", "alpaca")
PAIR_KINDS = ("reward", "dpo")
STATE_VERSION = 2  # 2: the mixture's counters and (file, record) draws, where 1 had one cursor over all records
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


class ConversationIterator:
    """Records from JSONL files (indexed, read lazily) -> a mixture over the files -> examples (`_encode`, per
    subclass) -> whole-example packed batches."""

    pairs = False

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Tokenizer, seq_len: int,
                 batch_size: int, *, weights: Sequence[float] | None, template: str, seed: int, shuffle: bool,
                 repeat: bool, process_index: int, process_count: int, strict: bool, max_examples: int | None,
                 state: Mapping[str, Any] | None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in range(process_count={process_count})")
        self.tokenizer, self.template = tokenizer, get_chat_template(template)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.shuffle, self.repeat, self.strict = shuffle, repeat, strict
        self.process_index, self.process_count, self.max_examples = int(process_index), int(process_count), max_examples
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.weights = None if weights is None else [float(w) for w in weights]
        if self.weights is not None and (len(self.weights) != len(paths) or not any(self.weights) or
                                         not all(math.isfinite(w) and w >= 0 for w in self.weights)):
            raise ValueError(f"weights must be one finite number >= 0 per file ({len(paths)}), not all 0; got "
                             f"{weights}")

        self.readers = [JsonlReader(epath.Path(path)) for path in paths]
        self.data_sha256 = hashlib.sha256("".join(r.fingerprint for r in self.readers).encode()).hexdigest()
        # This process's records of file f: process_index + k * process_count for k < local_sizes[f].
        self.local_sizes = [len(range(self.process_index, len(r), self.process_count)) for r in self.readers]
        if self.weights is None:  # every record once per pass: files count by their size
            mixture_weights, epochs = self.local_sizes, [1.0] * len(paths)
        else:
            mixture_weights, epochs = self.weights, share_epochs(self.local_sizes, self.weights)
        self.sampler = MixtureSampler(self.local_sizes, mixture_weights, epochs, seed=self.seed,
                                      stream=self.process_index, shuffle=shuffle, repeat=repeat)
        if self.sampler.empty:
            sizes = ", ".join(f"{r.name}: {n}" for r, n in zip(self.readers, self.local_sizes, strict=True))
            raise ValueError(f"process {self.process_index}/{self.process_count} has no records to read "
                             f"(records per file for this process: {sizes})")
        self.packer = self._new_packer()
        self._open: list[tuple[int, int]] = []  # the (file, record) draws packed into the packer's open row
        self._finished = False
        self._skipped_in_a_row = 0
        self._stats = _new_stats()
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

    def _load(self, file: int, record: int) -> tuple[Example | None, str | None] | BadRecord:
        reader = self.readers[file]
        line, where = reader.line(record), reader.where(record)
        if not line.strip():
            return None, None  # a blank line is no record: neither an example nor a skip
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

    def _pull(self) -> tuple[tuple[int, int], Example] | None:
        """((file, record), example) of the next usable record; None once a pass ends without `repeat`."""
        while (draw := self.sampler.next()) is not None:
            file, local = draw
            draw = (file, self.process_index + local * self.process_count)
            loaded = self._load(*draw)
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
            if self._skipped_in_a_row > sum(self.sampler.quotas):  # a whole pass: with repeat, it would loop forever
                skipped = {kind: self._stats[kind] for kind in SKIPS}
                raise BadDataError(f"no usable example in a whole pass over the data; skipped {skipped}, bad "
                                   f"records: {self._stats['bad_examples']}")
        return None

    # ---- batches ----------------------------------------------------------------------------------------------

    def __iter__(self) -> ConversationIterator:
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
        return {"data_sha256": self.data_sha256, "weights": self.weights,
                "tokenizer_sha256": getattr(self.tokenizer, "sha256", None), "template": self.template.name,
                "seed": self.seed, "seq_len": self.seq_len, "process_index": self.process_index,
                "process_count": self.process_count, "shuffle": self.shuffle, "repeat": self.repeat, **self._options()}

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable dict; resuming from it continues with exactly the next batch."""
        return {"version": STATE_VERSION, **self._identity(), "mixture": self.sampler.get_state(),
                "open_row": [list(draw) for draw in self._open], "finished": self._finished,
                "skipped_in_a_row": self._skipped_in_a_row, "stats": copy.deepcopy(self._stats)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        differ = [f"{key}: state has {state.get(key)!r}, this iterator {value!r}"
                  for key, value in self._identity().items() if state.get(key) != value]
        if differ:
            raise ValueError("cannot resume this data iterator from the given state:\n  " + "\n  ".join(differ))
        self.sampler.set_state(state["mixture"])
        self._finished, self._skipped_in_a_row = bool(state["finished"]), int(state["skipped_in_a_row"])
        self._stats = copy.deepcopy(dict(state["stats"]))
        self.packer, self._open = self._new_packer(), []
        for file, record in state["open_row"]:
            draw = (int(file), int(record))
            loaded = self._load(*draw)
            if isinstance(loaded, BadRecord) or loaded[0] is None:
                raise ValueError(f"{self.readers[draw[0]].where(draw[1])} of the saved open row no longer gives an "
                                 "example")
            self.packer.add(loaded[0])  # these examples shared one row, so none of them closes it
            self._open.append(draw)

    @property
    def stats(self) -> dict[str, Any]:
        """Examples, rows, tokens, padding fraction, skipped examples by reason, bad records by kind (with examples)."""
        return copy.deepcopy(self._stats)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


class SFTDataIterator(ConversationIterator):
    """Supervised fine-tuning batches: dicts of numpy arrays `[batch_size, seq_len]` (`input_ids`, `targets`,
    `positions`, `segment_ids`, `loss_mask`; see packing.py), one conversation per segment, loss on assistant turns.
    `format` is "messages" or "alpaca"; `weights` are the files' shares of the examples drawn (module docstring)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Tokenizer, seq_len: int,
                 batch_size: int, *, format: str = "messages", weights: Sequence[float] | None = None,
                 template: str = "internlm2_chat", seed: int = 0, shuffle: bool = True, repeat: bool = True,
                 process_index: int = 0, process_count: int = 1, strict: bool = False,
                 state: Mapping[str, Any] | None = None):
        if format not in SFT_FORMATS:
            raise ValueError(f"format {format!r}; expected one of {', '.join(SFT_FORMATS)}")
        self.format = format
        super().__init__(paths, tokenizer, seq_len, batch_size, weights=weights, template=template, seed=seed,
                         shuffle=shuffle, repeat=repeat, process_index=process_index, process_count=process_count,
                         strict=strict, max_examples=None, state=state)

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


class PairDataIterator(ConversationIterator):
    """Preference batches: the SFT fields plus `pair_mask [batch_size, max_pairs]`; row slot k holds the k-th pair
    as segments 2k + 1 (chosen) and 2k + 2 (rejected). `kind="reward"` renders reward-model samples (domain system
    turn, reward token; `domain_prompts` defaults to DOMAIN_PROMPTS, `default_domain` serves records without one),
    `kind="dpo"` policy samples trained on the response only. `weights` as for `SFTDataIterator`."""

    pairs = True

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Tokenizer, seq_len: int,
                 batch_size: int, *, kind: str = "reward", max_pairs: int = 8,
                 domain_prompts: Mapping[str, str] | None = None, default_domain: str | None = None,
                 weights: Sequence[float] | None = None, template: str = "internlm2_chat", seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, process_index: int = 0, process_count: int = 1,
                 strict: bool = False, state: Mapping[str, Any] | None = None):
        if kind not in PAIR_KINDS:
            raise ValueError(f"kind {kind!r}; expected one of {', '.join(PAIR_KINDS)}")
        self.kind = kind
        self.domain_prompts = dict(DOMAIN_PROMPTS if domain_prompts is None else domain_prompts)
        if default_domain is not None and default_domain not in self.domain_prompts:
            raise ValueError(f"default_domain {default_domain!r} is not one of {', '.join(self.domain_prompts)}")
        self.default_domain = default_domain
        super().__init__(paths, tokenizer, seq_len, batch_size, weights=weights, template=template, seed=seed,
                         shuffle=shuffle, repeat=repeat, process_index=process_index, process_count=process_count,
                         strict=strict, max_examples=max_pairs, state=state)

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
