"""The `llama2rnn` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from . import _llama2rnn
from .model import DEFAULT_CHECKPOINT, Model, find_tokenizer
from .tokenizer import TokenizerError

# Failures that come from the user's input or files: reported in one line, exit status 1.
USER_ERRORS = (OSError, ValueError, RuntimeError, ArithmeticError, TokenizerError)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", type=Path, default=None,
        help="checkpoint file (default: the built-in model)",
    )
    parser.add_argument(
        "--tokenizer", "-z", type=Path, default=None,
        help="tokenizer.bin or sentencepiece .model (default: the one next to the checkpoint)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="worker threads (default: LLAMA2RNN_THREADS, else the CPUs available)",
    )
    parser.add_argument(
        "--mode", choices=("chunk", "token"), default="chunk",
        help="memory update after every chunk of M tokens (as trained) or after every token",
    )


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--temperature", "-t", type=float, default=1.0,
        help="sampling temperature; 0 picks the most likely token (default 1.0)",
    )
    parser.add_argument(
        "--top-p", "-p", type=float, default=0.9,
        help="nucleus sampling: keep the most likely tokens up to this probability mass; "
        "1 keeps all (default 0.9)",
    )
    parser.add_argument(
        "--seed", "-s", type=int, default=None,
        help="random seed, any integer from 0 to 2**64-1, for repeatable output "
        "(default: a fresh random seed)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2rnn",
        description="Run Llama2RNN recurrent language models, whose memory persists.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="continue a prompt and print the text")
    add_model_options(generate)
    add_sampling_options(generate)
    generate.add_argument("--prompt", "-i", default="", help="text to continue (default: empty)")
    generate.add_argument(
        "--steps", "-n", type=int, default=256,
        help="maximum number of tokens to generate (default 256)",
    )
    generate.set_defaults(run=run_generate)

    info = commands.add_parser("info", help="show a checkpoint's format and configuration")
    info.add_argument("model", type=Path, nargs="?", default=None, help="checkpoint file")
    info.set_defaults(run=run_info)
    return parser


def load_model(args: argparse.Namespace) -> Model:
    return Model.load(args.model, args.tokenizer, threads=args.threads, mode=args.mode)


def run_generate(args: argparse.Namespace) -> int:
    if args.steps < 0:
        raise ValueError(f"--steps {args.steps} is invalid: use 0 or more")
    model = load_model(args)
    start_position = model.position
    started = time.perf_counter()
    stream = model.generate_stream(
        args.prompt, args.steps, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    tokens = model.position - start_position
    rate = tokens / elapsed if elapsed > 0 else 0.0
    print(f"{tokens} tokens in {elapsed:.2f} s: {rate:.1f} tokens/s", file=sys.stderr)
    if not model.config.is_memory_model and model.position >= model.config.seq_len:
        print(
            f"stopped at the end of the context: this plain llama2.c model has seq_len "
            f"{model.config.seq_len}",
            file=sys.stderr,
        )
    return 0


def run_info(args: argparse.Namespace) -> int:
    path = args.model if args.model is not None else DEFAULT_CHECKPOINT
    engine = _llama2rnn.Engine(str(path), threads=1)
    config = engine.config
    kind = "Llama2RNN memory model" if config["mem_len"] else "plain llama2.c model"
    rows = [
        ("file", str(path)),
        ("format", f"{engine.format} ({kind})"),
        ("file size", f"{engine.file_size:,} bytes ({engine.file_size / 2**20:.1f} MiB)"),
        ("parameters", f"{engine.parameter_count:,}"),
        ("group size", str(engine.group_size) if engine.group_size else "none (fp32)"),
    ]
    rows += [(name, str(value)) for name, value in config.items()]
    tokenizer = find_tokenizer(Path(path))
    rows.append(("tokenizer", str(tokenizer) if tokenizer else "none next to the checkpoint"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        print(f"llama2rnn: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
