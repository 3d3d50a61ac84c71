"""Shared pytest fixtures, in one section per area of the package."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest

# =============================================================================================
# Tokenizer fixtures (tests/test_tokenizer.py)
# =============================================================================================

REPO_ROOT = Path(__file__).resolve().parent.parent

# Number of final chitchat messages held out for parity tests. Training never uses them.
HELD_OUT_LINES = 3000
# Chitchat messages to train on: enough for a 2000-piece BPE, which trains in about 0.3 s.
TRAINING_MESSAGES = 40000
# Maximum number of sentences the trainer loads. The tests pass fewer, so none are dropped.
MAX_TRAINING_SENTENCES = 100000
TRAINING_SEED = 1234
_TOKENIZER_SOURCE_MODULE = "_llama2rnn_tokenizer_source"

# The chitchat corpus is ASCII only. These lines, repeated in training, give the vocabulary
# pieces of several multi-byte characters, while the rarest characters stay outside it
# (character_coverage) and go through byte fallback.
MULTILINGUAL_LINES = [
    "Ça va très bien, merci ! On se voit au café après l'école ?",
    "Die Straße ist schön, aber die Brücke über den Fluss ist gesperrt.",
    "Привет, как дела? Я сегодня очень устал после работы.",
    "Καλημέρα, τι κάνεις σήμερα; Θέλεις να πάμε για καφέ;",
    "今日はとても暑いですね。明日は雨が降るかもしれません。",
    "我今天很高兴，因为我们明天去北京旅行。",
    "안녕하세요, 오늘 날씨가 정말 좋네요.",
    "مرحبا، كيف حالك اليوم؟",
    "नमस्ते, आप कैसे हैं?",
    "That sounds great 😀 see you soon 👍 ❤️",
    "Naïve façade, jalapeño piñata, coöperate, señor Müller.",
]
MULTILINGUAL_REPEATS = 100


class TrainedTokenizer(NamedTuple):
    """A sentencepiece model trained for the tests and its tokenizer.bin export."""

    model_path: Path
    bin_path: Path


def _import_tokenizer_module() -> ModuleType:
    """Import llama2rnn.tokenizer, or its source file when the package cannot be imported.

    The package's __init__ imports the compiled extension, which exists only after a
    maturin build, but the tokenizer module itself is pure Python.
    """
    try:
        return importlib.import_module("llama2rnn.tokenizer")
    except ImportError:
        pass
    if _TOKENIZER_SOURCE_MODULE in sys.modules:
        return sys.modules[_TOKENIZER_SOURCE_MODULE]
    path = REPO_ROOT / "python" / "llama2rnn" / "tokenizer.py"
    spec = importlib.util.spec_from_file_location(_TOKENIZER_SOURCE_MODULE, path)
    assert spec is not None, f"cannot load {path}"
    assert spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses look their module up in sys.modules.
    sys.modules[_TOKENIZER_SOURCE_MODULE] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tokenizer_module() -> ModuleType:
    """The llama2rnn.tokenizer module."""
    return _import_tokenizer_module()


@pytest.fixture(scope="session")
def chitchat_messages() -> list[str]:
    """Every message text of the chitchat dataset, in conversation-id order."""
    chitchat_dataset = pytest.importorskip("chitchat_dataset")
    dataset = chitchat_dataset.Dataset()
    return [
        message["text"]
        for conversation_id in sorted(dataset.keys())
        for turn in dataset[conversation_id]["messages"]
        for message in turn
    ]


@pytest.fixture(scope="session")
def chitchat_lines(chitchat_messages: list[str]) -> list[str]:
    """Held-out chitchat message lines that the test tokenizers were not trained on."""
    return chitchat_messages[-HELD_OUT_LINES:]


def _train_bpe(
    sentences: list[str], model_prefix: Path, vocab_size: int, byte_fallback: bool
) -> Path:
    spm = pytest.importorskip("sentencepiece")
    spm.set_random_generator_seed(TRAINING_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        input_sentence_size=MAX_TRAINING_SENTENCES,
        num_threads=1,
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def _export(tokenizer_module: ModuleType, model_path: Path) -> TrainedTokenizer:
    bin_path = model_path.with_suffix(".bin")
    tokenizer_module.write_tokenizer_bin(model_path, bin_path)
    return TrainedTokenizer(model_path, bin_path)


@pytest.fixture(scope="session")
def chitchat_tokenizer(
    tmp_path_factory: pytest.TempPathFactory,
    chitchat_messages: list[str],
    tokenizer_module: ModuleType,
) -> TrainedTokenizer:
    """A 2000-piece BPE model with byte fallback in the Llama 2 style, and its tokenizer.bin."""
    training = chitchat_messages[:TRAINING_MESSAGES] + MULTILINGUAL_LINES * MULTILINGUAL_REPEATS
    prefix = tmp_path_factory.mktemp("chitchat_tokenizer") / "chitchat"
    model_path = _train_bpe(training, prefix, vocab_size=2000, byte_fallback=True)
    return _export(tokenizer_module, model_path)


@pytest.fixture(scope="session")
def chitchat_tokenizer_without_byte_fallback(
    tmp_path_factory: pytest.TempPathFactory,
    chitchat_messages: list[str],
    tokenizer_module: ModuleType,
) -> TrainedTokenizer:
    """A 500-piece BPE model without byte fallback, and its tokenizer.bin."""
    prefix = tmp_path_factory.mktemp("chitchat_tokenizer_no_bytes") / "chitchat_no_bytes"
    model_path = _train_bpe(chitchat_messages[:20000], prefix, vocab_size=500, byte_fallback=False)
    return _export(tokenizer_module, model_path)


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    """Folder with the Llama 2 tokenizer.model and tokenizer.bin (32000 pieces).

    Set LLAMA2_TOKENIZER_DIR to choose it. The tests that use it are skipped without it.
    """
    default = REPO_ROOT.parent / "shared" / "llama2-tokenizer"
    folder = Path(os.environ.get("LLAMA2_TOKENIZER_DIR", default))
    for name in ("tokenizer.model", "tokenizer.bin"):
        if not (folder / name).is_file():
            pytest.skip(f"Llama 2 tokenizer not found: {folder / name} (set LLAMA2_TOKENIZER_DIR)")
    return folder


# =============================================================================================
# End of tokenizer fixtures
# =============================================================================================
