"""Chat data preparation: render, split, train the tokenizer, tokenize to memmaps.

Source: the ``chitchat-dataset`` package (MIT license), a dict from conversation id
to ``{"messages": [[{"text", "timestamp", "sender"}, ...], ...], ...}``.

Layout of a prepared data directory:

- ``tokenizer.model`` / ``tokenizer.vocab``: the sentencepiece BPE model.
- ``tokenizer.bin``: the same tokenizer in llama2.c format (written when
  ``llama2rnn.tokenizer`` is importable).
- ``train.bin`` / ``val.bin``: token ids as raw little-endian uint16, one stream per
  split with the split's conversations concatenated in dataset order.
- ``train_index.npy`` / ``val_index.npy``: int64 offsets of conversation starts into
  the stream, plus a final entry equal to the stream length, so conversation ``i``
  is ``tokens[index[i]:index[i + 1]]``.
- ``meta.json``: vocabulary size, split parameters, conversation ids per split
  (in stream order) and token counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

B_INST = "[INST]"
E_INST = "[/INST]"
BOS_ID = 1
EOS_ID = 2
DATA_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Exchange:
    """One user turn and the assistant's reply (``None`` for a trailing user turn)."""

    user: str
    assistant: Optional[str]


# ----------------------------------------------------------------------------
# Rendering


def conversation_turns(conversation: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Return (sender, text) turns: consecutive messages of one sender joined by newlines.

    Message texts are stripped and empty messages dropped.
    """
    turns: list[tuple[str, list[str]]] = []
    for group in conversation["messages"]:
        for message in group:
            text = message["text"].strip()
            if not text:
                continue
            sender = message["sender"]
            if turns and turns[-1][0] == sender:
                turns[-1][1].append(text)
            else:
                turns.append((sender, [text]))
    return [(sender, "\n".join(texts)) for sender, texts in turns]


def conversation_exchanges(conversation: Mapping[str, Any]) -> list[Exchange]:
    """Split a conversation into (user, assistant) exchanges, with the first speaker as the user."""
    turns = [text for _, text in conversation_turns(conversation)]
    exchanges = []
    for i in range(0, len(turns), 2):
        answer = turns[i + 1] if i + 1 < len(turns) else None
        exchanges.append(Exchange(turns[i], answer))
    return exchanges


def exchange_text(exchange: Exchange) -> str:
    """Render one exchange as the text between BOS and EOS in the Llama 2 chat template.

    A complete exchange is ``"[INST] {user} [/INST] {assistant} "``, encoded with BOS
    and EOS. A trailing user turn is ``"[INST] {user} [/INST]"`` with BOS only, which is
    also the prompt a chat front end sends to the model.
    """
    if exchange.assistant is None:
        return f"{B_INST} {exchange.user} {E_INST}"
    return f"{B_INST} {exchange.user} {E_INST} {exchange.assistant} "


def encode_conversation(sp: Any, conversation: Mapping[str, Any]) -> list[int]:
    """Encode a conversation with a sentencepiece processor, as Llama 2 chat does."""
    exchanges = conversation_exchanges(conversation)
    pieces = sp.encode([exchange_text(e) for e in exchanges], num_threads=1)
    tokens: list[int] = []
    for exchange, ids in zip(exchanges, pieces):
        tokens.append(BOS_ID)
        tokens.extend(ids)
        if exchange.assistant is not None:
            tokens.append(EOS_ID)
    return tokens


# ----------------------------------------------------------------------------
# Splits


def is_validation(conversation_id: str, val_fraction: float, seed: int) -> bool:
    """Assign a conversation to the validation split by a seeded hash of its id."""
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < val_fraction


def split_ids(
    conversation_ids: Iterable[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Return (train ids, validation ids), each in the input order."""
    train, val = [], []
    for cid in conversation_ids:
        (val if is_validation(cid, val_fraction, seed) else train).append(cid)
    return train, val


def load_chitchat() -> dict[str, Any]:
    """Load all conversations of the chitchat-dataset package."""
    import chitchat_dataset

    return dict(chitchat_dataset.Dataset())


# ----------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(
    sentences: Iterable[str],
    model_prefix: Path,
    vocab_size: int,
    seed: int,
) -> Path:
    """Train a sentencepiece BPE tokenizer and return the path of its ``.model`` file.

    The options follow the Llama 2 tokenizer: byte fallback, no normalization, no
    whitespace collapsing, a dummy prefix space and single-digit pieces.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        # Whole exchanges are the sentences, and the default limit (4192 bytes)
        # would silently drop the longest ones.
        max_sentence_length=1 << 20,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        unk_id=0,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def export_tokenizer_bin(model_path: Path, out_path: Path) -> bool:
    """Write ``tokenizer.bin`` with ``llama2rnn.tokenizer``, or return False when that module is missing."""
    try:
        from llama2rnn.tokenizer import write_tokenizer_bin
    except ImportError as exc:
        logger.warning(
            "not writing %s because llama2rnn.tokenizer failed to import (%s); "
            "the export command writes it later",
            out_path,
            exc,
        )
        return False
    write_tokenizer_bin(str(model_path), str(out_path))
    return True


# ----------------------------------------------------------------------------
# Tokenization


class Progress:
    """A one-line progress bar on stderr, redrawn at most every 0.2 s."""

    def __init__(self, label: str, total: int, stream: Any = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.last_draw = 0.0

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if done < self.total and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        width = 30
        filled = int(width * done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = now - self.start
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {elapsed:5.1f}s {extra}")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def tokenize_split(
    sp: Any,
    conversations: Mapping[str, Any],
    ids: Sequence[str],
    out_dir: Path,
    split: str,
) -> int:
    """Tokenize one split into ``{split}.bin`` and ``{split}_index.npy`` and return its token count."""
    progress = Progress(f"tokenize {split}", len(ids))
    encoded: list[np.ndarray] = []
    n_tokens = 0
    for i, cid in enumerate(ids):
        tokens = np.asarray(encode_conversation(sp, conversations[cid]), dtype=np.uint16)
        encoded.append(tokens)
        n_tokens += len(tokens)
        progress.update(i + 1, f"{n_tokens:,} tokens")

    index = np.zeros(len(ids) + 1, dtype=np.int64)
    index[1:] = np.cumsum([len(t) for t in encoded])
    stream = np.memmap(
        out_dir / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(max(n_tokens, 1),)
    )
    for start, tokens in zip(index[:-1], encoded):
        stream[start : start + len(tokens)] = tokens
    stream.flush()
    del stream
    if n_tokens == 0:
        # np.memmap cannot map an empty file, so the placeholder element is removed.
        os.truncate(out_dir / f"{split}.bin", 0)
    np.save(out_dir / f"{split}_index.npy", index)
    return n_tokens


def prepare(
    out_dir: str | os.PathLike[str],
    conversations: Optional[Mapping[str, Any]] = None,
    vocab_size: int = 2048,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Build a data directory (see the module docstring) and return its metadata.

    ``conversations`` defaults to the full chitchat dataset. The tokenizer is trained
    on the rendered exchanges of the training split only.
    """
    import sentencepiece as spm

    if vocab_size > 65536:
        raise ValueError(
            f"vocab_size {vocab_size} does not fit in uint16 token ids; use at most 65536"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if conversations is None:
        conversations = load_chitchat()
    train_ids, val_ids = split_ids(conversations.keys(), val_fraction, seed)
    if not train_ids:
        raise ValueError("the training split is empty; lower val_fraction or add conversations")
    logger.info(
        "%d conversations: %d train, %d validation",
        len(conversations),
        len(train_ids),
        len(val_ids),
    )

    sentences = (
        exchange_text(e) for cid in train_ids for e in conversation_exchanges(conversations[cid])
    )
    t0 = time.monotonic()
    model_path = train_tokenizer(sentences, out / "tokenizer", vocab_size, seed)
    logger.info("trained tokenizer %s in %.1fs", model_path, time.monotonic() - t0)
    has_bin = export_tokenizer_bin(model_path, out / "tokenizer.bin")

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n_train = tokenize_split(sp, conversations, train_ids, out, "train")
    n_val = tokenize_split(sp, conversations, val_ids, out, "val")
    meta = {
        "format_version": DATA_FORMAT_VERSION,
        "source": "chitchat-dataset",
        "vocab_size": sp.get_piece_size(),
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "val_fraction": val_fraction,
        "seed": seed,
        "tokenizer_bin": has_bin,
        "splits": {
            "train": {"conversations": len(train_ids), "tokens": n_train, "ids": train_ids},
            "val": {"conversations": len(val_ids), "tokens": n_val, "ids": val_ids},
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    logger.info("wrote %s: %d train tokens, %d validation tokens", out, n_train, n_val)
    return meta


# ----------------------------------------------------------------------------
# Reading


def read_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``meta.json`` of a prepared data directory."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `python -m llama2rnn.train prepare` first")
    return json.loads(path.read_text())


def read_tokens(data_dir: str | os.PathLike[str], split: str) -> np.ndarray:
    """Map a split's token stream read-only (an empty array for an empty split)."""
    path = Path(data_dir) / f"{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def read_index(data_dir: str | os.PathLike[str], split: str) -> np.ndarray:
    """Read a split's conversation offsets (length = conversations + 1)."""
    return np.load(Path(data_dir) / f"{split}_index.npy")


def iter_conversations(data_dir: str | os.PathLike[str], split: str) -> Iterator[np.ndarray]:
    """Yield each conversation of a split as a token array."""
    tokens = read_tokens(data_dir, split)
    index = read_index(data_dir, split)
    for start, end in zip(index[:-1], index[1:]):
        yield tokens[start:end]
