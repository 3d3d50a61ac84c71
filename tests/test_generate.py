"""Text generation through `Model`: sampling settings, seeds, streaming and context limits.

The models are random checkpoints whose vocab_size matches the 2000-piece chitchat
tokenizer from conftest.py, so their text is gibberish but every code path is real.
"""

from __future__ import annotations

import math
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from reference import checkpoint

import llama2rnn
from llama2rnn import ContextFullError, Model, NonFiniteLogitsError, TokenizerError

Config = checkpoint.Config

PROMPT = "Hi, how are you doing today?"
# Long enough for the memory model below to run several chunks past its seq_len.
LONG_PROMPT = " ".join(["I went to the market this morning and bought some apples and bread."] * 4)
# Enough tokens that two seeds give the same text only by a negligible chance.
SAMPLED_TOKENS = 48


@pytest.fixture(scope="module")
def vocab_size(chitchat_tokenizer) -> int:
    return llama2rnn.load_tokenizer(chitchat_tokenizer.bin_path).vocab_size


@pytest.fixture(scope="module")
def memory_config(vocab_size) -> Config:
    return Config(
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab_size,
        seq_len=16,
        mem_len=8,
    )


@pytest.fixture(scope="module")
def plain_config(memory_config) -> Config:
    return replace(memory_config, seq_len=32, mem_len=0)


@pytest.fixture(scope="module")
def memory_checkpoint(tmp_path_factory, memory_config) -> Path:
    """A memory checkpoint alone in its folder, so no tokenizer is found next to it."""
    path = tmp_path_factory.mktemp("memory") / "model.bin"
    weights = checkpoint.random_weights(memory_config, seed=1)
    checkpoint.write_llama2rnn(path, memory_config, weights)
    return path


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory, plain_config) -> Path:
    path = tmp_path_factory.mktemp("plain") / "model.bin"
    checkpoint.write_llama2c_v2(path, plain_config, checkpoint.random_weights(plain_config, seed=2))
    return path


@pytest.fixture
def load(chitchat_tokenizer):
    """Load a checkpoint with the chitchat tokenizer on one thread, unless kwargs override them."""

    def load_model(path: Path, **kwargs) -> Model:
        kwargs.setdefault("tokenizer", chitchat_tokenizer.bin_path)
        kwargs.setdefault("threads", 1)
        return Model.load(path, **kwargs)

    return load_model


def prompt_length(model: Model, prompt: str) -> int:
    return len(model.tokenizer.encode(prompt, bos=True))


# ---------------------------------------------------------------------------------------------
# Basic calls


def test_generate_returns_text(load, memory_checkpoint):
    model = load(memory_checkpoint)
    text = model.generate(PROMPT, max_tokens=16, seed=1)
    assert isinstance(text, str)
    # The prompt and every generated token (at most 16, EOS included) are fed.
    assert prompt_length(model, PROMPT) < model.position <= prompt_length(model, PROMPT) + 16


def test_max_tokens_zero_feeds_prompt(load, memory_checkpoint):
    model = load(memory_checkpoint)
    assert model.generate(PROMPT, max_tokens=0) == ""
    assert model.position == prompt_length(model, PROMPT)
    assert list(model.generate_stream(PROMPT, max_tokens=0)) == []
    assert model.position == 2 * prompt_length(model, PROMPT)


def test_negative_max_tokens_raises(load, memory_checkpoint):
    model = load(memory_checkpoint)
    with pytest.raises(ValueError, match="max_tokens -1 is invalid"):
        model.generate(PROMPT, max_tokens=-1)
    with pytest.raises(ValueError, match="max_tokens -5 is invalid"):
        model.generate_stream(PROMPT, max_tokens=-5)
    assert model.position == 0


# ---------------------------------------------------------------------------------------------
# Seeds and sampling settings


def test_same_seed_gives_same_text(load, memory_checkpoint):
    model = load(memory_checkpoint)
    first = model.generate(PROMPT, max_tokens=SAMPLED_TOKENS, temperature=1.0, top_p=0.9, seed=7)
    model.reset()
    second = model.generate(PROMPT, max_tokens=SAMPLED_TOKENS, temperature=1.0, top_p=0.9, seed=7)
    assert first
    assert second == first


def test_seed_zero_differs_from_seed_one(load, memory_checkpoint):
    model = load(memory_checkpoint)
    texts = {}
    for seed in (0, 1, 2**64 - 1):
        model.reset()
        texts[seed] = model.generate(
            PROMPT, max_tokens=SAMPLED_TOKENS, temperature=1.0, top_p=1.0, seed=seed
        )
    assert texts[0]
    assert texts[0] != texts[1]
    assert texts[2**64 - 1] not in (texts[0], texts[1])


def test_greedy_needs_no_seed(load, memory_checkpoint):
    # Each Model starts with its own random seed, so two loads share no generator state.
    first = load(memory_checkpoint).generate(PROMPT, max_tokens=SAMPLED_TOKENS, temperature=0.0)
    second = load(memory_checkpoint).generate(PROMPT, max_tokens=SAMPLED_TOKENS, temperature=0.0)
    assert first
    assert second == first


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top_p_zero_equals_greedy(load, memory_checkpoint, temperature):
    model = load(memory_checkpoint)
    greedy = model.generate(PROMPT, max_tokens=SAMPLED_TOKENS, temperature=0.0)
    model.reset()
    nucleus = model.generate(
        PROMPT, max_tokens=SAMPLED_TOKENS, temperature=temperature, top_p=0.0, seed=5
    )
    assert nucleus == greedy


def test_top_p_one_samples_whole_vocabulary(load, memory_checkpoint):
    model = load(memory_checkpoint)
    first = model.generate(PROMPT, max_tokens=SAMPLED_TOKENS, top_p=1.0, seed=9)
    model.reset()
    second = model.generate(PROMPT, max_tokens=SAMPLED_TOKENS, top_p=1.0, seed=9)
    assert isinstance(first, str)
    assert second == first


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"temperature": -1.0}, "temperature -1 is invalid"),
        ({"temperature": math.nan}, "temperature NaN is invalid"),
        ({"temperature": math.inf}, "temperature inf is invalid"),
        ({"top_p": -0.1}, "top_p -0.1 is invalid"),
        ({"top_p": 1.5}, "top_p 1.5 is invalid"),
        ({"top_p": math.nan}, "top_p NaN is invalid"),
        ({"seed": -1}, "seed -1 is invalid"),
        ({"seed": 2**64}, f"seed {2**64} is invalid"),
    ],
    ids=[
        "temperature-negative",
        "temperature-nan",
        "temperature-inf",
        "top-p-negative",
        "top-p-above-one",
        "top-p-nan",
        "seed-negative",
        "seed-too-large",
    ],
)
def test_invalid_sampling_settings_raise(load, memory_checkpoint, settings, expected):
    model = load(memory_checkpoint)
    with pytest.raises(ValueError) as info:
        model.generate(PROMPT, max_tokens=4, **settings)
    assert expected in str(info.value)
    with pytest.raises(ValueError):
        model.generate_stream(PROMPT, max_tokens=4, **settings)
    assert model.position == 0  # rejected before the prompt is fed


def test_threads_do_not_change_text(load, memory_checkpoint):
    single = load(memory_checkpoint, threads=1).generate(PROMPT, max_tokens=SAMPLED_TOKENS, seed=11)
    double = load(memory_checkpoint, threads=2).generate(PROMPT, max_tokens=SAMPLED_TOKENS, seed=11)
    assert single
    assert double == single


# ---------------------------------------------------------------------------------------------
# Long prompts and context limits


def greedy_tokens(model: Model, count: int) -> list[int]:
    """Sample `count` greedy tokens from the engine, feeding each one back."""
    model.engine.set_sampling(0.0, 1.0)
    tokens = []
    for _ in range(count):
        tokens.append(model.engine.sample())
        model.feed([tokens[-1]])
    return tokens


def test_prompt_spanning_several_chunks(load, memory_checkpoint, memory_config):
    model = load(memory_checkpoint)
    tokens = model.tokenizer.encode(LONG_PROMPT, bos=True)
    assert len(tokens) > 3 * memory_config.mem_len
    assert len(tokens) > memory_config.seq_len  # a memory model runs past its seq_len

    assert model.generate(LONG_PROMPT, max_tokens=0) == ""
    assert model.position == len(tokens)
    after_prompt = greedy_tokens(model, 10)

    # Token by token through forward() must reach the same state as feeding the prompt.
    stepwise = load(memory_checkpoint)
    for token in tokens:
        logits = stepwise.forward(token)
    assert int(np.argmax(logits)) == after_prompt[0]
    assert greedy_tokens(stepwise, 10) == after_prompt

    model.reset()
    text = model.generate(LONG_PROMPT, max_tokens=SAMPLED_TOKENS, seed=3)
    assert isinstance(text, str)


def test_plain_model_rejects_long_prompt(load, plain_checkpoint, plain_config):
    model = load(plain_checkpoint)
    length = prompt_length(model, LONG_PROMPT)
    assert length > plain_config.seq_len
    with pytest.raises(ContextFullError) as info:
        model.generate(LONG_PROMPT, max_tokens=4, seed=1)
    message = str(info.value)
    assert f"the prompt is {length} tokens" in message
    assert f"seq_len {plain_config.seq_len}" in message
    assert model.position == 0  # nothing was fed

    model.generate(PROMPT, max_tokens=0)
    fed = model.position
    room = plain_config.seq_len - fed
    with pytest.raises(ContextFullError, match=f"room for {room} more"):
        model.generate(LONG_PROMPT, max_tokens=4)
    assert model.position == fed


def test_plain_model_stops_at_seq_len(load, plain_checkpoint, plain_config):
    model = load(plain_checkpoint)
    text = model.generate(PROMPT, max_tokens=10 * plain_config.seq_len, temperature=0.0)
    assert isinstance(text, str)
    assert text
    # Greedy decoding on this model samples no EOS before the context is full.
    assert model.position == plain_config.seq_len

    model.reset()
    stream = model.generate_stream(PROMPT, max_tokens=10 * plain_config.seq_len, temperature=0.0)
    pieces = list(stream)
    assert "".join(pieces) == text
    assert model.position == plain_config.seq_len

    # A full context rejects any further prompt before feeding it.
    with pytest.raises(ContextFullError, match="room for 0 more"):
        model.generate(PROMPT, max_tokens=1)
    assert model.position == plain_config.seq_len


# ---------------------------------------------------------------------------------------------
# Non-finite logits


def rms_final_offset(fmt: str, config: Config) -> int:
    """Return the byte offset of rms_final in a file of a version 1 or 2 format.

    The fp32 section starts at byte 256 with rms_att and rms_ffn (n_layers * dim each). A
    llama2rnn file then has rms_mem, rms_mff (n_layers * dim each) and ori_mem
    (n_layers * mem_len * dim). rms_final (dim) comes next.
    """
    layers, dim = config.n_layers, config.dim
    if fmt == "llama2rnn":
        return 256 + 4 * (4 * layers * dim + layers * config.mem_len * dim)
    return 256 + 4 * (2 * layers * dim)


# The Q8_0 formats quantize the final norm's output before the classifier, so a NaN there
# must survive activation quantization to reach the logits.
@pytest.mark.parametrize("fmt", ["llama2rnn", "llama2c-v2", "llama2c-v1"])
def test_nan_weights_raise_non_finite_logits(load, tmp_path, memory_config, plain_config, fmt):
    config = memory_config if fmt == "llama2rnn" else plain_config
    writer = {
        "llama2rnn": checkpoint.write_llama2rnn,
        "llama2c-v2": checkpoint.write_llama2c_v2,
        "llama2c-v1": checkpoint.write_llama2c_v1,
    }[fmt]
    path = tmp_path / "nan.bin"
    writer(path, config, checkpoint.random_weights(config, seed=4))
    # The writers reject NaN, so patch the written bytes.
    data = bytearray(path.read_bytes())
    nans = [math.nan] * config.dim
    struct.pack_into(f"<{config.dim}f", data, rms_final_offset(fmt, config), *nans)
    path.write_bytes(bytes(data))

    model = load(path)
    logits = model.forward(1)
    assert logits.shape == (config.vocab_size,)
    assert np.isnan(logits).all()

    model.reset()
    with pytest.raises(NonFiniteLogitsError) as info:
        model.generate(PROMPT, max_tokens=4, seed=1)
    assert isinstance(info.value, ArithmeticError)
    assert "non-finite logit (NaN)" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Streaming


def test_stream_matches_generate(load, memory_checkpoint):
    model = load(memory_checkpoint)
    text = model.generate(PROMPT, max_tokens=SAMPLED_TOKENS, seed=13)
    model.reset()
    pieces = list(model.generate_stream(PROMPT, max_tokens=SAMPLED_TOKENS, seed=13))
    assert all(isinstance(piece, str) and piece for piece in pieces)
    assert "".join(pieces) == text


def test_stream_yields_whole_utf8_characters(load, tmp_path, chitchat_tokenizer, memory_config):
    """A model built to emit the UTF-8 bytes of "中😀é" as byte tokens, then EOS.

    With wo and w2 zero, every layer leaves the residual stream unchanged, so the logits
    depend only on the last token's embedding. Each token of the chain embeds to its own
    basis vector, and the classifier maps that vector to the next token of the chain.
    """
    tokenizer = llama2rnn.load_tokenizer(chitchat_tokenizer.bin_path)
    expected = "中😀é"
    prompt_tokens = tokenizer.encode(PROMPT, bos=True)
    byte_tokens = [tokenizer.piece_to_id(f"<0x{byte:02X}>") for byte in expected.encode("utf-8")]
    chain = [prompt_tokens[-1], *byte_tokens, tokenizer.eos_id]
    assert len(set(chain)) == len(chain)

    config = replace(memory_config, n_layers=1)
    assert len(chain) <= config.dim
    weights = checkpoint.random_weights(config, seed=6, shared_classifier=False)
    weights["wo"][:] = 0.0
    weights["w2"][:] = 0.0
    weights["rms_final"][:] = 1.0
    weights["wcls"] *= 0.01
    for position, (token, successor) in enumerate(zip(chain, chain[1:])):
        weights["embedding"][token] = np.eye(config.dim, dtype=np.float32)[position]
        weights["wcls"][successor, position] = 10.0
    path = tmp_path / "utf8.bin"
    checkpoint.write_llama2rnn(path, config, weights)

    model = load(path)
    pieces = list(model.generate_stream(PROMPT, max_tokens=32, temperature=0.0))
    assert pieces == ["中", "😀", "é"]
    assert "\ufffd" not in "".join(pieces)
    # The nine byte tokens and the final EOS are all fed back.
    assert model.position == len(prompt_tokens) + len(byte_tokens) + 1


# ---------------------------------------------------------------------------------------------
# Tokenizer discovery


@pytest.mark.parametrize("name", ["tokenizer.bin", "tokenizer.model"])
def test_tokenizer_found_next_to_checkpoint(
    load, tmp_path, chitchat_tokenizer, memory_checkpoint, name
):
    folder = tmp_path / "bundle"
    folder.mkdir()
    path = folder / "model.bin"
    shutil.copyfile(memory_checkpoint, path)
    if name == "tokenizer.bin":
        shutil.copyfile(chitchat_tokenizer.bin_path, folder / name)
    else:
        shutil.copyfile(chitchat_tokenizer.model_path, folder / name)

    model = Model.load(path, threads=1)
    assert model.tokenizer.vocab_size == model.config.vocab_size
    text = model.generate(PROMPT, max_tokens=SAMPLED_TOKENS, seed=17)
    explicit = load(memory_checkpoint).generate(PROMPT, max_tokens=SAMPLED_TOKENS, seed=17)
    assert text == explicit


def test_model_without_tokenizer(memory_checkpoint, memory_config):
    model = Model.load(memory_checkpoint, threads=1)
    logits = model.forward(1)
    assert logits.shape == (memory_config.vocab_size,)
    assert np.isfinite(logits).all()

    with pytest.raises(TokenizerError) as info:
        model.generate(PROMPT, max_tokens=4)
    message = str(info.value)
    assert f"no tokenizer was loaded for {memory_checkpoint}" in message
    assert "tokenizer=PATH" in message
    with pytest.raises(TokenizerError):
        model.generate_stream(PROMPT, max_tokens=4)
    with pytest.raises(TokenizerError):
        _ = model.tokenizer
    assert model.position == 1  # only the forward() token
