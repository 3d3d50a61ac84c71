"""Export of sentencepiece ``.model`` files to llama2.c ``tokenizer.bin``.

``tokenizer.bin`` keeps only pieces and scores, so a model is exported only when the encoder
in ``llama2rnn.tokenizer`` reproduces it from those alone: a BPE model with the identity
normalization, a dummy prefix, no whitespace removal and no user-defined pieces. A small
protobuf reader gets those settings from the ``.model`` file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .tokenizer import (
    BOS_ID,
    BYTE_PIECES_START,
    EOS_ID,
    UNK_ID,
    WHITESPACE_MARKER,
    PathLike,
    TokenizerError,
    _load_processor,
    _read_tokenizer_file,
)

if TYPE_CHECKING:
    import sentencepiece

# Field numbers and enum values from sentencepiece's sentencepiece_model.proto.
_MODEL_PIECES = 1
_MODEL_TRAINER_SPEC = 2
_MODEL_NORMALIZER_SPEC = 3
_MODEL_DENORMALIZER_SPEC = 5
_PIECE_TYPE = 3
_TRAINER_MODEL_TYPE = 3
_TRAINER_TREAT_WHITESPACE_AS_SUFFIX = 24
_NORMALIZER_NAME = 1
_NORMALIZER_CHARSMAP = 2
_NORMALIZER_ADD_DUMMY_PREFIX = 3
_NORMALIZER_REMOVE_EXTRA_WHITESPACES = 4
_NORMALIZER_ESCAPE_WHITESPACES = 5
_MODEL_TYPE_BPE = 2
_PIECE_CONTROL = 3
_PIECE_USER_DEFINED = 4
_PIECE_UNUSED = 5
_PIECE_BYTE = 6
_MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_PIECE_TYPE_NAMES = {
    1: "normal",
    2: "unknown",
    3: "control",
    4: "user-defined",
    5: "unused",
    6: "byte",
}

ProtoValue = Union[int, bytes]


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if offset >= len(data):
            raise TokenizerError("protobuf varint runs past the end of the data")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, offset


def _proto_fields(data: bytes) -> Iterator[tuple[int, ProtoValue]]:
    """Yield (field number, value) for each field of a serialized protobuf message."""
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        number, wire_type = key >> 3, key & 7
        value: ProtoValue
        if wire_type == 0:
            value, offset = _read_varint(data, offset)
        elif wire_type == 2:
            length, offset = _read_varint(data, offset)
            value = data[offset : offset + length]
            offset += length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value = data[offset : offset + width]
            offset += width
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire_type} in field {number}")
        if offset > len(data):
            raise TokenizerError(f"protobuf field {number} runs past the end of the data")
        yield number, value


def _last_field(message: bytes, number: int, default: ProtoValue) -> ProtoValue:
    value = default
    for field_number, field_value in _proto_fields(message):
        if field_number == number:
            value = field_value
    return value


@dataclass
class _ModelSpec:
    """The parts of a sentencepiece ModelProto that tokenizer.bin cannot store."""

    model_type: int = 1
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    has_charsmap: bool = False
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    has_denormalizer: bool = False
    piece_types: list[int] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> _ModelSpec:
        spec = cls()
        for number, value in _proto_fields(data):
            if not isinstance(value, bytes):
                continue
            if number == _MODEL_PIECES:
                spec.piece_types.append(int(_last_field(value, _PIECE_TYPE, 1)))
            elif number == _MODEL_TRAINER_SPEC:
                spec.model_type = int(_last_field(value, _TRAINER_MODEL_TYPE, 1))
                suffix = _last_field(value, _TRAINER_TREAT_WHITESPACE_AS_SUFFIX, 0)
                spec.treat_whitespace_as_suffix = bool(suffix)
            elif number == _MODEL_NORMALIZER_SPEC:
                spec.normalizer_name = bytes(_last_field(value, _NORMALIZER_NAME, b"")).decode(
                    "utf-8", "replace"
                )
                spec.has_charsmap = bool(_last_field(value, _NORMALIZER_CHARSMAP, b""))
                spec.add_dummy_prefix = bool(_last_field(value, _NORMALIZER_ADD_DUMMY_PREFIX, 1))
                spec.remove_extra_whitespaces = bool(
                    _last_field(value, _NORMALIZER_REMOVE_EXTRA_WHITESPACES, 1)
                )
                spec.escape_whitespaces = bool(
                    _last_field(value, _NORMALIZER_ESCAPE_WHITESPACES, 1)
                )
            elif number == _MODEL_DENORMALIZER_SPEC:
                spec.has_denormalizer = bool(_last_field(value, _NORMALIZER_CHARSMAP, b""))
        return spec

    def incompatibilities(self) -> list[str]:
        """Return why ``Tokenizer`` would encode differently from this model ([] if never)."""
        problems = []
        if self.model_type != _MODEL_TYPE_BPE:
            kind = _MODEL_TYPE_NAMES.get(self.model_type, str(self.model_type))
            problems.append(f"model_type is {kind}, expected bpe")
        if self.has_charsmap:
            problems.append(
                f"normalization rule {self.normalizer_name!r} rewrites text, expected 'identity'"
            )
        if self.has_denormalizer:
            problems.append("the model has a denormalization rule")
        if not self.add_dummy_prefix:
            problems.append("add_dummy_prefix is false, expected true")
        if self.remove_extra_whitespaces:
            problems.append("remove_extra_whitespaces is true, expected false")
        if not self.escape_whitespaces:
            problems.append("escape_whitespaces is false, expected true")
        if self.treat_whitespace_as_suffix:
            problems.append("treat_whitespace_as_suffix is true, expected false")
        return problems


def _check_exportable(spec: _ModelSpec, processor: sentencepiece.SentencePieceProcessor) -> None:
    problems = spec.incompatibilities()
    special_ids = (processor.unk_id(), processor.bos_id(), processor.eos_id())
    if special_ids != (UNK_ID, BOS_ID, EOS_ID):
        problems.append(f"unk, bos and eos ids are {special_ids}, expected (0, 1, 2)")
    byte_ids = [i for i, piece_type in enumerate(spec.piece_types) if piece_type == _PIECE_BYTE]
    if byte_ids and byte_ids != list(range(BYTE_PIECES_START, BYTE_PIECES_START + 256)):
        problems.append("byte pieces are not at ids 3 to 258")
    for token_id, piece_type in enumerate(spec.piece_types):
        is_extra_control = piece_type == _PIECE_CONTROL and token_id not in (BOS_ID, EOS_ID)
        if piece_type in (_PIECE_USER_DEFINED, _PIECE_UNUSED) or is_extra_control:
            problems.append(
                f"piece {token_id} {processor.id_to_piece(token_id)!r} is "
                f"{_PIECE_TYPE_NAMES[piece_type]}, which tokenizer.bin cannot mark"
            )
            break
    if problems:
        raise TokenizerError("; ".join(problems))


def write_tokenizer_bin(model_path: PathLike, out_path: PathLike) -> None:
    """Export a sentencepiece ``.model`` file to llama2.c's ``tokenizer.bin``.

    ``▁`` becomes a space, BOS and EOS are written as "\\n<s>\\n" and "\\n</s>\\n", and
    max_token_length is the longest piece in bytes. Raises ``TokenizerError`` for a model
    that ``Tokenizer`` would not encode like sentencepiece does (not BPE, a normalization
    rule other than identity, whitespace handling, ids or piece types the format cannot
    store). The output is written to a temporary file in the same folder, then renamed, so
    a failed export leaves no partial file.
    """
    model_name = os.fspath(model_path)
    data = _read_tokenizer_file(model_path)
    processor = _load_processor(data, model_name)
    try:
        _check_exportable(_ModelSpec.parse(data), processor)
    except TokenizerError as error:
        raise TokenizerError(f"cannot export {model_name} to tokenizer.bin: {error}") from None

    records = []
    for token_id in range(processor.vocab_size()):
        if token_id == BOS_ID:
            piece = "\n<s>\n"
        elif token_id == EOS_ID:
            piece = "\n</s>\n"
        else:
            piece = processor.id_to_piece(token_id).replace(WHITESPACE_MARKER, " ")
        records.append((processor.get_score(token_id), piece.encode("utf-8")))
    max_token_length = max(len(encoded) for _, encoded in records)

    out = Path(out_path)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(struct.pack("<i", max_token_length))
            for score, encoded in records:
                file.write(struct.pack("<fi", score, len(encoded)))
                file.write(encoded)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
