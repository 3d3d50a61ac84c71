"""Tokenizers for llama2.c ``tokenizer.bin`` files and sentencepiece ``.model`` files.

``Tokenizer`` reads llama2.c's ``tokenizer.bin`` and encodes in pure Python with the same
ids as the ``sentencepiece`` library gives for the ``.model`` it was exported from. This holds
for BPE models with byte fallback, the identity normalization, a dummy prefix and no
whitespace removal, as used by Llama 2 and by llama2.c. It was checked against sentencepiece
0.2.3. ``SentencePieceTokenizer`` wraps the sentencepiece library behind the same interface.
``load_tokenizer`` picks the class from the file content, and ``write_tokenizer_bin``
exports a ``.model`` file to ``tokenizer.bin``.

Layout of ``tokenizer.bin`` (little-endian): i32 max_token_length, then for each piece an
f32 score, an i32 byte length and the piece's UTF-8 bytes. The file does not store the
number of pieces. Ids 0, 1 and 2 are <unk>, BOS and EOS. Byte-fallback pieces ``<0x00>`` to
``<0xFF>`` sit at ids 3 to 258. The whitespace marker ``▁`` (U+2581) is stored as a plain
space, and BOS and EOS are stored as "\\n<s>\\n" and "\\n</s>\\n".
"""

from __future__ import annotations

import abc
import codecs
import heapq
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import sentencepiece

__all__ = [
    "BaseTokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "write_tokenizer_bin",
]

PathLike = Union[str, "os.PathLike[str]"]
TextInput = Union[str, bytes, bytearray, memoryview]

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_PIECES_START = 3
WHITESPACE_MARKER = "\u2581"
# sentencepiece decodes the unknown piece to this surface (TrainerSpec.unk_surface default).
UNK_SURFACE = " \u2047 "

# Piece kinds, as sentencepiece's ModelProto.SentencePiece.Type groups them for decoding.
_NORMAL = 0
_UNKNOWN = 1
_CONTROL = 2
_BYTE = 3

# Only chunks of at most this many characters are cached, because longer ones rarely repeat.
_CACHE_MAX_CHUNK_CHARS = 64
_CACHE_MAX_ENTRIES = 1 << 16


class TokenizerError(ValueError):
    """Invalid, truncated or mismatched tokenizer file."""


# --- UTF-8 handling --------------------------------------------------------------------------

_REPLACE_EACH_BYTE = "llama2rnn.tokenizer.replace_each_byte"


def _replace_each_byte(error: UnicodeError) -> tuple[str, int]:
    # Python's decoder reports a maximal invalid subsequence as one error (for example
    # b"\xe2\x82" before an ASCII byte), but sentencepiece replaces each of its bytes.
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error(_REPLACE_EACH_BYTE, _replace_each_byte)


def _decode_utf8(data: bytes) -> str:
    """Decode UTF-8 like sentencepiece: each byte that is not part of a valid character
    becomes one U+FFFD."""
    return data.decode("utf-8", _REPLACE_EACH_BYTE)


def _normalize_input(text: TextInput) -> str:
    """Return the input as str, with invalid UTF-8 bytes replaced as sentencepiece does."""
    if isinstance(text, str):
        if not text.isascii():
            # Raises UnicodeEncodeError on lone surrogates, which sentencepiece also rejects.
            text.encode("utf-8")
        return text
    if isinstance(text, (bytes, bytearray, memoryview)):
        return _decode_utf8(bytes(text))
    raise TypeError(f"text must be str or bytes, not {type(text).__name__}")


# --- Decoding --------------------------------------------------------------------------------


@dataclass
class _PieceTable:
    """Per-id decoding data: kind, surface text and byte value."""

    kinds: list[int]
    # Surface of normal pieces (spaces, not U+2581) and of the unknown piece, "" for the others.
    texts: list[str]
    # Byte value of byte-fallback pieces, -1 for the others.
    byte_values: list[int]

    def check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self.kinds):
            raise IndexError(f"token id {token_id} is out of range [0, {len(self.kinds)})")


def _decode_ids(table: _PieceTable, ids: Iterable[int]) -> str:
    """Decode ids with sentencepiece's rules (see ``StreamDecoder``)."""
    kinds, texts, byte_values = table.kinds, table.texts, table.byte_values
    parts: list[str] = []
    pending = bytearray()
    strip_space = True
    for token_id in ids:
        table.check_id(token_id)
        kind = kinds[token_id]
        if kind == _BYTE:
            pending.append(byte_values[token_id])
            strip_space = False
            continue
        if pending:
            parts.append(_decode_utf8(bytes(pending)))
            pending.clear()
        if kind == _CONTROL:
            continue
        text = texts[token_id]
        if strip_space and kind == _NORMAL and text.startswith(" "):
            text = text[1:]
        strip_space = False
        parts.append(text)
    if pending:
        parts.append(_decode_utf8(bytes(pending)))
    return "".join(parts)


class StreamDecoder:
    """Incremental decoder that turns token ids into text one id at a time.

    ``step(token_id)`` returns the text that becomes complete with this id, and ``finish()``
    returns what is still buffered. Joining every returned string gives ``decode(ids)``. The
    bytes of a character split over several byte pieces come out together, once the last
    one arrives. The rules are sentencepiece's decoding rules:

    - A byte-fallback piece ``<0xNN>`` adds one byte to a buffer. Complete characters leave
      the buffer at once, and the bytes of a sequence that can no longer become a valid
      character leave it as one U+FFFD per byte. An incomplete but still valid prefix of a
      character stays in the buffer.
    - Any other piece ends the run of byte pieces, so it first flushes the buffer, with one
      U+FFFD per byte of an incomplete character.
    - Control pieces (BOS, EOS) produce no text. The unknown piece produces " ⁇ ".
    - With ``strip_leading_space`` (the default), the first piece that is not a control piece
      loses one leading space if it is a normal piece. This removes the dummy prefix that
      encoding adds. Pass False to decode a continuation of earlier text.

    ``finish()`` flushes the buffer like a normal piece would and resets the decoder, so the
    next ``step`` starts a new text.
    """

    def __init__(self, tokenizer: BaseTokenizer, strip_leading_space: bool = True) -> None:
        self._table = tokenizer._table
        self._strip_leading_space = strip_leading_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(_REPLACE_EACH_BYTE)
        self._strip_space = strip_leading_space

    def step(self, token_id: int) -> str:
        """Decode one id and return the text it completes (possibly "")."""
        table = self._table
        table.check_id(token_id)
        kind = table.kinds[token_id]
        if kind == _BYTE:
            self._strip_space = False
            return self._utf8.decode(bytes((table.byte_values[token_id],)))
        flushed = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        if kind == _CONTROL:
            return flushed
        text = table.texts[token_id]
        if self._strip_space and kind == _NORMAL and text.startswith(" "):
            text = text[1:]
        self._strip_space = False
        return flushed + text

    def finish(self) -> str:
        """Return the buffered bytes, one U+FFFD per byte, and reset the decoder."""
        flushed = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._strip_space = self._strip_leading_space
        return flushed


# --- Common interface ------------------------------------------------------------------------


class BaseTokenizer(abc.ABC):
    """Interface shared by ``Tokenizer`` and ``SentencePieceTokenizer``."""

    _table: _PieceTable

    @abc.abstractmethod
    def encode(self, text: TextInput, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode text (str, or bytes taken as UTF-8) into token ids."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Decode a whole sequence of ids into text."""

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """Return the piece of an id as sentencepiece spells it (``▁`` for spaces)."""

    @abc.abstractmethod
    def piece_to_id(self, piece: str) -> int:
        """Return the id of a piece spelled as sentencepiece does, or ``unk_id`` if absent."""

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return len(self._table.kinds)

    @property
    def unk_id(self) -> int:
        """Id of the unknown piece."""
        return UNK_ID

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence piece."""
        return BOS_ID

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence piece."""
        return EOS_ID

    def decode_stream(self, strip_leading_space: bool = True) -> StreamDecoder:
        """Return a ``StreamDecoder`` that decodes one id at a time."""
        return StreamDecoder(self, strip_leading_space)


def _check_vocab_size(name: str, n_pieces: int, vocab_size: int | None) -> None:
    if vocab_size is None or n_pieces == vocab_size:
        return
    raise TokenizerError(
        f"tokenizer {name} has {n_pieces} pieces but the model's vocab_size is {vocab_size}: "
        "pass the tokenizer that was trained with this model"
    )


def _read_tokenizer_file(path: PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {os.fspath(path)}") from None
    except IsADirectoryError:
        raise TokenizerError(f"tokenizer path is a directory: {os.fspath(path)}") from None
    if not data:
        raise TokenizerError(f"tokenizer file {os.fspath(path)} is empty")
    return data


# --- tokenizer.bin ---------------------------------------------------------------------------


def _parse_tokenizer_bin(data: bytes, name: str) -> tuple[int, list[bytes], list[float]]:
    """Parse tokenizer.bin content into (max_token_length, pieces, scores)."""
    if len(data) < 4:
        raise TokenizerError(
            f"tokenizer file {name} is truncated: {len(data)} bytes, "
            "expected at least 4 for max_token_length"
        )
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    if max_token_length < 0:
        raise TokenizerError(
            f"tokenizer file {name} has max_token_length {max_token_length}, "
            "expected a byte count >= 0"
        )
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    size = len(data)
    while offset < size:
        index = len(pieces)
        if offset + 8 > size:
            raise TokenizerError(
                f"tokenizer file {name} is truncated in piece {index}: {size - offset} bytes "
                f"left at offset {offset}, expected 8 for its score and length"
            )
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or length > max_token_length:
            raise TokenizerError(
                f"piece {index} in tokenizer file {name} has length {length}, "
                f"expected 0 to max_token_length {max_token_length}"
            )
        if offset + length > size:
            raise TokenizerError(
                f"tokenizer file {name} is truncated in piece {index}: its length is {length} "
                f"but only {size - offset} bytes are left"
            )
        if math.isnan(score):
            raise TokenizerError(f"piece {index} in tokenizer file {name} has score NaN")
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    if len(pieces) < BYTE_PIECES_START:
        raise TokenizerError(
            f"tokenizer file {name} has {len(pieces)} pieces, "
            "expected at least 3 (<unk>, BOS and EOS)"
        )
    return max_token_length, pieces, scores


def _has_byte_pieces(pieces: Sequence[bytes]) -> bool:
    if len(pieces) < BYTE_PIECES_START + 256:
        return False
    return all(pieces[BYTE_PIECES_START + b] == b"<0x%02X>" % b for b in range(256))


class Tokenizer(BaseTokenizer):
    """BPE tokenizer over a llama2.c vocabulary, id-for-id compatible with sentencepiece.

    ``encode`` follows sentencepiece's BPE model. It adds a space as dummy prefix to
    non-empty text and treats ``▁`` in the text as a space. It starts from one symbol per
    code point, where each invalid byte of bytes input becomes U+FFFD. Then it repeatedly
    merges the adjacent pair whose concatenation is the normal piece with the highest
    score, taking the leftmost pair among equal scores. Symbols that are not pieces become
    their UTF-8 bytes as byte-fallback pieces. Without byte pieces in the vocabulary, each
    run of such symbols becomes one <unk>.
    Ids 0 to 2 and the byte pieces are never produced by merging, so text such as "<s>" or
    "<0x0A>" stays ordinary text.

    Speed, measured with CPython 3.11 on a 2-core x86 machine and the Llama 2 vocabulary:
    1 MB of chat text in about 0.5 s, 1 MB of one repeated character in about 2.5 s.

    NOTE: tokenizer.bin does not store piece types, so every piece except ids 0 to 2 and the
    byte pieces is taken as normal. A ``.model`` with user-defined, unused or extra control
    pieces encodes differently, which is why ``write_tokenizer_bin`` rejects such models.
    """

    def __init__(
        self,
        pieces: Sequence[bytes],
        scores: Sequence[float],
        max_token_length: int | None = None,
        name: str = "<memory>",
    ) -> None:
        """Build the tokenizer from piece bytes (spaces for ``▁``) and scores, indexed by id."""
        if len(pieces) != len(scores):
            raise ValueError(f"got {len(pieces)} pieces but {len(scores)} scores")
        if len(pieces) < BYTE_PIECES_START:
            raise TokenizerError(
                f"tokenizer {name} has {len(pieces)} pieces, expected at least 3 (<unk>, BOS, EOS)"
            )
        self.name = name
        self.max_token_length = (
            max(map(len, pieces)) if max_token_length is None else max_token_length
        )
        self.byte_fallback = _has_byte_pieces(pieces)
        self._pieces = [_decode_utf8(piece).replace(WHITESPACE_MARKER, " ") for piece in pieces]
        self._table = self._build_table(pieces)
        self._piece_ids, self._merge_ranks = self._build_merge_tables(pieces, scores)
        self._split_pattern = self._build_split_pattern(self._merge_ranks)
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_file(cls, path: PathLike, vocab_size: int | None = None) -> Tokenizer:
        """Read a tokenizer.bin file, which must have exactly ``vocab_size`` pieces if given."""
        name = os.fspath(path)
        data = _read_tokenizer_file(path)
        try:
            max_token_length, pieces, scores = _parse_tokenizer_bin(data, name)
        except TokenizerError as error:
            if data[:1] != b"\x0a":
                raise
            raise TokenizerError(
                f"{error} (if this is a sentencepiece .model file, "
                "read it with load_tokenizer or SentencePieceTokenizer)"
            ) from None
        _check_vocab_size(name, len(pieces), vocab_size)
        return cls(pieces, scores, max_token_length, name)

    def _build_table(self, pieces: Sequence[bytes]) -> _PieceTable:
        kinds = [_NORMAL] * len(pieces)
        texts = list(self._pieces)
        byte_values = [-1] * len(pieces)
        kinds[UNK_ID] = _UNKNOWN
        texts[UNK_ID] = UNK_SURFACE
        for token_id in (BOS_ID, EOS_ID):
            kinds[token_id] = _CONTROL
            texts[token_id] = ""
        if self.byte_fallback:
            for value in range(256):
                token_id = BYTE_PIECES_START + value
                kinds[token_id] = _BYTE
                texts[token_id] = ""
                byte_values[token_id] = value
        return _PieceTable(kinds, texts, byte_values)

    def _build_merge_tables(
        self, pieces: Sequence[bytes], scores: Sequence[float]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Return (normal piece -> id, multi-character normal piece -> merge rank).

        Rank 0 is the highest score, and equal scores share a rank. When two ids spell the
        same piece, the lower id wins.
        """
        piece_ids: dict[str, int] = {}
        for token_id, piece in enumerate(pieces):
            if self._table.kinds[token_id] != _NORMAL:
                continue
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                continue  # No text can produce it, because input text is valid UTF-8.
            piece_ids.setdefault(text.replace(WHITESPACE_MARKER, " "), token_id)
        mergeable = {
            text: scores[token_id] for text, token_id in piece_ids.items() if len(text) > 1
        }
        rank_of_score = {
            score: rank for rank, score in enumerate(sorted(set(mergeable.values()), reverse=True))
        }
        merge_ranks = {text: rank_of_score[score] for text, score in mergeable.items()}
        return piece_ids, merge_ranks

    @staticmethod
    def _build_split_pattern(merge_ranks: dict[str, int]) -> re.Pattern[str]:
        """Return a pattern of positions that no merge can cross.

        A merge across the boundary between characters a and b yields a piece that contains
        "ab". So if no mergeable piece contains a followed by a space, the text splits before
        every space that follows a, and BPE on each part gives the same symbols as on the
        whole. Splitting keeps the heap small and lets repeated words hit the cache.
        """
        before_space = {
            piece[i] for piece in merge_ranks for i in range(len(piece) - 1) if piece[i + 1] == " "
        }
        if not before_space:
            return re.compile(r"(?<=.)(?= )", re.DOTALL)
        excluded = "".join(re.escape(char) for char in sorted(before_space))
        return re.compile(f"(?<=[^{excluded}])(?= )", re.DOTALL)

    def encode(self, text: TextInput, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode text (str, or bytes taken as UTF-8) into ids, as sentencepiece does."""
        normalized = _normalize_input(text)
        ids = [BOS_ID] if bos else []
        if normalized:
            # Dummy prefix, and U+2581 is the same symbol as a space.
            normalized = " " + normalized.replace(WHITESPACE_MARKER, " ")
            for chunk in self._split_pattern.split(normalized):
                ids.extend(self._encode_chunk(chunk))
            if not self.byte_fallback:
                ids = _merge_unknown_runs(ids)
        if eos:
            ids.append(EOS_ID)
        return ids

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = self._symbols_to_ids(self._merge(chunk))
        if len(chunk) <= _CACHE_MAX_CHUNK_CHARS:
            if len(self._cache) >= _CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[chunk] = ids
        return ids

    def _merge(self, chunk: str) -> list[str]:
        """Apply BPE merges to one chunk and return the final symbols.

        A heap contains one key per candidate pair, rank * n + left index, so the smallest key
        is the highest score and then the leftmost pair. Symbols form a linked list through
        next_index and prev_index, and a merged-away symbol gets next_index -1. Keys stay in
        the heap when their pair changes. A popped key is applied only if the pair now at
        its left index still has that rank, and then it is the best pair, because every
        current pair has its own key in the heap.
        """
        n = len(chunk)
        ranks = self._merge_ranks
        heap = []
        for i in range(n - 1):
            rank = ranks.get(chunk[i : i + 2])
            if rank is not None:
                heap.append(rank * n + i)
        if not heap:
            return list(chunk)
        heapq.heapify(heap)
        symbols = list(chunk)
        next_index = list(range(1, n + 1))
        next_index[-1] = -1
        prev_index = list(range(-1, n - 1))
        heappop = heapq.heappop
        heappush = heapq.heappush
        while heap:
            rank, left = divmod(heappop(heap), n)
            right = next_index[left]
            if right < 0:
                continue
            merged = symbols[left] + symbols[right]
            if ranks.get(merged) != rank:
                continue
            symbols[left] = merged
            after = next_index[right]
            next_index[left] = after
            next_index[right] = -1
            if after >= 0:
                prev_index[after] = left
                new_rank = ranks.get(merged + symbols[after])
                if new_rank is not None:
                    heappush(heap, new_rank * n + left)
            before = prev_index[left]
            if before >= 0:
                new_rank = ranks.get(symbols[before] + merged)
                if new_rank is not None:
                    heappush(heap, new_rank * n + before)
        result = []
        index = 0
        while index >= 0:
            result.append(symbols[index])
            index = next_index[index]
        return result

    def _symbols_to_ids(self, symbols: list[str]) -> tuple[int, ...]:
        piece_ids = self._piece_ids
        ids: list[int] = []
        for symbol in symbols:
            token_id = piece_ids.get(symbol)
            if token_id is not None:
                ids.append(token_id)
            elif self.byte_fallback:
                # sentencepiece falls back to the bytes of the symbol with U+2581, not spaces.
                raw = symbol.replace(" ", WHITESPACE_MARKER).encode("utf-8")
                ids.extend(BYTE_PIECES_START + value for value in raw)
            else:
                ids.append(UNK_ID)
        return tuple(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids with the rules described in ``StreamDecoder``."""
        return _decode_ids(self._table, ids)

    def id_to_piece(self, token_id: int) -> str:
        self._table.check_id(token_id)
        if self._table.kinds[token_id] == _CONTROL:
            return self._pieces[token_id].strip()  # "\n<s>\n" is stored for "<s>".
        return self._pieces[token_id].replace(" ", WHITESPACE_MARKER)

    def piece_to_id(self, piece: str) -> int:
        if piece in ("<s>", self._pieces[BOS_ID]):
            return BOS_ID
        if piece in ("</s>", self._pieces[EOS_ID]):
            return EOS_ID
        if piece == self._pieces[UNK_ID]:
            return UNK_ID
        if self.byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            return BYTE_PIECES_START + int(piece[3:5], 16)
        return self._piece_ids.get(piece.replace(WHITESPACE_MARKER, " "), UNK_ID)


def _merge_unknown_runs(ids: list[int]) -> list[int]:
    """Collapse each run of <unk> ids into one, as sentencepiece does without byte fallback."""
    merged: list[int] = []
    for token_id in ids:
        if token_id == UNK_ID and merged and merged[-1] == UNK_ID:
            continue
        merged.append(token_id)
    return merged


# --- sentencepiece .model --------------------------------------------------------------------


def _import_sentencepiece() -> ModuleType:
    try:
        import sentencepiece
    except ImportError as error:
        raise ImportError(
            "reading a sentencepiece .model file needs the sentencepiece package: "
            "pip install sentencepiece"
        ) from error
    return sentencepiece


def _load_processor(data: bytes, name: str) -> sentencepiece.SentencePieceProcessor:
    spm = _import_sentencepiece()
    processor: sentencepiece.SentencePieceProcessor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as error:
        raise TokenizerError(f"{name} is not a valid sentencepiece model: {error}") from None
    return processor


class SentencePieceTokenizer(BaseTokenizer):
    """Tokenizer backed by the sentencepiece library and a ``.model`` file."""

    def __init__(
        self, processor: sentencepiece.SentencePieceProcessor, name: str = "<memory>"
    ) -> None:
        self.name = name
        self._processor = processor
        self._table = self._build_table(processor)

    @classmethod
    def from_file(cls, path: PathLike, vocab_size: int | None = None) -> SentencePieceTokenizer:
        """Load a ``.model`` file, which must have exactly ``vocab_size`` pieces if given."""
        name = os.fspath(path)
        processor = _load_processor(_read_tokenizer_file(path), name)
        _check_vocab_size(name, processor.vocab_size(), vocab_size)
        return cls(processor, name)

    @staticmethod
    def _build_table(processor: sentencepiece.SentencePieceProcessor) -> _PieceTable:
        size = processor.vocab_size()
        kinds = [_NORMAL] * size
        texts = [""] * size
        byte_values = [-1] * size
        for token_id in range(size):
            piece = processor.id_to_piece(token_id)
            if processor.is_byte(token_id):
                kinds[token_id] = _BYTE
                byte_values[token_id] = int(piece[3:5], 16)
            elif processor.is_control(token_id):
                kinds[token_id] = _CONTROL
            elif processor.is_unknown(token_id):
                kinds[token_id] = _UNKNOWN
                texts[token_id] = processor.decode([token_id])
            else:
                texts[token_id] = piece.replace(WHITESPACE_MARKER, " ")
        return _PieceTable(kinds, texts, byte_values)

    @property
    def processor(self) -> sentencepiece.SentencePieceProcessor:
        """The wrapped ``sentencepiece.SentencePieceProcessor``."""
        return self._processor

    @property
    def unk_id(self) -> int:
        return int(self._processor.unk_id())

    @property
    def bos_id(self) -> int:
        return int(self._processor.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._processor.eos_id())

    def encode(self, text: TextInput, bos: bool = True, eos: bool = False) -> list[int]:
        if isinstance(text, str):
            _normalize_input(text)  # UnicodeEncodeError on lone surrogates, as in Tokenizer.
        elif isinstance(text, (bytearray, memoryview)):
            text = bytes(text)
        return list(self._processor.encode(text, add_bos=bos, add_eos=eos))

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._processor.decode([int(token_id) for token_id in ids]))

    def id_to_piece(self, token_id: int) -> str:
        self._table.check_id(token_id)
        return str(self._processor.id_to_piece(token_id))

    def piece_to_id(self, piece: str) -> int:
        return int(self._processor.piece_to_id(piece))


# --- Export --------------------------------------------------------------------------------


def write_tokenizer_bin(model_path: PathLike, out_path: PathLike) -> None:
    """Export a sentencepiece ``.model`` to llama2.c ``tokenizer.bin``; see
    ``llama2rnn.tokenizer_export``, which also checks that the model can be exported."""
    from .tokenizer_export import write_tokenizer_bin as export

    export(model_path, out_path)


# --- Loading by content ----------------------------------------------------------------------


def load_tokenizer(path: PathLike, vocab_size: int | None = None) -> BaseTokenizer:
    """Load a sentencepiece ``.model`` or a llama2.c ``tokenizer.bin``, chosen by content.

    A ``.model`` file is a protobuf whose first byte is 0x0A (field 1, the pieces). A
    tokenizer.bin may start with that byte too (max_token_length 10, 266, ...), so a file
    that sentencepiece cannot load is then read as tokenizer.bin. With ``vocab_size``, the
    file must have exactly that many pieces.
    """
    name = os.fspath(path)
    data = _read_tokenizer_file(path)
    if data[:1] == b"\x0a":
        try:
            processor = _load_processor(data, name)
        except TokenizerError as model_error:
            try:
                max_token_length, pieces, scores = _parse_tokenizer_bin(data, name)
            except TokenizerError as bin_error:
                raise TokenizerError(
                    f"{name} is neither a sentencepiece model ({model_error}) "
                    f"nor a llama2.c tokenizer.bin ({bin_error})"
                ) from None
        else:
            _check_vocab_size(name, processor.vocab_size(), vocab_size)
            return SentencePieceTokenizer(processor, name)
    else:
        max_token_length, pieces, scores = _parse_tokenizer_bin(data, name)
    _check_vocab_size(name, len(pieces), vocab_size)
    return Tokenizer(pieces, scores, max_token_length, name)
