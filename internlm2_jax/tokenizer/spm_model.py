"""Read the parts of a SentencePiece ``.model`` file that the sentencepiece Python API does not expose.

We need each piece's *type* (normal / user-defined / control / byte / ...), which `SentencePieceProcessor` cannot
tell apart for normal vs user-defined pieces, plus a few normalizer and trainer flags. sentencepiece ships a
generated ``sentencepiece_model_pb2``, but the wheel's copy is generated for protobuf 7 and refuses to import under
the protobuf 6 the project pins. So we describe the handful of fields we read (same names and field numbers as
sentencepiece's ``sentencepiece_model.proto``) and let protobuf build the message class at runtime; every field we
do not list is kept as an unknown field, so nothing is lost if a message is re-serialised.
"""

from __future__ import annotations

import dataclasses
import enum
import os

from etils import epath
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


class PieceType(enum.IntEnum):
    """`SentencePiece.Type` from sentencepiece_model.proto."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ModelType(enum.IntEnum):
    """`TrainerSpec.ModelType` from sentencepiece_model.proto."""

    UNIGRAM = 1
    BPE = 2
    WORD = 3
    CHAR = 4


@dataclasses.dataclass(frozen=True)
class SpmPiece:
    piece: str
    score: float
    type: PieceType


@dataclasses.dataclass(frozen=True)
class SpmModel:
    """The pieces (index = id) and the flags that decide how text is cut before the model sees it."""

    pieces: tuple[SpmPiece, ...]
    model_type: ModelType
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    normalizer_name: str


_T = descriptor_pb2.FieldDescriptorProto
# (message, [(field name, number, type, default or None, nested message type or None, repeated)])
_SCHEMA = {
    "TrainerSpec": [
        ("model_type", 3, _T.TYPE_INT32, "1", None, False),
        ("byte_fallback", 35, _T.TYPE_BOOL, "false", None, False),
    ],
    "NormalizerSpec": [
        ("name", 1, _T.TYPE_STRING, None, None, False),
        ("add_dummy_prefix", 3, _T.TYPE_BOOL, "true", None, False),
        ("remove_extra_whitespaces", 4, _T.TYPE_BOOL, "true", None, False),
        ("escape_whitespaces", 5, _T.TYPE_BOOL, "true", None, False),
    ],
    "SentencePiece": [
        ("piece", 1, _T.TYPE_STRING, None, None, False),
        ("score", 2, _T.TYPE_FLOAT, None, None, False),
        ("type", 3, _T.TYPE_INT32, "1", None, False),  # an enum on the wire is a varint, like int32
    ],
    "ModelProto": [
        ("pieces", 1, _T.TYPE_MESSAGE, None, "SentencePiece", True),
        ("trainer_spec", 2, _T.TYPE_MESSAGE, None, "TrainerSpec", False),
        ("normalizer_spec", 3, _T.TYPE_MESSAGE, None, "NormalizerSpec", False),
    ],
}
_PACKAGE = "internlm2_jax_spm"  # a private package in a private pool: no clash with sentencepiece's own descriptors


def _build_model_proto_class() -> type:
    file_proto = descriptor_pb2.FileDescriptorProto(name="internlm2_jax_spm_subset.proto", package=_PACKAGE,
                                                    syntax="proto2")
    for message_name, fields in _SCHEMA.items():
        message = file_proto.message_type.add(name=message_name)
        for name, number, field_type, default, type_name, repeated in fields:
            field = message.field.add(name=name, number=number, type=field_type,
                                      label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL)
            if default is not None:
                field.default_value = default
            if type_name is not None:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelProto"))


_ModelProto = _build_model_proto_class()


def parse_spm_model(serialized: bytes, *, source: str = "<bytes>") -> SpmModel:
    """Parses a serialized ModelProto; `source` only names the file in error messages."""
    proto = _ModelProto()
    try:
        proto.ParseFromString(serialized)
    except Exception as e:  # protobuf raises DecodeError, but also other errors on garbage input
        raise ValueError(f"{source} is not a SentencePiece model file: {e}") from e
    if not proto.pieces:
        raise ValueError(f"{source} is not a SentencePiece model file: it has no pieces")
    try:
        pieces = tuple(SpmPiece(p.piece, p.score, PieceType(p.type)) for p in proto.pieces)
        model_type = ModelType(proto.trainer_spec.model_type)
    except ValueError as e:
        raise ValueError(f"{source} is not a SentencePiece model file we understand: {e}") from e
    norm = proto.normalizer_spec
    return SpmModel(pieces=pieces, model_type=model_type, byte_fallback=proto.trainer_spec.byte_fallback,
                    add_dummy_prefix=norm.add_dummy_prefix, remove_extra_whitespaces=norm.remove_extra_whitespaces,
                    escape_whitespaces=norm.escape_whitespaces, normalizer_name=norm.name)


def read_spm_model(path: str | os.PathLike) -> SpmModel:
    return parse_spm_model(epath.Path(path).read_bytes(), source=str(path))


def with_piece_types(serialized: bytes, types: dict[int, PieceType]) -> bytes:
    """Returns the model with the pieces `types` names retyped (ids, strings and everything else unchanged).

    Turning a piece into CONTROL hides it from text: SentencePiece never matches a control piece in raw text and
    never builds one by merging, so the edited model encodes a reserved string such as `[UNUSED_TOKEN_146]` as the
    ordinary characters it is made of.
    """
    proto = _ModelProto()
    proto.ParseFromString(serialized)
    for i, piece_type in types.items():
        proto.pieces[i].type = piece_type
    return proto.SerializeToString()
