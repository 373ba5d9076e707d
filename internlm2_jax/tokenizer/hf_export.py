"""Export a `Tokenizer` as HF tokenizer files that transformers' `AutoTokenizer` loads with exactly our ids.

Model directories carry `tokenizer.model` plus these files (conventions.md, "Artifacts"). `tokenizer.json` is built
by hand with plain `json`, because the runtime must not depend on `tokenizers`:

- model: BPE over the SentencePiece vocabulary, `byte_fallback` on. SentencePiece BPE merges, at each step, the
  adjacent pair whose concatenation is the highest-scoring piece; HF BPE merges the pair of lowest rank. So the
  merges are every split of every normal piece into two normal pieces, ranked by the merged piece's score (highest
  first, ties by id), which is transformers' `generate_merges` with scores.
- normalizer: " " -> "▁" (SentencePiece's whitespace escaping; no dummy prefix), no pre-tokenizer.
- added tokens: `<unk>`, `<s>`, `</s>`, the chat tokens and the reward token as special tokens under their names,
  and every other user-defined piece (full-width letters, `[UNUSED_TOKEN_*]`) as a non-special added token, matched
  atomically as SentencePiece matches user-defined pieces. Where a name differs from the piece at its id (released
  `<|im_start|>` is `[UNUSED_TOKEN_146]`), the vocabulary entry is renamed to the name, so the ids agree and the raw
  piece string is ordinary text, as `Tokenizer.encode` treats it.
- post-processor: `<s>` first (HF InternLM2 default `add_bos_token=True`); decoder: "▁" -> " ", byte fallback, fuse.

The chat template is not the tokenizer's: `chat_template.save_chat_template` adds it to tokenizer_config.json (the
tokenizer never imports the template; `convert.save_pretrained` writes both into a model directory).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

from etils import epath

from internlm2_jax.tokenizer.special_tokens import BOS, EOS, UNK
from internlm2_jax.tokenizer.spm_model import ModelType, PieceType
from internlm2_jax.tokenizer.tokenizer import TOKENIZER_MODEL_FILE

if TYPE_CHECKING:
    from internlm2_jax.tokenizer.tokenizer import Tokenizer

SPACE = "▁"  # U+2581, SentencePiece's escaped space


def _check_exportable(tokenizer: Tokenizer) -> None:
    model = tokenizer.spm_model
    problems = []
    if model.model_type != ModelType.BPE:
        problems.append(f"model_type is {model.model_type.name}, not BPE")
    if not model.byte_fallback:
        problems.append("byte_fallback is off")
    if not model.escape_whitespaces or model.normalizer_name != "identity":
        problems.append(f"normalizer is {model.normalizer_name!r} with escape_whitespaces="
                        f"{model.escape_whitespaces}, not 'identity' with escaping")
    if any(p.type == PieceType.UNUSED for p in model.pieces):
        problems.append("it has UNUSED pieces (SentencePiece merges through them and splits them again, which HF "
                        "BPE cannot express)")
    if any(p.type == PieceType.USER_DEFINED and (" " in p.piece or SPACE in p.piece) for p in model.pieces):
        problems.append("a user-defined piece contains a space, which HF would match before normalization")
    if problems:
        raise ValueError(f"cannot export {tokenizer.source} as an HF tokenizer: {'; '.join(problems)}")


def _vocab_and_merges(tokenizer: Tokenizer) -> tuple[dict[str, int], list[list[str]]]:
    pieces = tokenizer.spm_model.pieces
    names = [p.piece for p in pieces]
    for token in tokenizer.added_special_tokens:
        names[token.id] = token.name
    # SentencePiece treats a "\0" piece as unused when byte_fallback is on ("\0" is encoded as <0x00>); keep the
    # id but give it a name no text can produce, so HF falls back to the byte as well.
    mergeable = {}
    for i, p in enumerate(pieces):
        if p.piece == "\0":
            names[i] = f"<unused_null_piece_{i}>"
        elif p.type == PieceType.NORMAL:
            mergeable[p.piece] = i
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"cannot export {tokenizer.source}: {duplicates} name both a special token and a piece")

    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-pieces[i].score, i, cut, left, right))
    # SentencePiece breaks a score tie by position, which a rank cannot express; the parity tests (and much larger
    # fuzzing of both tokenizers) found no input where that tie decides the result.
    ranked.sort()
    return {name: i for i, name in enumerate(names)}, [[left, right] for *_, left, right in ranked]


def _added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def build_tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizer.json` document (HF `tokenizers` serialization format) for `tokenizer`."""
    _check_exportable(tokenizer)
    vocab, merges = _vocab_and_merges(tokenizer)
    special = tokenizer.special_tokens
    special_ids = set(special.values())
    added = [_added_token(token_id, name, True) for name, token_id in special.items()]
    added += [_added_token(i, p.piece, False) for i, p in enumerate(tokenizer.spm_model.pieces)
              if p.type == PieceType.USER_DEFINED and i not in special_ids]
    added.sort(key=lambda t: t["id"])
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": BOS, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [tokenizer.bos_id], "tokens": [BOS]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {"type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike, *,
                      model_max_length: int) -> list[epath.Path]:
    """Writes tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`
    (local or a URL)."""
    tokenizer_json = build_tokenizer_json(tokenizer)
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    extra_special = [t.name for t in tokenizer.added_special_tokens]
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS,
                   "additional_special_tokens": extra_special}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    files = {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }
    written = [directory / TOKENIZER_MODEL_FILE]
    written[0].write_bytes(tokenizer.model_bytes)
    for name, document in files.items():
        path = directory / name
        indent = None if name == "tokenizer.json" else 2  # tokenizer.json is large and not meant to be read
        path.write_text(json.dumps(document, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")
        written.append(path)
    return written
