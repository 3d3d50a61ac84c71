"""`llama2rnn eval`: loss against context length and memory horizon on held-out data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import evaluate
from .model import Model
from .train.data import Progress


def parse_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid: use comma-separated integers, for example 256,1024"
        ) from None


def parse_floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid: use comma-separated numbers, for example 1e-1,1e-2"
        ) from None


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to the `llama2rnn` command line."""
    default_contexts = ",".join(str(c) for c in evaluate.DEFAULT_CONTEXTS)
    default_thresholds = ",".join(f"{t:g}" for t in evaluate.DEFAULT_THRESHOLDS)
    parser = commands.add_parser(
        "eval",
        help="measure loss against context length and the memory horizon on held-out data",
        description="Measure a checkpoint on a prepared data directory "
        "(`python -m llama2rnn.train prepare`). Print markdown tables to stdout and progress "
        "to stderr. Each context length scores the same target spans with the context "
        "tokens right before them, every window from the initial state. A plain llama2.c "
        "model reports n/a where context + target exceeds its seq_len.",
    )
    parser.add_argument(
        "--model",
        "-m",
        type=Path,
        default=None,
        help="checkpoint file (default: the built-in model)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("runs/data"),
        help="prepared data directory (default: runs/data)",
    )
    parser.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="split to read (default: val, the held-out conversations)",
    )

    parser.add_argument(
        "--contexts",
        type=parse_ints,
        default=list(evaluate.DEFAULT_CONTEXTS),
        help=f"comma-separated context lengths in tokens (default {default_contexts})",
    )
    parser.add_argument(
        "--target",
        type=int,
        default=evaluate.DEFAULT_TARGET,
        help=f"tokens scored after each context (default {evaluate.DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--windows",
        type=int,
        default=evaluate.DEFAULT_WINDOWS,
        help="maximum number of target spans per stream, that is for the whole split and for "
        f"each long conversation (default {evaluate.DEFAULT_WINDOWS})",
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=evaluate.DEFAULT_LONG_TOKENS,
        help="the second table reads conversations longer than this many tokens "
        f"(default {evaluate.DEFAULT_LONG_TOKENS})",
    )

    parser.add_argument(
        "--horizon-positions",
        type=int,
        default=evaluate.DEFAULT_HORIZON_POSITIONS,
        help="places in the stream where a chunk is changed for the memory horizon; 0 skips "
        f"it (default {evaluate.DEFAULT_HORIZON_POSITIONS})",
    )
    parser.add_argument(
        "--horizon-chunks",
        type=int,
        default=evaluate.DEFAULT_HORIZON_CHUNKS,
        help=f"chunks followed after the changed chunk (default {evaluate.DEFAULT_HORIZON_CHUNKS})",
    )
    parser.add_argument(
        "--warmup-chunks",
        type=int,
        default=evaluate.DEFAULT_WARMUP_CHUNKS,
        help="chunks fed from the initial state before the changed chunk "
        f"(default {evaluate.DEFAULT_WARMUP_CHUNKS})",
    )
    parser.add_argument(
        "--thresholds",
        type=parse_floats,
        default=list(evaluate.DEFAULT_THRESHOLDS),
        help="comma-separated relative memory-key differences for the horizon "
        f"(default {default_thresholds})",
    )

    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="worker threads (default: LLAMA2RNN_THREADS, else 1 for checkpoints under 64 MiB "
        "and the CPUs available for larger ones)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write all numbers, per-run horizon curves included, to this JSON file",
    )
    parser.set_defaults(run=run_eval)


class SectionProgress:
    """Progress callback for one section: a bar on stderr, created once the total is known."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if total == 0:
            return
        if self.bar is None:
            self.bar = Progress(self.label, total)
        self.bar.update(done, "tokens")


def run_eval(args: argparse.Namespace) -> int:
    model = Model.load(args.model, threads=args.threads)
    data = evaluate.load_eval_data(args.data_dir, args.split, model.config.vocab_size)
    report = evaluate.evaluate_model(
        model,
        data,
        data_dir=str(args.data_dir),
        split=args.split,
        contexts=args.contexts,
        target=args.target,
        max_windows=args.windows,
        long_tokens=args.long_tokens,
        horizon_positions=args.horizon_positions,
        horizon_chunks=args.horizon_chunks,
        warmup_chunks=args.warmup_chunks,
        thresholds=args.thresholds,
        progress=SectionProgress,
    )
    sys.stdout.write(evaluate.format_report(report))
    sys.stdout.flush()
    print(f"evaluated in {report.seconds:.1f} s", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
