"""Tests for llama2rnn.tokenizer: id parity with sentencepiece, decoding, export and file errors.

The reference is the sentencepiece library itself: every encode result is compared with
``SentencePieceProcessor.encode`` on the .model file that the tokenizer.bin was exported from.
"""

from __future__ import annotations

import random
import shutil
import struct
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest

spm = pytest.importorskip("sentencepiece")

MEGABYTE = 1_000_000
# 12 to 20 times the measured 1.5 to 2.5 s for 1 MB of one character (2-core x86 machine),
# and far below what a quadratic merge loop needs.
MEGABYTE_SECONDS = 30.0

BOS_EOS_COMBINATIONS = [(True, False), (False, False), (True, True), (False, True)]

EDGE_CASES: dict[str, str | bytes] = {
    "empty": "",
    "one_space": " ",
    "leading_spaces": "   hello",
    "trailing_spaces": "hello   ",
    "several_spaces": "a  b   c    d",
    "only_spaces": " " * 17,
    "newline_only": "\n",
    "newlines": "\n\nhello\n\nworld\n",
    "crlf": "line one\r\nline two\r\n",
    "tabs": "\tindented\tand\t\ttabbed",
    "whitespace_marker": "\u2581hello\u2581 \u2581world\u2581",
    "emoji": "😀🎉👍🏽 family 👨‍👩‍👧‍👦",
    "four_byte_cjk": "𠀀𪚥 and 𝄞 music",
    "cjk": "今日はいい天気ですね。我今天很高兴。",
    "mixed_scripts": "Hello Привет γειά 你好 مرحبا नमस्ते 😀!",
    "accents": "naïve café jalapeño Ça",
    "byte_token_text": "<0x0A><0xFF> <0x00>",
    "control_text": "<s> hello </s> <unk>",
    "stored_bos_text": "\n<s>\n and \n</s>\n",
    "chat_template": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]",
    "digits": "Call 555-0199 at 10:30 or 3.14159e10",
    "replacement_char": "bad \ufffd char",
    "nul_and_controls": "a\x00b\x01c\x7f",
    "long_word": "supercalifragilisticexpialidocious" * 20,
    "unicode_spaces": "a\u00a0b\u3000c\u2009d",
    "bytes_stray_continuation": b"abc\x80\x80def\xbf",
    "bytes_invalid": b"\xff\xfe hello \xc0\xaf",
    "bytes_truncated_sequences": b"\xe2\x82 euro \xf0\x9f\x98",
    "bytes_surrogate": b"\xed\xa0\x80 x",
    "bytes_overlong": b"\xc0\x80\xe0\x80\x80",
    "bytes_valid": "héllo wörld 😀".encode(),
    "bytes_empty": b"",
}
TEXT_EDGE_CASES = {
    name: text
    for name, text in EDGE_CASES.items()
    if isinstance(text, str) and "\u2581" not in text and "\ufffd" not in text
}

# Characters for random strings: spaces and ASCII dominate, as in real text.
RANDOM_CHARS = (
    list(" " * 8 + "\n\t\r")
    + list("abcdefghijklmnopqrstuvwxyz" * 2)
    + list("ABCXYZ0123456789.,!?'<>/[]_-")
    + list("éüñçßøΩπЖжд")
    + list("日本語中文한국어")
    + ["😀", "👍", "🏽", "\u200d", "\u2581", "\ufffd", "\x00", "\U0010ffff"]
)
# Byte fragments for random bytes input: valid characters, lone lead and continuation
# bytes, and bytes that never occur in UTF-8.
RANDOM_BYTE_FRAGMENTS = (
    [bytes([b]) for b in b"ab z \n"]
    + [char.encode() for char in "é日😀\u2581"]
    + [b"\x80", b"\xbf", b"\xc3", b"\xe2", b"\xe2\x82", b"\xf0\x9f", b"\xf0\x9f\x98"]
    + [b"\xc0", b"\xc1", b"\xf5", b"\xfe", b"\xff", b"\xed\xa0\x80", b"\xe0\x80"]
)


class Vocab(NamedTuple):
    """One vocabulary as a sentencepiece reference and as both tokenizer classes."""

    name: str
    processor: Any
    bin_tokenizer: Any
    model_tokenizer: Any
    model_path: Path
    bin_path: Path


@pytest.fixture(scope="module")
def tk(tokenizer_module: ModuleType) -> ModuleType:
    return tokenizer_module


def make_vocab(tk: ModuleType, name: str, model_path: Path, bin_path: Path) -> Vocab:
    return Vocab(
        name,
        spm.SentencePieceProcessor(model_file=str(model_path)),
        tk.Tokenizer.from_file(bin_path),
        tk.SentencePieceTokenizer.from_file(model_path),
        model_path,
        bin_path,
    )


@pytest.fixture(scope="module")
def chitchat_vocab(tk: ModuleType, chitchat_tokenizer: Any) -> Vocab:
    return make_vocab(tk, "chitchat", chitchat_tokenizer.model_path, chitchat_tokenizer.bin_path)


@pytest.fixture(scope="module")
def llama2_vocab(tk: ModuleType, llama2_tokenizer_dir: Path) -> Vocab:
    return make_vocab(
        tk,
        "llama2",
        llama2_tokenizer_dir / "tokenizer.model",
        llama2_tokenizer_dir / "tokenizer.bin",
    )


@pytest.fixture(scope="module", params=["chitchat", "llama2"])
def vocab(request: pytest.FixtureRequest) -> Vocab:
    """Each vocabulary in turn: the trained chitchat one, then Llama 2 where available."""
    return request.getfixturevalue(f"{request.param}_vocab")


def stream_decode(tokenizer: Any, ids: list[int], strip_leading_space: bool = True) -> list[str]:
    decoder = tokenizer.decode_stream(strip_leading_space)
    return [decoder.step(token_id) for token_id in ids] + [decoder.finish()]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(RANDOM_CHARS) for _ in range(rng.randrange(0, 40)))


def random_bytes(rng: random.Random) -> bytes:
    return b"".join(rng.choice(RANDOM_BYTE_FRAGMENTS) for _ in range(rng.randrange(0, 20)))


# --- Vocabulary and export -------------------------------------------------------------------


def test_pieces_match_model(vocab: Vocab) -> None:
    processor = vocab.processor
    for tokenizer in (vocab.bin_tokenizer, vocab.model_tokenizer):
        assert tokenizer.vocab_size == processor.vocab_size()
        assert tokenizer.unk_id == processor.unk_id()
        assert tokenizer.bos_id == processor.bos_id()
        assert tokenizer.eos_id == processor.eos_id()
    for token_id in range(processor.vocab_size()):
        piece = processor.id_to_piece(token_id)
        assert vocab.bin_tokenizer.id_to_piece(token_id) == piece
        assert vocab.bin_tokenizer.piece_to_id(piece) == token_id
        assert vocab.model_tokenizer.piece_to_id(piece) == token_id
    assert vocab.bin_tokenizer.piece_to_id("no such piece") == processor.unk_id()


def test_bin_has_byte_fallback(vocab: Vocab) -> None:
    assert vocab.bin_tokenizer.byte_fallback


def test_export_matches_llama2_bin(
    tk: ModuleType, llama2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tokenizer.bin"
    tk.write_tokenizer_bin(llama2_tokenizer_dir / "tokenizer.model", out)
    assert out.read_bytes() == (llama2_tokenizer_dir / "tokenizer.bin").read_bytes()


def test_export_layout(chitchat_vocab: Vocab) -> None:
    data = chitchat_vocab.bin_path.read_bytes()
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    pieces = []
    offset = 4
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        pieces.append((score, data[offset : offset + length]))
        offset += length
    processor = chitchat_vocab.processor
    assert len(pieces) == processor.vocab_size()
    assert max_token_length == max(len(piece) for _, piece in pieces)
    assert pieces[0][1] == b"<unk>"
    assert pieces[1][1] == b"\n<s>\n"
    assert pieces[2][1] == b"\n</s>\n"
    assert pieces[3][1] == b"<0x00>"
    assert pieces[258][1] == b"<0xFF>"
    for token_id in range(259, len(pieces)):
        expected = processor.id_to_piece(token_id).replace("\u2581", " ").encode()
        assert pieces[token_id] == (processor.get_score(token_id), expected)


@pytest.mark.parametrize(
    ("trainer_options", "message"),
    [
        ({"model_type": "unigram"}, "model_type is unigram"),
        ({"model_type": "bpe", "normalization_rule_name": "nmt_nfkc"}, "'nmt_nfkc' rewrites"),
        ({"model_type": "bpe", "remove_extra_whitespaces": True}, "remove_extra_whitespaces"),
        ({"model_type": "bpe", "user_defined_symbols": ["<tool>"]}, "user-defined"),
    ],
    ids=["unigram", "nfkc", "remove_whitespace", "user_defined"],
)
def test_export_rejects_incompatible_model(
    tk: ModuleType,
    chitchat_messages: list[str],
    tmp_path: Path,
    trainer_options: dict[str, Any],
    message: str,
) -> None:
    options = {
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "byte_fallback": True,
        **trainer_options,
    }
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chitchat_messages[:3000]),
        model_prefix=str(tmp_path / "other"),
        vocab_size=400,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    with pytest.raises(tk.TokenizerError, match=message):
        tk.write_tokenizer_bin(tmp_path / "other.model", tmp_path / "other.bin")
    assert not (tmp_path / "other.bin").exists()


# --- Encoding parity -------------------------------------------------------------------------


@pytest.mark.parametrize(("bos", "eos"), BOS_EOS_COMBINATIONS)
def test_lines_parity(vocab: Vocab, chitchat_lines: list[str], bos: bool, eos: bool) -> None:
    mismatches = []
    for line in chitchat_lines:
        expected = vocab.processor.encode(line, add_bos=bos, add_eos=eos)
        if vocab.bin_tokenizer.encode(line, bos=bos, eos=eos) != expected:
            mismatches.append(("bin", line))
        if vocab.model_tokenizer.encode(line, bos=bos, eos=eos) != expected:
            mismatches.append(("model", line))
    assert mismatches == []


@pytest.mark.parametrize("text", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
@pytest.mark.parametrize(("bos", "eos"), [(True, False), (False, True)])
def test_edge_case_parity(vocab: Vocab, text: str | bytes, bos: bool, eos: bool) -> None:
    expected = vocab.processor.encode(text, add_bos=bos, add_eos=eos)
    assert vocab.bin_tokenizer.encode(text, bos=bos, eos=eos) == expected
    assert vocab.model_tokenizer.encode(text, bos=bos, eos=eos) == expected


def test_random_text_parity(vocab: Vocab) -> None:
    rng = random.Random(20240601)
    for _ in range(1500):
        text = random_text(rng)
        expected = vocab.processor.encode(text)
        assert vocab.bin_tokenizer.encode(text, bos=False) == expected, repr(text)


def test_random_bytes_parity(vocab: Vocab) -> None:
    rng = random.Random(7)
    for _ in range(1500):
        data = random_bytes(rng)
        expected = vocab.processor.encode(data)
        assert vocab.bin_tokenizer.encode(data, bos=False) == expected, repr(data)
        assert vocab.model_tokenizer.encode(data, bos=False) == expected, repr(data)


def test_invalid_bytes_become_replacement_chars(chitchat_vocab: Vocab) -> None:
    tokenizer = chitchat_vocab.bin_tokenizer
    # Each byte outside a valid character is one U+FFFD, even inside a truncated sequence.
    assert tokenizer.encode(b"\xe2\x82", bos=False) == tokenizer.encode("\ufffd\ufffd", bos=False)
    assert tokenizer.encode(b"\xf0\x9f\x98 a", bos=False) == tokenizer.encode(
        "\ufffd\ufffd\ufffd a", bos=False
    )
    assert tokenizer.encode(b"\xff\x80", bos=False) == tokenizer.encode("\ufffd\ufffd", bos=False)


def test_control_text_not_merged(vocab: Vocab) -> None:
    tokenizer = vocab.bin_tokenizer
    for text in ("<s>", "</s>", "<unk>", "<0x0A>", "\n<s>\n", "a<0xFF>b"):
        ids = tokenizer.encode(text, bos=False)
        assert tokenizer.bos_id not in ids
        assert tokenizer.eos_id not in ids
        assert tokenizer.unk_id not in ids
        assert tokenizer.decode(ids) == text
        # Byte pieces appear only for the bytes of characters outside the vocabulary.
        fallback_bytes = sum(
            len(char.encode()) for char in text if tokenizer.piece_to_id(char) == tokenizer.unk_id
        )
        assert sum(3 <= token_id < 259 for token_id in ids) == fallback_bytes


def test_merges_across_spaces_parity(
    tk: ModuleType, chitchat_messages: list[str], chitchat_lines: list[str], tmp_path: Path
) -> None:
    # Without split_by_whitespace, pieces such as "e▁t" exist, so the encoder must not split
    # the text before those spaces.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chitchat_messages[:20000]),
        model_prefix=str(tmp_path / "across"),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_whitespace=False,
        num_threads=1,
        minloglevel=2,
    )
    tk.write_tokenizer_bin(tmp_path / "across.model", tmp_path / "across.bin")
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "across.model"))
    tokenizer = tk.Tokenizer.from_file(tmp_path / "across.bin")
    inner_space_pieces = [
        piece
        for piece in map(processor.id_to_piece, range(processor.vocab_size()))
        if "\u2581" in piece[1:].strip("\u2581")
    ]
    assert inner_space_pieces, "training produced no piece with an inner space"
    for line in chitchat_lines[:1500]:
        assert tokenizer.encode(line) == processor.encode(line, add_bos=True), repr(line)


def test_no_byte_fallback_parity(
    tk: ModuleType, chitchat_tokenizer_without_byte_fallback: Any, chitchat_lines: list[str]
) -> None:
    paths = chitchat_tokenizer_without_byte_fallback
    processor = spm.SentencePieceProcessor(model_file=str(paths.model_path))
    tokenizer = tk.Tokenizer.from_file(paths.bin_path)
    assert not tokenizer.byte_fallback
    texts = chitchat_lines[:1000] + list(EDGE_CASES.values())
    for text in texts:
        assert tokenizer.encode(text) == processor.encode(text, add_bos=True), repr(text)
        ids = tokenizer.encode(text, bos=False)
        assert tokenizer.decode(ids) == processor.decode(ids), repr(text)


def test_unknown_runs_merge_without_byte_fallback(
    tk: ModuleType, chitchat_tokenizer_without_byte_fallback: Any
) -> None:
    tokenizer = tk.Tokenizer.from_file(chitchat_tokenizer_without_byte_fallback.bin_path)
    ids = tokenizer.encode("日本語", bos=False)
    assert ids.count(tokenizer.unk_id) == 1


# --- Speed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["a", " "], ids=["letter", "space"])
def test_megabyte_of_one_char(vocab: Vocab, char: str) -> None:
    tokenizer = vocab.bin_tokenizer
    text = char * MEGABYTE
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    elapsed = time.perf_counter() - start
    assert ids == vocab.processor.encode(text, add_bos=True)
    assert elapsed < MEGABYTE_SECONDS


def test_megabyte_of_real_text(vocab: Vocab, chitchat_messages: list[str]) -> None:
    text = "\n".join(chitchat_messages)[:MEGABYTE]
    tokenizer = type(vocab.bin_tokenizer).from_file(vocab.bin_path)  # Starts with an empty cache.
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    elapsed = time.perf_counter() - start
    assert ids == vocab.processor.encode(text, add_bos=True)
    assert elapsed < MEGABYTE_SECONDS
    assert tokenizer.decode(ids) == text


# --- Decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", list(TEXT_EDGE_CASES.values()), ids=list(TEXT_EDGE_CASES))
def test_edge_case_round_trip(vocab: Vocab, text: str) -> None:
    for tokenizer in (vocab.bin_tokenizer, vocab.model_tokenizer):
        ids = tokenizer.encode(text, bos=True, eos=True)
        assert tokenizer.decode(ids) == text
        assert "".join(stream_decode(tokenizer, ids)) == text


def test_lines_round_trip(vocab: Vocab, chitchat_lines: list[str]) -> None:
    tokenizer = vocab.bin_tokenizer
    for line in chitchat_lines:
        ids = tokenizer.encode(line)
        assert tokenizer.decode(ids) == line
        assert "".join(stream_decode(tokenizer, ids)) == line


def test_random_text_round_trip(vocab: Vocab) -> None:
    rng = random.Random(99)
    for _ in range(1000):
        text = random_text(rng)
        for tokenizer in (vocab.bin_tokenizer, vocab.model_tokenizer):
            ids = tokenizer.encode(text)
            chunks = stream_decode(tokenizer, ids)
            # "▁" is a space to sentencepiece, so it decodes as one.
            assert tokenizer.decode(ids) == text.replace("\u2581", " "), repr(text)
            assert "".join(chunks) == text.replace("\u2581", " "), repr(text)
            if "\ufffd" not in text:
                assert not any("\ufffd" in chunk for chunk in chunks), repr(text)


def test_stream_waits_for_whole_character(chitchat_vocab: Vocab) -> None:
    tokenizer = chitchat_vocab.bin_tokenizer
    ids = tokenizer.encode("😀", bos=False)
    emoji_bytes = [3 + byte for byte in "😀".encode()]
    assert ids[-4:] == emoji_bytes  # The chitchat vocabulary has no piece for it.
    decoder = tokenizer.decode_stream()
    assert [decoder.step(token_id) for token_id in emoji_bytes] == ["", "", "", "😀"]
    assert decoder.finish() == ""


def test_stream_flushes_invalid_bytes(vocab: Vocab) -> None:
    tokenizer = vocab.bin_tokenizer
    word = tokenizer.piece_to_id("\u2581a")
    byte = {value: 3 + value for value in range(256)}
    cases = [
        # Truncated sequence, then a normal piece: one U+FFFD per buffered byte. The byte
        # pieces come first, so the piece keeps its leading space.
        ([byte[0xE2], byte[0x82], word], ["", "", "\ufffd\ufffd a"]),
        # A control piece ends the byte run, so the euro sign's bytes are decoded apart.
        ([byte[0xE2], 1, byte[0x82], byte[0xAC]], ["", "\ufffd", "\ufffd", "\ufffd"]),
        # A continuation byte with no lead byte is invalid at once.
        ([byte[0x80], byte[0x41]], ["\ufffd", "A"]),
        # An invalid byte inside a sequence ends it.
        ([byte[0xF0], byte[0x9F], byte[0x41]], ["", "", "\ufffd\ufffdA"]),
    ]
    for ids, expected_steps in cases:
        decoder = tokenizer.decode_stream()
        assert [decoder.step(token_id) for token_id in ids] == expected_steps
        assert decoder.finish() == ""
        assert "".join(expected_steps) == vocab.processor.decode(ids)
        assert tokenizer.decode(ids) == vocab.processor.decode(ids)


def test_stream_finish_flushes_and_resets(chitchat_vocab: Vocab) -> None:
    tokenizer = chitchat_vocab.bin_tokenizer
    hello = tokenizer.encode("hello", bos=False)
    decoder = tokenizer.decode_stream()
    assert decoder.step(3 + 0xE2) == ""
    assert decoder.finish() == "\ufffd"
    assert decoder.finish() == ""
    # After finish, the next piece is the start of a new text and loses its dummy prefix.
    assert "".join(decoder.step(token_id) for token_id in hello) == "hello"


def test_stream_keeps_leading_space_on_request(chitchat_vocab: Vocab) -> None:
    tokenizer = chitchat_vocab.bin_tokenizer
    ids = tokenizer.encode("hello world", bos=False)
    assert "".join(stream_decode(tokenizer, ids, strip_leading_space=False)) == " hello world"
    assert "".join(stream_decode(tokenizer, ids)) == "hello world"


def test_random_ids_decode_parity(vocab: Vocab) -> None:
    rng = random.Random(3)
    size = vocab.processor.vocab_size()
    utf8_bytes = [0x41, 0x80, 0x9F, 0xBF, 0xC3, 0xE2, 0xED, 0xF0, 0xF4, 0xFF]
    for _ in range(1000):
        ids = []
        for _ in range(rng.randrange(0, 16)):
            kind = rng.random()
            if kind < 0.15:
                ids.append(rng.choice([0, 1, 2]))
            elif kind < 0.6:
                ids.append(3 + rng.choice(utf8_bytes))
            else:
                ids.append(rng.randrange(259, size))
        expected = vocab.processor.decode(ids)
        for tokenizer in (vocab.bin_tokenizer, vocab.model_tokenizer):
            assert tokenizer.decode(ids) == expected, ids
            assert "".join(stream_decode(tokenizer, ids)) == expected, ids


def test_special_ids_decode(vocab: Vocab) -> None:
    for tokenizer in (vocab.bin_tokenizer, vocab.model_tokenizer):
        assert tokenizer.decode([tokenizer.bos_id, tokenizer.eos_id]) == ""
        assert tokenizer.decode([tokenizer.unk_id]) == " \u2047 "
        assert tokenizer.decode([]) == ""


@pytest.mark.parametrize("bad_id", [-1, 10**6])
def test_decode_rejects_out_of_range_id(vocab: Vocab, bad_id: int) -> None:
    for tokenizer in (vocab.bin_tokenizer, vocab.model_tokenizer):
        with pytest.raises(IndexError):
            tokenizer.decode([1, bad_id])
        with pytest.raises(IndexError):
            tokenizer.decode_stream().step(bad_id)


# --- Input types -----------------------------------------------------------------------------


def test_encode_accepts_bytes_like(chitchat_vocab: Vocab) -> None:
    text = "héllo wörld"
    for tokenizer in (chitchat_vocab.bin_tokenizer, chitchat_vocab.model_tokenizer):
        expected = tokenizer.encode(text)
        assert tokenizer.encode(text.encode()) == expected
        assert tokenizer.encode(bytearray(text.encode())) == expected
        assert tokenizer.encode(memoryview(text.encode())) == expected


def test_encode_rejects_lone_surrogate(chitchat_vocab: Vocab) -> None:
    for tokenizer in (chitchat_vocab.bin_tokenizer, chitchat_vocab.model_tokenizer):
        with pytest.raises(UnicodeEncodeError):
            tokenizer.encode("a\ud800b")


def test_encode_rejects_other_types(chitchat_vocab: Vocab) -> None:
    with pytest.raises(TypeError, match="str or bytes"):
        chitchat_vocab.bin_tokenizer.encode(42)


# --- Loading and bad files -------------------------------------------------------------------


def write_bin(path: Path, max_token_length: int, pieces: list[tuple[float, bytes]]) -> Path:
    data = struct.pack("<i", max_token_length)
    for score, piece in pieces:
        data += struct.pack("<fi", score, len(piece)) + piece
    path.write_bytes(data)
    return path


SMALL_PIECES = [
    (0.0, b"<unk>"),
    (0.0, b"\n<s>\n"),
    (0.0, b"\n</s>\n"),
    (-1.0, b" a"),
    (-2.0, b"ab"),
    (-3.0, b" "),
    (-4.0, b"a"),
    (-5.0, b"b"),
]


def test_load_picks_class_by_content(tk: ModuleType, chitchat_vocab: Vocab, tmp_path: Path) -> None:
    # File names that lie about the format.
    model_copy = shutil.copy(chitchat_vocab.model_path, tmp_path / "model.bin")
    bin_copy = shutil.copy(chitchat_vocab.bin_path, tmp_path / "tokenizer.model")
    assert isinstance(tk.load_tokenizer(model_copy), tk.SentencePieceTokenizer)
    assert isinstance(tk.load_tokenizer(bin_copy), tk.Tokenizer)
    assert isinstance(tk.load_tokenizer(bin_copy, vocab_size=2000), tk.Tokenizer)


def test_load_bin_starting_like_protobuf(tk: ModuleType, tmp_path: Path) -> None:
    # max_token_length 10 makes the first byte 0x0A, the first byte of a .model file.
    path = write_bin(tmp_path / "small.bin", 10, SMALL_PIECES)
    tokenizer = tk.load_tokenizer(path)
    assert isinstance(tokenizer, tk.Tokenizer)
    assert tokenizer.max_token_length == 10
    assert not tokenizer.byte_fallback
    assert tokenizer.encode("ab ba") == [1, 3, 7, 5, 7, 6]
    assert tokenizer.decode([1, 3, 7, 5, 7, 6]) == "ab ba"


def test_small_vocab_merges(tk: ModuleType, tmp_path: Path) -> None:
    tokenizer = tk.Tokenizer.from_file(write_bin(tmp_path / "small.bin", 6, SMALL_PIECES))
    # " a" outscores "ab", so "ab" becomes " a" + "b". The vocabulary has no "c" and no byte
    # pieces, so each run of "c" becomes one <unk>.
    assert tokenizer.encode("ab", bos=False) == [3, 7]
    assert tokenizer.encode("abcc", bos=False, eos=True) == [3, 7, 0, 2]


def synthetic_bin(path: Path, normal_pieces: list[str]) -> Path:
    """Write a vocabulary with byte pieces whose normal pieces score by list order."""
    pieces = [(0.0, b"<unk>"), (0.0, b"<s>"), (0.0, b"</s>")]
    pieces += [(0.0, b"<0x%02X>" % value) for value in range(256)]
    pieces += [(-float(rank), piece.encode()) for rank, piece in enumerate(normal_pieces)]
    return write_bin(path, max(len(piece) for _, piece in pieces), pieces)


def test_reserved_pieces_are_not_merge_targets(tk: ModuleType, tmp_path: Path) -> None:
    # Every prefix needed to merge up to "<s>", "</s>", "<unk>" and "<0x0A>" is a normal
    # piece, but sentencepiece never merges into control, unknown or byte pieces.
    normal = ["<s", "</", "</s", "<u", "<un", "<unk", "<0", "<0x", "<0x0", "A>"]
    normal += ["\u2581", "<", ">", "/", "s", "u", "n", "k", "0", "x", "A"]
    tokenizer = tk.Tokenizer.from_file(synthetic_bin(tmp_path / "reserved.bin", normal))
    assert tokenizer.byte_fallback
    cases = {
        "<s>": ["<s", ">"],
        "</s>": ["</s", ">"],
        "<unk>": ["<unk", ">"],
        "<0x0A>": ["<0x0", "A>"],
    }
    for text, pieces in cases.items():
        ids = tokenizer.encode(text, bos=False)
        assert ids == [tokenizer.piece_to_id(piece) for piece in ["\u2581"] + pieces], text
        assert tokenizer.decode(ids) == text


def test_space_fallback_uses_whitespace_marker_bytes(tk: ModuleType, tmp_path: Path) -> None:
    # Without a "▁" piece, a space falls back to the bytes of U+2581, as in sentencepiece.
    tokenizer = tk.Tokenizer.from_file(synthetic_bin(tmp_path / "no_space.bin", ["a", "b"]))
    marker_bytes = [3 + value for value in "\u2581".encode()]
    assert tokenizer.encode("a b", bos=False) == marker_bytes + [259] + marker_bytes + [260]


@pytest.mark.parametrize("loader", ["Tokenizer", "SentencePieceTokenizer", "load_tokenizer"])
def test_missing_file(tk: ModuleType, tmp_path: Path, loader: str) -> None:
    path = tmp_path / "missing.bin"
    load = getattr(tk, loader)
    load = getattr(load, "from_file", load)
    with pytest.raises(tk.TokenizerError, match=f"not found: {path}"):
        load(path)


def test_directory_path(tk: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(tk.TokenizerError, match="is a directory"):
        tk.load_tokenizer(tmp_path)


def test_empty_file(tk: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(tk.TokenizerError, match=f"{path} is empty"):
        tk.load_tokenizer(path)
    with pytest.raises(tk.TokenizerError, match="is empty"):
        tk.Tokenizer.from_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x1b\x00", "truncated: 2 bytes"),
        (struct.pack("<i", -5), "max_token_length -5"),
        (struct.pack("<ifi", 8, 0.0, -3) + b"abc", "piece 0 .* has length -3"),
        (struct.pack("<ifi", 2, 0.0, 5) + b"abcde", "piece 0 .* has length 5, expected 0 to .* 2"),
        (struct.pack("<ifi", 8, 0.0, 5) + b"ab", "truncated in piece 0: its length is 5"),
        (struct.pack("<ifi", 8, 0.0, 1) + b"a" + b"\x00\x00", "truncated in piece 1"),
        (struct.pack("<ifi", 8, float("nan"), 1) + b"a", "score NaN"),
        (struct.pack("<ifi", 8, 0.0, 1) + b"a", "has 1 pieces, expected at least 3"),
    ],
    ids=[
        "short_header",
        "negative_max_length",
        "negative_piece_length",
        "piece_too_long",
        "truncated_piece_bytes",
        "truncated_piece_header",
        "nan_score",
        "too_few_pieces",
    ],
)
def test_bad_bin(tk: ModuleType, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(tk.TokenizerError, match=message):
        tk.Tokenizer.from_file(path)
    with pytest.raises(tk.TokenizerError, match=message):
        tk.load_tokenizer(path)


def test_truncated_real_bin(tk: ModuleType, chitchat_vocab: Vocab, tmp_path: Path) -> None:
    path = tmp_path / "truncated.bin"
    path.write_bytes(chitchat_vocab.bin_path.read_bytes()[:-3])
    with pytest.raises(tk.TokenizerError, match="truncated in piece 1999"):
        tk.load_tokenizer(path)


def test_corrupt_model(tk: ModuleType, chitchat_vocab: Vocab, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.model"
    path.write_bytes(chitchat_vocab.model_path.read_bytes()[:5000])
    with pytest.raises(tk.TokenizerError, match="neither a sentencepiece model .* nor a llama2.c"):
        tk.load_tokenizer(path)
    with pytest.raises(tk.TokenizerError, match="not a valid sentencepiece model"):
        tk.SentencePieceTokenizer.from_file(path)


def test_wrong_vocab_size(tk: ModuleType, chitchat_vocab: Vocab) -> None:
    for path in (chitchat_vocab.bin_path, chitchat_vocab.model_path):
        message = (
            f"tokenizer {path} has 2000 pieces but the model's vocab_size is 32000: "
            "pass the tokenizer that was trained with this model"
        )
        with pytest.raises(tk.TokenizerError) as raised:
            tk.load_tokenizer(path, vocab_size=32000)
        assert str(raised.value) == message
    with pytest.raises(tk.TokenizerError, match="has 2000 pieces"):
        tk.Tokenizer.from_file(chitchat_vocab.bin_path, vocab_size=1999)
    with pytest.raises(tk.TokenizerError, match="has 2000 pieces"):
        tk.SentencePieceTokenizer.from_file(chitchat_vocab.model_path, vocab_size=2001)


def test_tokenizer_error_is_value_error(tk: ModuleType) -> None:
    assert issubclass(tk.TokenizerError, ValueError)
