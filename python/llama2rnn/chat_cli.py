"""`llama2rnn chat` and `llama2rnn read`: a lifelong conversation in the terminal, and
documents fed into a memory."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

from .model import DEFAULT_CHECKPOINT, Model

DEFAULT_MEMORY = "default"
# Tokens per engine call while reading a document: small enough for a lively progress line,
# large enough that the calls cost nothing next to the batched forward passes.
READ_SLICE = 512

HELP = """Commands:
  /help         show this help
  /save         save the memory now (it is also saved after every answer and on exit)
  /memory       show what the memory holds
  /read FILE    feed a text file into the memory
  /reset        forget everything (asks first)
  /exit         save and quit (also Ctrl-D)
Enter sends the message; Alt-Enter (or Esc, Enter) starts a new line. Ctrl-C stops an answer."""


def add_chat_commands(
    commands: argparse._SubParsersAction,
    add_model_options: Callable,
    add_sampling_options: Callable,
) -> None:
    chat = commands.add_parser(
        "chat",
        help="talk with the model; the conversation is remembered across sessions",
        description="Chat in the Llama 2 chat template. The memory is saved after every "
        "answer and on exit, and loaded on the next start. Without a terminal, each line of "
        "standard input is one turn and each answer is printed on its own line.",
    )
    add_model_options(chat)
    add_sampling_options(chat, temperature=0.8)
    add_memory_option(chat)
    chat.add_argument("--system", help="system prompt for the first turn of a fresh memory")
    chat.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        help="maximum tokens per answer (default 512)",
    )
    chat.set_defaults(run=run_chat)

    read = commands.add_parser(
        "read",
        help="feed text files into a memory, to chat about them later",
        description="Feed text files into a memory through batched prefill. Each file is "
        "fed as one document: BOS, its text, EOS.",
    )
    read.add_argument("files", nargs="+", type=Path, metavar="FILE")
    add_model_options(read)
    add_memory_option(read)
    read.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of the files (default utf-8; for example latin-1 or cp1252)",
    )
    read.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    read.set_defaults(run=run_read)


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory",
        metavar="NAME",
        default=None,
        help="memory to continue and save (a name, or a path with '/' or ending in .mem; "
        f"default: {DEFAULT_MEMORY!r} for the built-in model, the checkpoint's file name "
        "otherwise)",
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="start from the model's initial state and replace the saved memory",
    )


def memory_name(args: argparse.Namespace) -> str:
    if args.memory:
        return str(args.memory)
    if args.model is None or Path(args.model).resolve() == DEFAULT_CHECKPOINT.resolve():
        return DEFAULT_MEMORY
    return Path(args.model).stem


def open_model(args: argparse.Namespace) -> Model:
    """Load the model and open its memory for writing (locked until closed)."""
    model = Model.load(args.model, args.tokenizer, threads=args.threads, mode=args.mode)
    model.open_memory(memory_name(args), reset=args.reset)
    return model


# ---------------------------------------------------------------------------------------------
# Documents


def read_text(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid {encoding}: byte {data[error.start]:#04x} at offset "
            f"{error.start}; pass --encoding with the file's encoding (for example latin-1)"
        ) from None
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}: use a Python codec name") from None


def feed_document(model: Model, text: str, label: str, out: TextIO | None) -> int:
    """Feed BOS, the text and EOS, writing a progress line to `out`; return the token count."""
    tok = model.tokenizer
    if out:
        out.write(f"{label}: tokenizing {len(text):,} characters...\r")
        out.flush()
    tokens = tok.encode(text, bos=True, eos=True)
    started = time.perf_counter()
    for done in range(0, len(tokens), READ_SLICE):
        model.feed(tokens[done : done + READ_SLICE])
        if out:
            fed = min(done + READ_SLICE, len(tokens))
            elapsed = time.perf_counter() - started
            rate = fed / elapsed if elapsed > 0 else 0.0
            left = (len(tokens) - fed) / rate if rate > 0 else 0.0
            out.write(
                f"\r{label}: {fed:,}/{len(tokens):,} tokens, {rate:,.0f} tokens/s, "
                f"{left:.0f} s left   "
            )
            out.flush()
    if out:
        elapsed = time.perf_counter() - started
        rate = len(tokens) / elapsed if elapsed > 0 else 0.0
        out.write(f"\r{label}: {len(tokens):,} tokens in {elapsed:.1f} s ({rate:,.0f} tokens/s)\n")
    return len(tokens)


def run_read(args: argparse.Namespace) -> int:
    texts = [(path, read_text(path, args.encoding)) for path in args.files]
    model = open_model(args)
    try:
        progress = None if args.quiet else sys.stderr
        for path, text in texts:
            feed_document(model, text, str(path), progress)
            model.save_memory()
        print(f"memory {model.memory_path} now contains {model.position:,} tokens", file=sys.stderr)
    finally:
        model.close_memory()
    return 0


# ---------------------------------------------------------------------------------------------
# Chat


def describe_memory(model: Model) -> str:
    mem_len = model.config.mem_len
    chunk = f", chunk position {model.position % mem_len} of {mem_len}" if mem_len else ""
    return f"{model.position:,} tokens consumed{chunk}; file {model.memory_path}"


class Chat:
    """One chat session: a model with its memory open, and the sampling settings."""

    def __init__(self, model: Model, args: argparse.Namespace) -> None:
        self.model = model
        self.system = args.system
        self.max_tokens = args.max_tokens
        self.sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    def answer(self, message: str) -> Iterator[str]:
        """Stream the answer to `message`. The seed, if any, applies to the first answer."""
        stream = self.model.chat_stream(message, self.system, self.max_tokens, **self.sampling)
        self.sampling["seed"] = None
        return stream

    def save(self) -> None:
        self.model.save_memory()


def piped_turns(stream: TextIO) -> Iterator[str]:
    """Lines of standard input as text; invalid UTF-8 becomes U+FFFD, with one warning."""
    warned = False
    for raw in stream.buffer if hasattr(stream, "buffer") else stream:
        if isinstance(raw, bytes):
            line = raw.decode("utf-8", errors="replace")
            if "\ufffd" in line and not warned and b"\xef\xbf\xbd" not in raw:
                print(
                    "llama2rnn: warning: invalid UTF-8 in the input was replaced by U+FFFD",
                    file=sys.stderr,
                )
                warned = True
        else:
            line = raw
        yield line.rstrip("\r\n")


def run_piped(chat: Chat) -> int:
    for line in piped_turns(sys.stdin):
        if not line.strip():
            continue
        try:
            for piece in chat.answer(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
        except BaseException:
            # Ctrl-C, a closed pipe or an engine error ends the chat. The memory is saved on
            # the way out, so the cut-off answer gets its EOS first.
            chat.model.close_turn()
            raise
        chat.save()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens} is invalid: use 1 or more")
    model = open_model(args)
    chat = Chat(model, args)
    try:
        if sys.stdin.isatty() and sys.stdout.isatty():
            from .chat_terminal import run_terminal

            return run_terminal(chat)
        return run_piped(chat)
    finally:
        # Saved after every answer already; this covers /read, Ctrl-C and errors.
        try:
            chat.save()
        finally:
            model.close_memory()


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
