"""Names of InternLM2's special tokens, and how each name is found in a SentencePiece model.

Code everywhere refers to special tokens by *name* (conventions.md, "Tokens and templates"); this module decides
which piece, and so which id, a name means in a given model. Two layouts are recognised:

- **trained** (our `train_tokenizer` output): the model has a piece literally named `<|im_start|>`, and every name
  below is a user-defined piece of the same spelling.
- **released** (InternLM2's `tokenizer.model`): the chat tokens are reserved pieces `[UNUSED_TOKEN_141..146]` that
  the released HF tokenizer renames (spec §3.2), e.g. `<|im_start|>` = `[UNUSED_TOKEN_146]` = 92543.

The reward token keeps the released spelling `[UNUSED_TOKEN_130]` (id 92527 in the released model) in both layouts:
reward checkpoints and xtuner configs know it by that name, and one name in both layouts means no mapping to keep.
`train_tokenizer` reserves a piece of that spelling.
"""

from __future__ import annotations

import dataclasses
import re

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ACTION_START = "<|action_start|>"
ACTION_END = "<|action_end|>"
PLUGIN = "<|plugin|>"
INTERPRETER = "<|interpreter|>"
REWARD = "[UNUSED_TOKEN_130]"

# The names the chat template and the reward model insert; BOS/EOS/UNK are the model's own control pieces.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (IM_START, IM_END, ACTION_START, ACTION_END, PLUGIN, INTERPRETER)
ADDED_SPECIAL_TOKENS: tuple[str, ...] = (*CHAT_SPECIAL_TOKENS, REWARD)

# Released InternLM2 model: name -> the reserved piece that carries it (spec §3.2).
RELEASED_PIECES: dict[str, str] = {
    PLUGIN: "[UNUSED_TOKEN_141]",
    INTERPRETER: "[UNUSED_TOKEN_142]",
    ACTION_END: "[UNUSED_TOKEN_143]",
    ACTION_START: "[UNUSED_TOKEN_144]",
    IM_END: "[UNUSED_TOKEN_145]",
    IM_START: "[UNUSED_TOKEN_146]",
    REWARD: REWARD,
}

# Spare pieces of the released vocabulary. SentencePiece matches them in raw text (they are user-defined pieces), so
# plain-text encoding must hide them, like the special tokens themselves.
RESERVED_PIECE_PATTERN = re.compile(r"\[UNUSED_TOKEN_\d+\]")


@dataclasses.dataclass(frozen=True)
class SpecialToken:
    name: str  # how code and text spell it, e.g. "<|im_start|>"
    id: int
    piece: str  # the SentencePiece piece at `id`, e.g. "[UNUSED_TOKEN_146]" in the released model


def resolve_special_tokens(piece_to_id: dict[str, int], *, bos_id: int, eos_id: int, unk_id: int,
                           source: str) -> dict[str, SpecialToken]:
    """Maps every special-token name to its id and piece in a model whose piece -> id table is `piece_to_id`.

    Raises ValueError naming `source` and what is missing when the model fits neither layout.
    """
    id_to_piece = {i: p for p, i in piece_to_id.items()}
    tokens: dict[str, SpecialToken] = {}
    for name, token_id, what in ((BOS, bos_id, "bos_id"), (EOS, eos_id, "eos_id"), (UNK, unk_id, "unk_id")):
        if id_to_piece.get(token_id) != name:
            raise ValueError(f"{source}: expected {what} to be the piece {name!r}, but {what}={token_id} is "
                             f"{id_to_piece.get(token_id)!r}")
        tokens[name] = SpecialToken(name, token_id, name)

    if IM_START in piece_to_id:
        pieces = {name: name for name in ADDED_SPECIAL_TOKENS}
        layout = f"a trained layout (it has a {IM_START!r} piece)"
    elif RELEASED_PIECES[IM_START] in piece_to_id:
        pieces = RELEASED_PIECES
        layout = f"the released InternLM2 layout (it has a {RELEASED_PIECES[IM_START]!r} piece)"
    else:
        raise ValueError(f"{source}: cannot find the chat special tokens: the model has neither a {IM_START!r} piece "
                         f"(tokenizers from train_tokenizer) nor {RELEASED_PIECES[IM_START]!r} (the released "
                         f"InternLM2 tokenizer)")
    missing = [f"{name} (piece {piece!r})" for name, piece in pieces.items() if piece not in piece_to_id]
    if missing:
        raise ValueError(f"{source} looks like {layout} but lacks the pieces for: {', '.join(missing)}")
    for name, piece in pieces.items():
        tokens[name] = SpecialToken(name, piece_to_id[piece], piece)
    return tokens
