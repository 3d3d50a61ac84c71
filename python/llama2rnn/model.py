"""The `Model` class: a checkpoint, its running state, a sampler and a tokenizer."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from . import _llama2rnn
from . import chat as chat_template
from . import memory as memory_store
from .checkpoint import Config
from .memory import MemorySnapshot, MemoryWriter
from .tokenizer import BaseTokenizer, TokenizerError, load_tokenizer

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
DEFAULT_CHECKPOINT = DEFAULT_MODEL_DIR / "model.bin"
TOKENIZER_NAMES = ("tokenizer.bin", "tokenizer.model")


# Checkpoints smaller than this decode fastest on one thread: their matrices are too small for
# a hand-off between cores to pay. Measured on a 2-core AMD EPYC (benches/RESULTS.md): the
# 1.9 MB default model ran 4,000 tokens/s on one thread and 3,700 on two, toy20M (15 MB) the
# same on both, and 110M (120 MB) 12% faster on two.
SINGLE_THREAD_MAX_BYTES = 64 * 2**20


def default_kernel() -> str:
    """Return the kernel path used when none is given: `LLAMA2RNN_KERNEL` when set and not
    empty, else "auto" (the fastest path the CPU supports)."""
    value = os.environ.get("LLAMA2RNN_KERNEL", "").strip()
    if not value:
        return "auto"
    supported = _llama2rnn.supported_kernels()
    if value != "auto" and value not in supported:
        raise ValueError(
            f"LLAMA2RNN_KERNEL={value!r} is not a kernel path this CPU supports: set it to "
            f"auto or one of {', '.join(supported)}, or unset it"
        )
    return value


def default_threads(checkpoint_bytes: int | None = None) -> int:
    """Return the thread count used when none is given: `LLAMA2RNN_THREADS`, else 1 for a
    checkpoint under `SINGLE_THREAD_MAX_BYTES`, else the CPUs this process may run on."""
    value = os.environ.get("LLAMA2RNN_THREADS")
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(
                f"LLAMA2RNN_THREADS={value!r} is invalid: set it to a positive integer"
            ) from None
        if threads < 1:
            raise ValueError(
                f"LLAMA2RNN_THREADS={value!r} is invalid: set it to a positive integer"
            )
        return threads
    if checkpoint_bytes is not None and checkpoint_bytes < SINGLE_THREAD_MAX_BYTES:
        return 1
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
    `reset()` starts over. `open_memory`, `load_memory` and `save_memory` keep that state in
    memory files across processes.

    A model runs one call at a time. A call from another thread while one runs raises
    RuntimeError. Use one Model per thread, or a lock around the calls.
    """

    # Last token fed through this object (None after a reset or before any), stored in
    # memory files. Tokens fed through `engine` directly are not tracked.
    _last_token: int | None = None
    # The memory opened for writing by `open_memory` or `load_memory`, if any.
    _memory_writer: MemoryWriter | None = None

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
            threads = default_threads(path.stat().st_size if path.is_file() else None)
        if kernel is None:
            kernel = default_kernel()
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
    def kernel(self) -> str:
        """Kernel path that runs the products, such as "avx512vnni" (see `supported_kernels()`)."""
        return self._engine.kernel

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
        logits = self._engine.forward(token)
        self._last_token = token
        return logits

    def reset(self) -> None:
        """Forget everything: position 0 and the model's initial memory."""
        self._engine.reset()
        self._last_token = None

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
        the final EOS included, is fed back, so the state contains the whole exchange."""
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
                    "reset the model's state"
                )
        start = self.position
        try:
            self._engine.feed(tokens)
        finally:
            # On a failure part way, the last token that made it in is still the last one fed.
            consumed = self.position - start
            if consumed > 0:
                self._last_token = tokens[consumed - 1]

    # -----------------------------------------------------------------------------------------
    # Memory files. A name means memories/NAME.mem in the data folder. A value that contains
    # "/" or ends in .mem is a path. The module llama2rnn.memory describes the storage rules.

    @property
    def memory_path(self) -> Path | None:
        """Path of the memory opened for writing by `open_memory` or `load_memory`, if any."""
        writer = self._memory_writer
        return writer.location.path if writer is not None else None

    def open_memory(self, path_or_name: PathLike, *, reset: bool = False) -> bool:
        """Open a memory for writing, so that `save_memory()` saves there, and return whether
        it existed.

        An existing memory is loaded, unless `reset` is true: then the model starts over and
        the next save replaces the file. A memory that does not exist yet starts from the
        current state (or the initial one with `reset`) and is created by the first save.
        Raises MemoryInUseError when another writer has it open, and MemoryFileError, leaving
        the state unchanged, when the file is corrupt or was made by another model. A memory
        opened before is closed without saving.
        """
        location = memory_store.locate(path_or_name)
        writer = self._writer_for(location)
        try:
            exists = location.path.exists()
            if reset:
                self.reset()
            elif exists:
                self._load_bytes(memory_store.read_memory(location), location.label)
        except BaseException:
            if writer is not self._memory_writer:
                writer.close()
            raise
        self._attach(writer)
        return exists

    def load_memory(self, path_or_name: PathLike, *, attach: bool = True) -> None:
        """Load a saved memory, replacing the current state.

        With `attach` (the default) the memory is also opened for writing as in
        `open_memory`; with `attach=False` it is only read and no lock is taken. Raises
        FileNotFoundError when it does not exist, and MemoryFileError, leaving the state
        unchanged, when the file is corrupt or was made by another model.
        """
        location = memory_store.locate(path_or_name)
        writer = self._writer_for(location) if attach else None
        try:
            self._load_bytes(memory_store.read_memory(location), location.label)
        except BaseException:
            if writer is not None and writer is not self._memory_writer:
                writer.close()
            raise
        if writer is not None:
            self._attach(writer)

    def save_memory(self, path_or_name: PathLike | None = None, *, overwrite: bool = False) -> Path:
        """Save the state durably and return the file's path.

        Without an argument this saves to the open memory. Saving anywhere else takes that
        memory's lock for the duration of the write, and raises FileExistsError if a file
        is there unless `overwrite` is true. Raises MemoryWriteError when writing fails
        (disk full, permission denied), leaving any earlier file unchanged.
        """
        writer = self._memory_writer
        if path_or_name is None:
            if writer is None:
                raise ValueError(
                    "no memory is open: pass a name or path, or call open_memory() first"
                )
            location = writer.location
        else:
            location = memory_store.locate(path_or_name)
        data = self._engine.save_state(self._last_token, memory_store.now_unix_ms())
        if writer is not None and writer.location.path == location.path:
            writer.write(data)
            return location.path
        with MemoryWriter.open(location) as temporary_writer:
            if not overwrite and location.path.exists():
                raise FileExistsError(
                    f"{location.label} already exists ({location.path}): open it with "
                    "open_memory() to continue it, or pass overwrite=True to replace it"
                )
            temporary_writer.write(data)
        return location.path

    def close_memory(self) -> None:
        """Release the open memory's lock without saving. Does nothing when none is open."""
        writer = self._memory_writer
        self._memory_writer = None
        if writer is not None:
            writer.close()

    def reset_memory(self) -> None:
        """Forget everything, as `reset` does. An open memory file keeps its content until the
        next `save_memory()`."""
        self.reset()

    def snapshot(self) -> MemorySnapshot:
        """Return an independent in-memory copy of the state (with the sampler state and the
        last token), for `restore`."""
        return MemorySnapshot(self._engine.save_state(self._last_token, memory_store.now_unix_ms()))

    def restore(self, snapshot: MemorySnapshot) -> None:
        """Return to the state of `snapshot`. Raises MemoryFileError, leaving the state
        unchanged, for a snapshot of another model or update mode."""
        self._load_bytes(snapshot.data, "the snapshot")

    def import_raw_memory(self, path: PathLike) -> None:
        """Load a raw memory dump of the original C runtime, replacing the current state.

        The dump must have the exact size for this model (see `memory.raw_dump_size`), or
        MemoryFileError is raised. The dump has no logits, so feed the next token before
        sampling: `generate` does, because it feeds a prompt first.
        """
        source = Path(path)
        raw = source.read_bytes()
        data = memory_store.memory_from_raw_dump(self._engine, raw, str(source))
        self._load_bytes(data, f"raw memory dump {source}")

    def _writer_for(self, location: memory_store.MemoryLocation) -> MemoryWriter:
        writer = self._memory_writer
        if writer is not None and writer.location.path == location.path:
            return writer
        return MemoryWriter.open(location)

    def _attach(self, writer: MemoryWriter) -> None:
        if writer is not self._memory_writer:
            self.close_memory()
            self._memory_writer = writer

    def _load_bytes(self, data: bytes, label: str) -> None:
        try:
            last_token = self._engine.load_state(data)
        except _llama2rnn.MemoryFileError as error:
            raise _llama2rnn.MemoryFileError(f"cannot load {label}: {error}") from None
        self._last_token = last_token

    def _set_sampling(self, temperature: float, top_p: float, seed: int | None) -> None:
        if seed is not None and not 0 <= seed < 2**64:
            raise ValueError(f"seed {seed} is invalid: use an integer from 0 to 2**64 - 1")
        self._engine.set_sampling(temperature, top_p, seed)

    def _decode_loop(self, max_tokens: int, close_turn: bool = False) -> Iterator[str]:
        """Sample, feed and decode up to `max_tokens` tokens, stopping after EOS or BOS.
        With `close_turn`, an answer cut off by `max_tokens` gets an EOS fed after it."""
        tok = self.tokenizer
        decoder = tok.decode_stream()
        stop = {tok.eos_id, tok.bos_id}
        for _ in range(max_tokens):
            token = self._engine.sample()
            before = self.position
            try:
                self._engine.feed([token])
            except _llama2rnn.ContextFullError:
                break  # a plain model ran out of positions: keep the text so far
            finally:
                # Also when Ctrl-C arrives right after the feed: the token is in the state.
                if self.position > before:
                    self._last_token = token
            if token in stop:
                break
            piece = decoder.step(token)
            if piece:
                yield piece
        tail = decoder.finish()
        if close_turn:
            self.close_turn()
        if tail:
            yield tail

    def close_turn(self) -> None:
        """Feed EOS unless the last token fed was EOS, so that the next chat turn starts on a
        turn boundary (after an answer cut off by max_tokens or by Ctrl-C)."""
        eos = self.tokenizer.eos_id
        if self._last_token == eos or self.position == 0:
            return
        try:
            self.feed([eos])
        except _llama2rnn.ContextFullError:
            pass  # a plain model at seq_len: there is no room to close the turn

    def chat(
        self,
        message: str,
        system: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.8,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> str:
        """Send one user turn in the Llama 2 chat template and return the answer.

        The system prompt is used only in the first turn of a fresh memory; later turns and
        reloaded memories already hold it.
        """
        return "".join(self.chat_stream(message, system, max_tokens, temperature, top_p, seed))

    def chat_stream(
        self,
        message: str,
        system: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.8,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Like `chat`, yielding the answer's text as it is decoded."""
        return chat_template.chat_stream(
            self, message, system, max_tokens, temperature, top_p, seed
        )
