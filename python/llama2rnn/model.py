"""The `Model` class: a checkpoint, its running state, a sampler and a tokenizer."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from . import _llama2rnn
from .checkpoint import Config
from .tokenizer import BaseTokenizer, TokenizerError, load_tokenizer

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
DEFAULT_CHECKPOINT = DEFAULT_MODEL_DIR / "model.bin"
TOKENIZER_NAMES = ("tokenizer.bin", "tokenizer.model")


def default_threads() -> int:
    """Return the thread count used when none is given: `LLAMA2RNN_THREADS`, else the CPUs
    this process may run on."""
    value = os.environ.get("LLAMA2RNN_THREADS")
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(
                f"LLAMA2RNN_THREADS={value!r} is invalid: set it to a positive integer"
            ) from None
        if threads < 1:
            raise ValueError(f"LLAMA2RNN_THREADS={value!r} is invalid: set it to a positive integer")
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS
        return max(1, os.cpu_count() or 1)


def find_tokenizer(checkpoint: Path) -> Path | None:
    """Return the tokenizer file stored next to `checkpoint`, if any."""
    for name in TOKENIZER_NAMES:
        candidate = checkpoint.parent / name
        if candidate.is_file():
            return candidate
    return None


class Model:
    """A loaded model with its state. Text in and out needs a tokenizer; `forward` does not.

    Generation continues from the current state, so a memory model remembers earlier calls;
    `reset()` starts over.
    """

    def __init__(self, engine: _llama2rnn.Engine, tokenizer: BaseTokenizer | None) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        cfg = engine.config
        self._config = Config(
            dim=cfg["dim"],
            hidden_dim=cfg["hidden_dim"],
            n_layers=cfg["n_layers"],
            n_heads=cfg["n_heads"],
            n_kv_heads=cfg["n_kv_heads"],
            vocab_size=cfg["vocab_size"],
            seq_len=cfg["seq_len"],
            mem_len=cfg["mem_len"],
        )
        self._shared_classifier = bool(cfg["shared_classifier"])
        engine.set_sampling(1.0, 0.9, secrets.randbits(64))

    @classmethod
    def load(
        cls,
        checkpoint: PathLike | None = None,
        tokenizer: PathLike | BaseTokenizer | None = None,
        *,
        threads: int | None = None,
        mode: str = "chunk",
        kernel: str | None = None,
        expected_format: str | None = None,
    ) -> Model:
        """Load a checkpoint (the built-in default model when None).

        `tokenizer` is a path or a tokenizer object; when None, a `tokenizer.bin` or
        `tokenizer.model` next to the checkpoint is used if present. `mode` is "chunk"
        (memory update after every M tokens, as trained) or "token" (experimental). `kernel`
        forces a kernel path (default: `LLAMA2RNN_KERNEL`, else the fastest the CPU supports).
        """
        if checkpoint is None:
            path = DEFAULT_CHECKPOINT
            if not path.is_file():
                raise FileNotFoundError(
                    f"the built-in default model is missing from this installation ({path}); "
                    "pass a checkpoint path or reinstall llama2rnn"
                )
        else:
            path = Path(checkpoint)
        if threads is None:
            threads = default_threads()
        if kernel is None:
            kernel = os.environ.get("LLAMA2RNN_KERNEL", "auto")
        engine = _llama2rnn.Engine(
            str(path), threads=threads, mode=mode, kernel=kernel, expected_format=expected_format
        )
        vocab_size = engine.config["vocab_size"]
        if isinstance(tokenizer, BaseTokenizer):
            if tokenizer.vocab_size != vocab_size:
                raise TokenizerError(
                    f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size "
                    f"is {vocab_size}: pass the tokenizer that was trained with this model"
                )
            tok: BaseTokenizer | None = tokenizer
        else:
            tok_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(path)
            tok = load_tokenizer(tok_path, vocab_size=vocab_size) if tok_path else None
        return cls(engine, tok)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def format(self) -> str:
        """Checkpoint format: "llama2rnn", "llama2c-v2", "llama2c-v1" or "llama2c-v0"."""
        return self._engine.format

    @property
    def tokenizer(self) -> BaseTokenizer:
        if self._tokenizer is None:
            raise TokenizerError(
                f"no tokenizer was loaded for {self._engine.path}: pass tokenizer=PATH to "
                "Model.load or put tokenizer.bin next to the checkpoint"
            )
        return self._tokenizer

    @property
    def position(self) -> int:
        """Tokens consumed since load or the last reset."""
        return self._engine.position

    @property
    def engine(self) -> _llama2rnn.Engine:
        """The native engine, for settings not wrapped here (kernel, threads, file facts)."""
        return self._engine

    def forward(self, token: int) -> np.ndarray:
        """Feed one token id and return the logits for the next token (float32, vocab_size)."""
        return self._engine.forward(token)

    def reset(self) -> None:
        """Forget everything: position 0 and the model's initial memory."""
        self._engine.reset()

    def generate(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> str:
        """Feed `prompt` (with BOS) and return up to `max_tokens` generated tokens as text."""
        return "".join(self.generate_stream(prompt, max_tokens, temperature, top_p, seed))

    def generate_stream(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Like `generate`, yielding text pieces as they are decoded. Every generated token,
        the final EOS included, is fed back, so the state holds the whole exchange."""
        if max_tokens < 0:
            raise ValueError(f"max_tokens {max_tokens} is invalid: use 0 or more")
        self._set_sampling(temperature, top_p, seed)
        self.feed(self.tokenizer.encode(prompt, bos=True))
        return self._decode_loop(max_tokens)

    def feed(self, tokens: list[int]) -> None:
        """Feed token ids without sampling. A plain llama2.c model rejects a prompt that does
        not fit in what is left of its seq_len before feeding any of it."""
        if not self._config.is_memory_model:
            room = self._config.seq_len - self.position
            if len(tokens) > room:
                raise _llama2rnn.ContextFullError(
                    f"the prompt is {len(tokens)} tokens but this plain llama2.c model has room "
                    f"for {room} more (seq_len {self._config.seq_len}); shorten the prompt or "
                    "call reset()"
                )
        self._engine.feed(tokens)

    def _set_sampling(self, temperature: float, top_p: float, seed: int | None) -> None:
        if seed is not None and not 0 <= seed < 2**64:
            raise ValueError(f"seed {seed} is invalid: use an integer from 0 to 2**64 - 1")
        self._engine.set_sampling(temperature, top_p, seed)

    def _decode_loop(self, max_tokens: int) -> Iterator[str]:
        tok = self.tokenizer
        decoder = tok.decode_stream()
        stop = {tok.eos_id, tok.bos_id}
        for _ in range(max_tokens):
            token = self._engine.sample()
            try:
                self._engine.feed([token])
            except _llama2rnn.ContextFullError:
                break  # a plain model ran out of positions: the text so far stands
            if token in stop:
                break
            piece = decoder.step(token)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail
