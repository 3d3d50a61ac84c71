"""Convert between the PyTorch model and the checkpoint weight dict, and export files.

A memory model is written as a Llama2RNN Q8_0 checkpoint. A plain model (mem_len 0)
is written as llama2.c version 2 (Q8_0) or version 1 (fp32). The tokenizer is
written beside the model as ``tokenizer.bin``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from llama2rnn.checkpoint import Config, write_llama2c_v1, write_llama2c_v2, write_llama2rnn

from .model import ModelArgs, Transformer

logger = logging.getLogger(__name__)

# Checkpoint name -> attribute path inside a layer, for stacked per-layer weights.
LAYER_WEIGHTS = {
    "rms_att": "attention_norm.weight",
    "rms_ffn": "ffn_norm.weight",
    "wq": "wq.weight",
    "wk": "wk.weight",
    "wv": "wv.weight",
    "wo": "wo.weight",
    "w1": "feed_forward.w1.weight",
    "w2": "feed_forward.w2.weight",
    "w3": "feed_forward.w3.weight",
}
MEMORY_LAYER_WEIGHTS = {
    "rms_mff": "memory_ffn_norm.weight",
    "aw1": "memory_ffn.w1.weight",
    "aw2": "memory_ffn.w2.weight",
    "aw3": "memory_ffn.w3.weight",
    "rms_mem": "memory_norm.weight",
    "ori_mem": "ori_mem",
}
FORMATS = ("auto", "llama2rnn", "llama2c-v2", "llama2c-v1")


def checkpoint_config(args: ModelArgs) -> Config:
    return Config(
        dim=args.dim,
        hidden_dim=args.hidden_dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        mem_len=args.mem_len,
    )


def model_args(config: Config) -> ModelArgs:
    return ModelArgs(
        dim=config.dim,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        vocab_size=config.vocab_size,
        hidden_dim=config.hidden_dim,
        seq_len=config.seq_len,
        mem_len=config.mem_len,
    )


def layer_names(args: ModelArgs) -> dict[str, str]:
    names = dict(LAYER_WEIGHTS)
    if args.mem_len > 0:
        names.update(MEMORY_LAYER_WEIGHTS)
    return names


def model_to_weights(model: Transformer) -> tuple[Config, dict[str, np.ndarray]]:
    """Return the checkpoint config and float32 weight dict of a model (classifier shared)."""
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    weights: dict[str, np.ndarray] = {
        "embedding": state["tok_embeddings.weight"],
        "rms_final": state["norm.weight"],
    }
    for name, attr in layer_names(model.args).items():
        weights[name] = np.stack([state[f"layers.{i}.{attr}"] for i in range(model.args.n_layers)])
    return checkpoint_config(model.args), {
        k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()
    }


def model_from_weights(config: Config, weights: Mapping[str, np.ndarray]) -> Transformer:
    """Build a model from a checkpoint config and weight dict (e.g. from ``read_checkpoint``)."""
    if "wcls" in weights:
        raise ValueError(
            "the PyTorch model ties the classifier to the embedding; weights with 'wcls' are not supported"
        )
    args = model_args(config)
    model = Transformer(args)
    state: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": torch.from_numpy(np.array(weights["embedding"], dtype=np.float32)),
        "norm.weight": torch.from_numpy(np.array(weights["rms_final"], dtype=np.float32)),
    }
    state["output.weight"] = state["tok_embeddings.weight"]
    for name, attr in layer_names(args).items():
        for i in range(args.n_layers):
            state[f"layers.{i}.{attr}"] = torch.from_numpy(
                np.array(weights[name][i], dtype=np.float32)
            )
    model.load_state_dict(state)
    return model.eval()


def write_tokenizer(
    out_dir: Path,
    tokenizer_model: Optional[str | os.PathLike[str]],
    data_dir: Optional[str | os.PathLike[str]],
) -> Optional[Path]:
    """Write ``tokenizer.bin`` into ``out_dir`` from a sentencepiece model or a data directory."""
    from llama2rnn.tokenizer import write_tokenizer_bin

    target = out_dir / "tokenizer.bin"
    if tokenizer_model is None and data_dir is not None:
        tokenizer_model = Path(data_dir) / "tokenizer.model"
    if tokenizer_model is not None and Path(tokenizer_model).exists():
        write_tokenizer_bin(str(tokenizer_model), str(target))
        return target
    if data_dir is not None and (Path(data_dir) / "tokenizer.bin").exists():
        shutil.copyfile(Path(data_dir) / "tokenizer.bin", target)
        return target
    logger.warning("no tokenizer written: %s not found", tokenizer_model)
    return None


def export_model(
    model: Transformer,
    out_path: str | os.PathLike[str],
    format: str = "auto",
    group_size: Optional[int] = None,
    seq_len: Optional[int] = None,
) -> dict[str, float]:
    """Write a model checkpoint; return the max quantization error per tensor (empty for fp32).

    ``auto`` picks ``llama2rnn`` for a memory model and ``llama2c-v2`` for a plain one.
    ``seq_len`` replaces the training sequence length in the header: the context a plain
    model may run to, with RoPE positions past those it was trained on.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    config, weights = model_to_weights(model)
    if seq_len is not None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        config = dataclasses.replace(config, seq_len=seq_len)
    if format == "auto":
        format = "llama2rnn" if config.mem_len > 0 else "llama2c-v2"
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if format == "llama2rnn":
        errors = write_llama2rnn(out_path, config, weights, group_size)
    elif format == "llama2c-v2":
        errors = write_llama2c_v2(out_path, config, weights, group_size)
    else:
        write_llama2c_v1(out_path, config, weights)
        errors = {}
    for name, error in sorted(errors.items()):
        logger.info(
            "max quantization error %-10s %.3e (max |w| %.3e)",
            name,
            error,
            float(np.abs(weights[name]).max()),
        )
    logger.info("wrote %s (%s, %s bytes)", out_path, format, f"{os.path.getsize(out_path):,}")
    return errors
