"""`Tokenizer`: SentencePiece plus InternLM2's special-token handling, giving the released HF tokenizer's ids.

Encoding modes (spec §3.2, conventions.md "Tokens and templates"):

- `allow_special=True` (text written by the template or by a trusted caller): the text is first cut at the names of
  the special tokens (`<s>`, `</s>`, `<unk>`, `<|im_start|>`, ..., `[UNUSED_TOKEN_130]`; longest match first, no
  stripping), which become their ids, and the pieces in between are SentencePiece-encoded separately. This is what
  the released HF tokenizer does, and what our `save_pretrained` export does in transformers.
- `allow_special=False` (message content typed by a user): no string becomes a control token. Special-token names
  are ordinary text, and so are the reserved `[UNUSED_TOKEN_*]` pieces that SentencePiece alone would match in raw
  text (they are user-defined pieces in the released model): they are encoded as the characters they are made of.

In both modes a piece that carries a special token under another name (the released `[UNUSED_TOKEN_146]`, which is
`<|im_start|>`) is not matched in raw text: a control token has exactly one spelling, its name, which is also what
the exported HF tokenizer knows it by. Other reserved pieces (`[UNUSED_TOKEN_3]`) stay atomic with
`allow_special=True`, as in SentencePiece and HF. With that, `decode(encode(x)) == x` also holds for reserved
strings; the one exception left is U+2581 ("▁"), which SentencePiece treats as a space.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable

import sentencepiece as spm
from etils import epath

from internlm2_jax.tokenizer.special_tokens import (
    ADDED_SPECIAL_TOKENS,
    BOS,
    EOS,
    IM_END,
    RESERVED_PIECE_PATTERN,
    REWARD,
    UNK,
    SpecialToken,
    resolve_special_tokens,
)
from internlm2_jax.tokenizer.spm_model import PieceType, SpmModel, parse_spm_model, with_piece_types

TOKENIZER_MODEL_FILE = "tokenizer.model"


class Tokenizer:
    """Encodes text to InternLM2 token ids and back. Build with `from_file`, `from_pretrained` or `train_tokenizer`."""

    def __init__(self, model_bytes: bytes, *, source: str = "<bytes>"):
        """`model_bytes` is a serialized SentencePiece model; `source` names it in error messages."""
        self._model_bytes = model_bytes
        self._sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.spm_model: SpmModel = parse_spm_model(model_bytes, source=source)
        self.source = source
        if self.spm_model.add_dummy_prefix or self.spm_model.remove_extra_whitespaces:
            # Both would change text at every boundary where we cut it (special tokens, plain-text pieces).
            raise ValueError(f"{source}: add_dummy_prefix={self.spm_model.add_dummy_prefix} and "
                             f"remove_extra_whitespaces={self.spm_model.remove_extra_whitespaces}; InternLM2 "
                             f"tokenizers need both False because text is encoded in separate pieces")
        pieces = self.spm_model.pieces
        piece_to_id = {p.piece: i for i, p in enumerate(pieces)}
        base = spm.SentencePieceProcessor(model_proto=model_bytes)
        self._special: dict[str, SpecialToken] = resolve_special_tokens(
            piece_to_id, bos_id=base.bos_id(), eos_id=base.eos_id(), unk_id=base.unk_id(), source=source)
        self._name_by_id = {t.id: t.name for t in self._special.values()}
        # Longest first, so that a name that is a prefix of another never wins the match.
        names = sorted(self._special, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(re.escape(n) for n in names))

        # Pieces SentencePiece must not match in raw text: see the module docstring.
        user_defined = {i for i, p in enumerate(pieces) if p.type == PieceType.USER_DEFINED}
        renamed = {t.id for t in self._special.values() if t.piece != t.name} & user_defined
        special_pieces = {t.id for t in self._special.values()} & user_defined
        reserved = {i for i in user_defined if RESERVED_PIECE_PATTERN.fullmatch(pieces[i].piece)}
        self._sp_text = self._processor(renamed) if renamed else base
        self._sp_plain = self._processor(renamed | special_pieces | reserved)

    def _processor(self, hidden: set[int]) -> spm.SentencePieceProcessor:
        """A SentencePiece processor for this model with the `hidden` pieces made CONTROL (see module docstring)."""
        model = with_piece_types(self._model_bytes, dict.fromkeys(hidden, PieceType.CONTROL))
        return spm.SentencePieceProcessor(model_proto=model)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a SentencePiece `.model` file (the released `tokenizer.model` or one from `train_tokenizer`), local
        or a URL: the bytes are read through epath and handed to SentencePiece."""
        path = epath.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model file not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        """Loads the `tokenizer.model` of a model directory (as written by `save_pretrained`)."""
        path = epath.Path(directory) / TOKENIZER_MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {TOKENIZER_MODEL_FILE}; is it a model directory?")
        return cls.from_file(path)

    def save_pretrained(self, directory: str | os.PathLike, *, model_max_length: int = 32768) -> list[epath.Path]:
        """Writes tokenizer.model plus HF files that transformers' AutoTokenizer loads with the same ids.

        Returns the written paths. See `internlm2_jax.tokenizer.hf_export` for what each file holds; the chat
        template is added by `chat_template.save_chat_template` (as `convert.save_pretrained` does).
        """
        from internlm2_jax.tokenizer.hf_export import save_hf_tokenizer  # hf_export needs this class's properties

        return save_hf_tokenizer(self, directory, model_max_length=model_max_length)

    # ---- encoding -------------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = True) -> list[int]:
        """Token ids of `text`; see the module docstring for `allow_special`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        if allow_special:
            start = 0
            for match in self._special_pattern.finditer(text):
                ids += self._sp_text.encode(text[start:match.start()])
                ids.append(self._special[match.group()].id)
                start = match.end()
            ids += self._sp_text.encode(text[start:])
        else:
            ids += self._sp_plain.encode(text)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool = False, add_eos: bool = False,
                     allow_special: bool = True) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos, allow_special=allow_special) for t in texts]

    # ---- decoding -------------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special ids decode to their names (`<|im_start|>`, `<s>`) unless skipped.

        The ids between two special ids are decoded together, so byte-fallback sequences and spaces inside such a
        run come back exactly.
        """
        parts: list[str] = []
        run: list[int] = []
        for position, token_id in enumerate(ids):
            token_id = int(token_id)  # numpy and jax integers
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} at position {position} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            name = self._name_by_id.get(token_id)
            if name is None:
                run.append(token_id)
                continue
            parts.append(self._sp_text.decode(run))
            run = []
            if not skip_special_tokens:
                parts.append(name)
        parts.append(self._sp_text.decode(run))
        return "".join(parts)

    def decode_batch(self, batch: Iterable[Iterable[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    # ---- vocabulary facts -----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.spm_model.pieces)

    @property
    def bos_id(self) -> int:
        return self._special[BOS].id

    @property
    def eos_id(self) -> int:
        return self._special[EOS].id

    @property
    def pad_id(self) -> int:
        """InternLM2 pads with EOS (spec §3.3); the SentencePiece model itself has no pad piece."""
        return self.eos_id

    @property
    def unk_id(self) -> int:
        return self._special[UNK].id

    @property
    def reward_token_id(self) -> int:
        return self._special[REWARD].id

    @property
    def stop_ids(self) -> list[int]:
        """Chat generation stops at either EOS or `<|im_end|>` (spec §3.3)."""
        return [self.eos_id, self._special[IM_END].id]

    @property
    def special_tokens(self) -> dict[str, int]:
        """Name -> id for BOS, EOS, UNK, the chat tokens and the reward token."""
        return {name: token.id for name, token in self._special.items()}

    @property
    def added_special_tokens(self) -> tuple[SpecialToken, ...]:
        """The chat and reward tokens with the pieces that carry them (what an HF export lists as special)."""
        return tuple(self._special[name] for name in ADDED_SPECIAL_TOKENS)

    def token_id(self, name: str) -> int:
        """Id of a special token by name, e.g. `token_id("<|im_end|>")`."""
        try:
            return self._special[name].id
        except KeyError:
            raise KeyError(f"{name!r} is not a special token; known: {', '.join(self._special)}") from None

    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model, exactly as loaded."""
        return self._model_bytes

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the model file; checkpoints record it to refuse a mismatched tokenizer."""
        return self._sha256

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
