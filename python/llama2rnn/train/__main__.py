"""Command line: ``python -m llama2rnn.train {prepare,train,export,eval} ...``.

Typical run (the shipped default model)::

    python -m llama2rnn.train prepare --out-dir runs/data
    python -m llama2rnn.train train --data-dir runs/data --out-dir runs/default --max-minutes 55
    python -m llama2rnn.train export --checkpoint runs/default/ckpt.pt \\
        --out python/llama2rnn/models/default/model.bin --data-dir runs/data
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional, Sequence

from .trainer import TrainConfig

TRAIN_HELP = {
    "data_dir": "prepared data directory (from `prepare`)",
    "out_dir": "directory for ckpt.pt, metrics.jsonl and summary.json",
    "dim": "model width",
    "n_layers": "number of layers",
    "n_heads": "number of query heads",
    "n_kv_heads": "number of key/value heads (grouped-query attention when fewer than n_heads)",
    "hidden_dim": "feed-forward hidden width",
    "seq_len": "training sequence length in tokens (a multiple of mem_len)",
    "mem_len": "memory rows per layer and chunk length in tokens; 0 trains the plain-attention baseline",
    "batch_size": "sequences per micro-batch and process",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "optimizer steps of linear warmup",
    "weight_decay": "AdamW weight decay on matrices",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this value (0 disables clipping)",
    "max_steps": "optimizer steps to train (takes precedence over --max-tokens and --max-minutes)",
    "max_tokens": "training tokens (takes precedence over --max-minutes)",
    "max_minutes": "wall-clock budget in minutes: the schedule length is fitted to it after calibration",
    "calibrate_seconds": "seconds of training timed to fit the schedule to --max-minutes",
    "eval_interval": "optimizer steps between validation evaluations",
    "eval_tokens": "validation tokens per evaluation (fixed windows of seq_len)",
    "log_interval": "optimizer steps between progress lines",
    "checkpoint_interval": "optimizer steps between checkpoints",
    "resume": "resume from out_dir/ckpt.pt when it exists",
    "seed": "random seed for initialization and batch sampling",
    "threads": "PyTorch intra-op threads per process",
    "device": "auto, cpu or cuda",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not MISSING else None
        help_text = f"{TRAIN_HELP[field.name]} (default: {default})"
        if field.type in (bool, "bool"):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama2rnn.train",
        description="Prepare chat data, then train, export and evaluate Llama2RNN models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser(
        "prepare", help="render chitchat conversations, train the tokenizer, tokenize"
    )
    prepare.add_argument(
        "--out-dir", default="runs/data", help="output data directory (default: runs/data)"
    )
    prepare.add_argument(
        "--vocab-size", type=int, default=2048, help="tokenizer vocabulary size (default: 2048)"
    )
    prepare.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="fraction of conversations held out (default: 0.05)",
    )
    prepare.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split hash and the tokenizer trainer (default: 0)",
    )
    prepare.add_argument(
        "--limit", type=int, default=0, help="use only the first N conversations (0: all)"
    )

    train = sub.add_parser("train", help="train a model (under torchrun for DDP)")
    add_train_arguments(train)

    export = sub.add_parser("export", help="write a training checkpoint as an engine checkpoint")
    export.add_argument("--checkpoint", required=True, help="training checkpoint (ckpt.pt)")
    export.add_argument(
        "--out", required=True, help="output model file, e.g. models/default/model.bin"
    )
    export.add_argument(
        "--format",
        default="auto",
        choices=["auto", "llama2rnn", "llama2c-v2", "llama2c-v1"],
        help="auto: llama2rnn for a memory model, llama2c-v2 (Q8_0) for a plain one; llama2c-v1 is fp32",
    )
    export.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="Q8_0 group size (default: the writer's choice)",
    )
    export.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length written to the header (default: the training one); a longer one "
        "lets a plain model run past its training length",
    )
    export.add_argument(
        "--data-dir",
        default=None,
        help="data directory whose tokenizer.model is exported beside the model",
    )
    export.add_argument(
        "--tokenizer",
        default=None,
        help="sentencepiece tokenizer.model to export (overrides --data-dir)",
    )

    evaluate = sub.add_parser(
        "eval", help="report the loss of a training checkpoint on a split read as one stream"
    )
    evaluate.add_argument("--checkpoint", required=True, help="training checkpoint (ckpt.pt)")
    evaluate.add_argument(
        "--data-dir",
        default=None,
        help="prepared data directory (default: the one used in training)",
    )
    evaluate.add_argument(
        "--split", default="val", choices=["train", "val"], help="split to read (default: val)"
    )
    evaluate.add_argument(
        "--long-tokens",
        type=int,
        default=4096,
        help="also report conversations longer than this many tokens (default: 4096)",
    )
    evaluate.add_argument(
        "--threads", type=int, default=1, help="PyTorch intra-op threads (default: 1)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if args.command == "prepare":
        from .data import load_chitchat, prepare

        conversations = load_chitchat()
        if args.limit > 0:
            conversations = dict(list(conversations.items())[: args.limit])
        prepare(args.out_dir, conversations, args.vocab_size, args.val_fraction, args.seed)
    elif args.command == "train":
        from .trainer import train

        values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
        train(TrainConfig(**values))
    elif args.command == "export":
        from .export import export_model, write_tokenizer
        from .trainer import load_checkpoint, model_from_checkpoint

        state = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(state)
        export_model(model, args.out, args.format, args.group_size, args.seq_len)
        data_dir = args.data_dir or state.get("data", {}).get("data_dir")
        write_tokenizer(Path(args.out).parent, args.tokenizer, data_dir)
    elif args.command == "eval":
        import json

        import torch

        from .trainer import evaluate_split, load_checkpoint, model_from_checkpoint

        torch.set_num_threads(args.threads)
        state = load_checkpoint(args.checkpoint)
        data_dir = args.data_dir or state["data"]["data_dir"]
        result = evaluate_split(
            model_from_checkpoint(state),
            data_dir,
            args.split,
            args.long_tokens,
            torch.device("cpu"),
        )
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
