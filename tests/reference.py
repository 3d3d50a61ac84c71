"""Plain numpy forward pass of Llama2RNN and llama2.c models, used as ground truth.

The code follows the model definition one step at a time and favours readability over
speed. It computes in float64. Other tests compare the Rust engine against it, reading
the same checkpoint file through ``read_checkpoint``.

Memory model (mem_len M > 0). Each layer keeps M memory vectors and a key/value window
of 2M rows: rows 0..M-1 hold the memory keys/values and rows M..2M-1 the keys/values
of the current chunk. Token t has chunk position c = t mod M and is processed at RoPE
position M + c. Its attention output, taken before wo, becomes memory vector c of that
layer. The memory update turns memory vector s into key/value row s:

    m = memory[s] + aw2(silu(aw1 g) * aw3 g),  g = rmsnorm(memory[s], rms_mff)
    n = rmsnorm(m, rms_mem)
    row s = (RoPE(wk n, position s), wv n)

In "chunk" mode every slot is updated after the token with c == M-1. In "token" mode
slot c is updated right after token c. The initial state is ori_mem with every slot
updated.

Model without memory (mem_len 0): plain causal attention over all positions so far,
with RoPE at the absolute position, up to seq_len tokens.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional

import numpy as np

RMS_NORM_EPS = 1e-5
ROPE_BASE = 10000.0


def load_checkpoint_module() -> ModuleType:
    """Return ``llama2rnn.checkpoint``, loading the file directly if the package fails.

    Importing the package runs ``llama2rnn/__init__.py``, which may import the compiled
    extension. Without a built extension this falls back to loading
    ``python/llama2rnn/checkpoint.py`` from this repository on its own.
    """
    try:
        import llama2rnn.checkpoint as module

        return module
    except ImportError:
        pass
    name = "llama2rnn_checkpoint_standalone"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "python" / "llama2rnn" / "checkpoint.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses looks the module up in sys.modules while the file executes.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


checkpoint = load_checkpoint_module()


def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return weight * x / np.sqrt(np.mean(x * x) + RMS_NORM_EPS)


def silu(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


def rope(vector: np.ndarray, position: int, head_size: int) -> np.ndarray:
    """Rotate each pair (2j, 2j+1) of every head by position * 10000^(-2j/head_size)."""
    pairs = vector.reshape(-1, head_size // 2, 2)
    pair_index = np.arange(head_size // 2)
    angle = position * ROPE_BASE ** (-2.0 * pair_index / head_size)
    cos = np.cos(angle)
    sin = np.sin(angle)
    x0 = pairs[:, :, 0]
    x1 = pairs[:, :, 1]
    rotated = np.empty_like(pairs)
    rotated[:, :, 0] = x0 * cos - x1 * sin
    rotated[:, :, 1] = x0 * sin + x1 * cos
    return rotated.reshape(-1)


def softmax(scores: np.ndarray) -> np.ndarray:
    exponentials = np.exp(scores - np.max(scores))
    return exponentials / np.sum(exponentials)


class ReferenceModel:
    """Token-by-token forward pass of one model instance.

    ``weights`` is the float32 dict of ``llama2rnn.checkpoint``. For a Q8_0 checkpoint,
    pass the dequantized weights from ``read_checkpoint``: this class never quantizes
    weights itself. With ``quantize_activations`` the input vector of every matrix
    product is rounded through Q8_0 with ``group_size``, as the engine does for Q8_0
    checkpoints. The embedding lookup is never quantized.

    ``mode`` selects when memory slots are updated ("chunk" or "token") and is ignored
    for models without memory. ``pos`` is the number of tokens processed so far.
    """

    def __init__(
        self,
        config: checkpoint.Config,
        weights: Dict[str, np.ndarray],
        *,
        mode: str = "chunk",
        quantize_activations: bool = False,
        group_size: Optional[int] = None,
    ) -> None:
        checkpoint.validate_weights(config, weights)
        if mode not in ("chunk", "token"):
            raise ValueError(f"mode must be 'chunk' or 'token', got {mode!r}")
        if quantize_activations and group_size is None:
            raise ValueError("quantize_activations needs the checkpoint's group_size")
        if group_size is not None and (
            config.dim % group_size != 0 or config.hidden_dim % group_size != 0
        ):
            raise ValueError(
                f"group_size {group_size} must divide dim {config.dim} and "
                f"hidden_dim {config.hidden_dim}"
            )

        self.config = config
        self.mode = mode
        self.quantize_activations = quantize_activations
        self.group_size = group_size
        self.w = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}
        self.classifier = self.w["wcls"] if "wcls" in self.w else self.w["embedding"]
        self.pos = 0

        n_layers = config.n_layers
        if config.is_memory_model:
            window = 2 * config.mem_len
        else:
            window = config.seq_len
        self.key_cache = np.zeros((n_layers, window, config.kv_dim))
        self.value_cache = np.zeros((n_layers, window, config.kv_dim))

        if config.is_memory_model:
            self.memory = self.w["ori_mem"].copy()
            for layer in range(n_layers):
                for slot in range(config.mem_len):
                    self.update_memory_slot(layer, slot)

    def matmul(self, matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Return ``matrix @ x``, with ``x`` rounded through Q8_0 when activations are quantized."""
        if self.quantize_activations:
            assert self.group_size is not None
            q, scales = checkpoint.quantize_q8_0(x.astype(np.float32), self.group_size)
            x = checkpoint.dequantize_q8_0(q, scales, self.group_size).astype(np.float64)
        return matrix @ x

    def attention(self, layer: int, q: np.ndarray, n_rows: int) -> np.ndarray:
        """Attend with ``q`` over key/value rows 0..n_rows-1 of ``layer``, head by head."""
        head_size = self.config.head_size
        keys = self.key_cache[layer, :n_rows]
        values = self.value_cache[layer, :n_rows]
        output = np.zeros(self.config.dim)
        for head in range(self.config.n_heads):
            kv_head = head // self.config.kv_mul
            q_head = q[head * head_size : (head + 1) * head_size]
            k_head = keys[:, kv_head * head_size : (kv_head + 1) * head_size]
            v_head = values[:, kv_head * head_size : (kv_head + 1) * head_size]
            weights = softmax(k_head @ q_head / np.sqrt(head_size))
            output[head * head_size : (head + 1) * head_size] = weights @ v_head
        return output

    def update_memory_slot(self, layer: int, slot: int) -> None:
        """Compute key/value row ``slot`` of ``layer`` from memory vector ``slot``.

        The memory vector itself stays unchanged, because the FFN result only feeds the
        key and the value.
        """
        w = self.w
        m = self.memory[layer, slot]
        g = rmsnorm(m, w["rms_mff"][layer])
        gate = silu(self.matmul(w["aw1"][layer], g))
        up = self.matmul(w["aw3"][layer], g)
        m = m + self.matmul(w["aw2"][layer], gate * up)
        n = rmsnorm(m, w["rms_mem"][layer])
        k = self.matmul(w["wk"][layer], n)
        v = self.matmul(w["wv"][layer], n)
        self.key_cache[layer, slot] = rope(k, slot, self.config.head_size)
        self.value_cache[layer, slot] = v

    def forward(self, token: int) -> np.ndarray:
        """Process one token and return its float32 logits."""
        config = self.config
        if not 0 <= token < config.vocab_size:
            raise ValueError(f"token {token} is out of range for vocab_size {config.vocab_size}")
        if config.is_memory_model:
            chunk_position = self.pos % config.mem_len
            rope_position = config.mem_len + chunk_position
            cache_row = config.mem_len + chunk_position
        else:
            if self.pos >= config.seq_len:
                raise ValueError(f"position {self.pos} exceeds seq_len {config.seq_len}")
            chunk_position = 0
            rope_position = self.pos
            cache_row = self.pos

        w = self.w
        x = w["embedding"][token].copy()
        for layer in range(config.n_layers):
            xb = rmsnorm(x, w["rms_att"][layer])
            q = self.matmul(w["wq"][layer], xb)
            k = self.matmul(w["wk"][layer], xb)
            v = self.matmul(w["wv"][layer], xb)
            q = rope(q, rope_position, config.head_size)
            k = rope(k, rope_position, config.head_size)
            self.key_cache[layer, cache_row] = k
            self.value_cache[layer, cache_row] = v

            att = self.attention(layer, q, cache_row + 1)
            if config.is_memory_model:
                self.memory[layer, chunk_position] = att
            x = x + self.matmul(w["wo"][layer], att)

            h = rmsnorm(x, w["rms_ffn"][layer])
            gate = silu(self.matmul(w["w1"][layer], h))
            up = self.matmul(w["w3"][layer], h)
            x = x + self.matmul(w["w2"][layer], gate * up)

        logits = self.matmul(self.classifier, rmsnorm(x, w["rms_final"]))
        self.pos += 1

        if config.is_memory_model:
            if self.mode == "token":
                for layer in range(config.n_layers):
                    self.update_memory_slot(layer, chunk_position)
            elif chunk_position == config.mem_len - 1:
                for layer in range(config.n_layers):
                    for slot in range(config.mem_len):
                        self.update_memory_slot(layer, slot)
        return logits.astype(np.float32)
