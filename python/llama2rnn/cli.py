"""The `llama2rnn` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from . import _llama2rnn
from . import memory as memory_store
from .chat_cli import add_chat_commands
from .eval_cli import add_eval_command
from .model import DEFAULT_CHECKPOINT, Model, find_tokenizer
from .tokenizer import TokenizerError

# Failures that come from the user's input or files: reported in one line, exit status 1.
USER_ERRORS = (OSError, ValueError, RuntimeError, ArithmeticError, TokenizerError)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        type=Path,
        default=None,
        help="checkpoint file (default: the built-in model)",
    )
    parser.add_argument(
        "--tokenizer",
        "-z",
        type=Path,
        default=None,
        help="tokenizer.bin or sentencepiece .model (default: the one next to the checkpoint)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="worker threads (default: LLAMA2RNN_THREADS, else 1 for checkpoints under 64 MiB "
        "and the CPUs available for larger ones)",
    )
    parser.add_argument(
        "--mode",
        choices=("chunk", "token"),
        default="chunk",
        help="memory update after every chunk of M tokens (as trained) or after every token",
    )


def add_sampling_options(parser: argparse.ArgumentParser, temperature: float = 1.0) -> None:
    parser.add_argument(
        "--temperature",
        "-t",
        type=float,
        default=temperature,
        help=f"sampling temperature; 0 picks the most likely token (default {temperature})",
    )
    parser.add_argument(
        "--top-p",
        "-p",
        type=float,
        default=0.9,
        help="nucleus sampling: keep the most likely tokens up to this probability mass; "
        "1 keeps all (default 0.9)",
    )
    parser.add_argument(
        "--seed",
        "-s",
        type=int,
        default=None,
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
        "--steps",
        "-n",
        type=int,
        default=256,
        help="maximum number of tokens to generate (default 256)",
    )
    generate.add_argument(
        "--memory",
        metavar="NAME",
        help="continue from this saved memory (a name, or a path with '/' or ending in .mem), "
        "create it if missing, and save it at the end; it stays locked while running",
    )
    generate.add_argument(
        "--reset",
        action="store_true",
        help="with --memory: start from the model's initial state and replace the saved memory",
    )
    generate.set_defaults(run=run_generate)

    info = commands.add_parser("info", help="show a checkpoint's format and configuration")
    info.add_argument("model", type=Path, nargs="?", default=None, help="checkpoint file")
    info.set_defaults(run=run_info)

    add_chat_commands(commands, add_model_options, add_sampling_options)
    add_eval_command(commands)
    add_memory_commands(commands)
    return parser


def add_memory_commands(commands: argparse._SubParsersAction) -> None:
    memory = commands.add_parser(
        "memory",
        help="list, inspect, copy, delete, export and import saved memories",
        description="Manage saved memories: memories/NAME.mem in the data folder "
        "($LLAMA2RNN_HOME, else $XDG_DATA_HOME/llama2rnn, else ~/.local/share/llama2rnn). "
        "Wherever a NAME is expected, a path containing '/' or ending in .mem also works.",
    )
    actions = memory.add_subparsers(dest="memory_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="list the saved memories")
    listing.set_defaults(run=run_memory_list)

    show = actions.add_parser("show", help="show a memory's header and check its checksum")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(run=run_memory_show)

    fork = actions.add_parser("fork", help="copy a memory under a new name")
    fork.add_argument("name", metavar="NAME")
    fork.add_argument("new_name", metavar="NEW")
    fork.set_defaults(run=run_memory_fork)

    remove = actions.add_parser("rm", help="delete a memory")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument(
        "--yes", "-y", action="store_true", help="delete without asking for confirmation"
    )
    remove.set_defaults(run=run_memory_rm)

    export = actions.add_parser("export", help="copy a memory to a file")
    export.add_argument("name", metavar="NAME")
    export.add_argument("file", metavar="FILE", type=Path)
    export.set_defaults(run=run_memory_export)

    import_ = actions.add_parser("import", help="store a memory file under a name")
    import_.add_argument("file", metavar="FILE", type=Path)
    import_.add_argument("name", metavar="NAME")
    import_.set_defaults(run=run_memory_import)

    import_raw = actions.add_parser(
        "import-raw",
        help="store a raw memory dump of the original C runtime under a name",
        description="Convert a raw memory dump of the original C runtime (mem, key cache, "
        "value cache, position) for the model given with --model, and store it under NAME. "
        "The dump has no logits, so the first use feeds a prompt before sampling.",
    )
    import_raw.add_argument("file", metavar="FILE", type=Path)
    import_raw.add_argument("name", metavar="NAME")
    add_model_options(import_raw)
    import_raw.set_defaults(run=run_memory_import_raw)


def load_model(args: argparse.Namespace) -> Model:
    return Model.load(args.model, args.tokenizer, threads=args.threads, mode=args.mode)


def run_generate(args: argparse.Namespace) -> int:
    if args.steps < 0:
        raise ValueError(f"--steps {args.steps} is invalid: use 0 or more")
    if args.reset and args.memory is None:
        raise ValueError("--reset needs --memory NAME: it starts that memory over")
    model = load_model(args)
    try:
        if args.memory is not None:
            model.open_memory(args.memory, reset=args.reset)
        generate_text(model, args)
        if args.memory is not None:
            path = model.save_memory()
            print(f"saved {args.memory!r} at {model.position} tokens: {path}", file=sys.stderr)
    finally:
        # An interrupted or failed run leaves the saved memory as it was before the run.
        model.close_memory()
    return 0


def generate_text(model: Model, args: argparse.Namespace) -> None:
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


def run_info(args: argparse.Namespace) -> int:
    path = args.model if args.model is not None else DEFAULT_CHECKPOINT
    if args.model is None and not path.is_file():
        raise FileNotFoundError(
            f"the built-in default model is missing from this installation ({path}); "
            "pass a checkpoint path or reinstall llama2rnn"
        )
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


def format_size(size: int) -> str:
    if size < 2**20:
        return f"{size / 2**10:.1f} KiB"
    return f"{size / 2**20:.1f} MiB"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def run_memory_list(args: argparse.Namespace) -> int:
    folder = memory_store.memories_dir()
    listings = memory_store.list_memories(folder)
    if not listings:
        print(f"no memories in {folder}")
        return 0
    rows = [("NAME", "MODEL", "TOKENS", "LAST SAVED", "SIZE")]
    for item in listings:
        if item.header is None:
            rows.append((item.name, str(item.error), "-", "-", format_size(item.size)))
            continue
        header = item.header
        rows.append(
            (
                item.name,
                header.summary(),
                f"{header.position:,}",
                memory_store.format_saved_time(header.saved_unix_ms),
                format_size(item.size),
            )
        )
    print_table(rows)
    return 0


def run_memory_show(args: argparse.Namespace) -> int:
    location = memory_store.locate(args.name)
    data = memory_store.read_memory(location)
    header = memory_store.check_memory_bytes(data, location.label)
    config = header.config
    rows = [
        ("memory", location.name if location.name is not None else str(location.path)),
        ("file", str(location.path)),
        ("size", f"{len(data):,} bytes ({format_size(len(data))}), checksum valid"),
        ("format version", str(header.version)),
        ("checkpoint format", header.format),
        ("update mode", header.mode),
        ("group size", str(header.group_size) if header.group_size else "none (fp32)"),
        ("shared classifier", "yes" if header.shared_classifier else "no"),
        ("weights fingerprint", f"{header.fingerprint:016x}"),
        ("tokens consumed", f"{header.position:,}"),
    ]
    if header.is_memory_model:
        rows.append(("chunk position", f"{header.chunk_rows} of {config['mem_len']}"))
    last = header.last_token
    rows.append(("last token", str(last) if last is not None else "none"))
    rows.append(("last saved", memory_store.format_saved_time(header.saved_unix_ms)))
    holder = memory_store.lock_holder(location)
    rows.append(("in use", f"by {holder}" if holder is not None else "no"))
    rows += [(name, str(value)) for name, value in config.items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def run_memory_fork(args: argparse.Namespace) -> int:
    source = memory_store.locate(args.name)
    target = memory_store.locate(args.new_name)
    data = memory_store.read_memory(source)
    memory_store.check_memory_bytes(data, source.label)
    memory_store.store_new(target, data)
    print(f"copied {source.label} to {target.label} ({target.path})")
    return 0


def confirm(question: str) -> bool:
    """Ask a yes/no question on the terminal; anything but y or yes is no."""
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def run_memory_rm(args: argparse.Namespace) -> int:
    location = memory_store.locate(args.name)
    if not location.path.exists():
        raise memory_store.not_found_error(location)
    if not args.yes and not sys.stdin.isatty():
        raise ValueError(
            f"not deleting {location.label} without confirmation: stdin is not a terminal, "
            "so pass --yes to delete it"
        )
    with memory_store.MemoryWriter.open(location) as writer:
        if not args.yes and not confirm(f"Delete {location.label} ({location.path})?"):
            print("not deleted")
            return 1
        writer.remove()
    print(f"deleted {location.label}")
    return 0


def run_memory_export(args: argparse.Namespace) -> int:
    source = memory_store.locate(args.name)
    target = memory_store.MemoryLocation(args.file.expanduser().absolute())
    data = memory_store.read_memory(source)
    memory_store.check_memory_bytes(data, source.label)
    memory_store.store_new(target, data)
    print(f"exported {source.label} to {target.path}")
    return 0


def run_memory_import(args: argparse.Namespace) -> int:
    source = memory_store.MemoryLocation(args.file.expanduser().absolute())
    target = memory_store.locate(args.name)
    data = memory_store.read_memory(source)
    memory_store.check_memory_bytes(data, str(source.path))
    memory_store.store_new(target, data)
    print(f"imported {source.path} as {target.label}")
    return 0


def run_memory_import_raw(args: argparse.Namespace) -> int:
    target = memory_store.locate(args.name)
    model = load_model(args)
    model.import_raw_memory(args.file)
    model.save_memory(args.name)
    print(f"imported raw dump {args.file} as {target.label} at {model.position} tokens")
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
