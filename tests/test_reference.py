"""Self-tests of the checkpoint writers and reader and of the numpy reference model.

No engine is needed. The reference model is checked against a second, batched
formulation written below with matrices over whole chunks, so that an indexing mistake
in the token loop of ``reference.py`` shows up as a mismatch.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

from reference import ReferenceModel, checkpoint

Config = checkpoint.Config

MEMORY_GQA = Config(
    dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=37, seq_len=20, mem_len=5
)
MEMORY_MHA = Config(
    dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=16, seq_len=8, mem_len=3
)
VANILLA_GQA = Config(
    dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=37, seq_len=20
)
VANILLA_MHA = Config(
    dim=32, hidden_dim=80, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=11, seq_len=6
)

WRITERS: Dict[str, Callable[..., Optional[Dict[str, float]]]] = {
    "llama2rnn": checkpoint.write_llama2rnn,
    "llama2c-v2": checkpoint.write_llama2c_v2,
    "llama2c-v1": checkpoint.write_llama2c_v1,
    "llama2c-v0": checkpoint.write_llama2c_v0,
}
Q8_FORMATS = ("llama2rnn", "llama2c-v2")

ROUND_TRIP_CASES = [
    ("llama2rnn", MEMORY_GQA, True),
    ("llama2rnn", MEMORY_GQA, False),
    ("llama2rnn", MEMORY_MHA, True),
    ("llama2rnn", MEMORY_MHA, False),
    ("llama2c-v2", VANILLA_GQA, True),
    ("llama2c-v2", VANILLA_GQA, False),
    ("llama2c-v2", VANILLA_MHA, False),
    ("llama2c-v1", VANILLA_GQA, True),
    ("llama2c-v1", VANILLA_GQA, False),
    ("llama2c-v1", VANILLA_MHA, True),
    ("llama2c-v0", VANILLA_GQA, True),
    ("llama2c-v0", VANILLA_GQA, False),
    ("llama2c-v0", VANILLA_MHA, False),
]


def write(format_name: str, path: Path, config: Config, weights: Dict[str, np.ndarray], **kwargs):
    return WRITERS[format_name](path, config, weights, **kwargs)


def q8_round_trip(values: np.ndarray, group_size: int) -> np.ndarray:
    q, scales = checkpoint.quantize_q8_0(values, group_size)
    return checkpoint.dequantize_q8_0(q, scales, group_size).reshape(values.shape)


# ---------------------------------------------------------------------------
# Q8_0


def test_quantize_rounds_ties_away_from_zero():
    # max 127 gives scale exactly 1, so x / scale is exact and the halves are true ties.
    values = np.zeros(8, dtype=np.float32)
    values[:7] = [127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5]
    q, scales = checkpoint.quantize_q8_0(values, 8)
    assert scales.tolist() == [1.0]
    assert q.dtype == np.int8
    assert q.tolist() == [127, 1, -1, 2, -2, 3, -3, 0]


def test_quantize_ties_with_non_unit_scale():
    # max 254 gives scale exactly 2, so 1.0 and 5.0 are ties at 0.5 and 2.5.
    values = np.array([-254.0, 1.0, -1.0, 5.0, -5.0, 3.0, 0.9, -1.1], dtype=np.float32)
    q, scales = checkpoint.quantize_q8_0(values, 8)
    assert scales.tolist() == [2.0]
    assert q.tolist() == [-127, 1, -1, 3, -3, 2, 0, -1]


def test_quantize_zero_group():
    values = np.concatenate([np.zeros(4), np.array([0.0, 3.0, -1.0, 0.5])]).astype(np.float32)
    with np.errstate(all="raise"):
        q, scales = checkpoint.quantize_q8_0(values, 4)
        restored = checkpoint.dequantize_q8_0(q, scales, 4)
    assert scales[0] == 0.0
    assert q[:4].tolist() == [0, 0, 0, 0]
    assert restored[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert scales[1] == np.float32(3.0) / np.float32(127)


def test_quantize_error_within_half_step():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 32)).astype(np.float32)
    q, scales = checkpoint.quantize_q8_0(values, 16)
    restored = checkpoint.dequantize_q8_0(q, scales, 16).reshape(6, 32)
    groups = values.reshape(-1, 16)
    assert np.allclose(scales, np.max(np.abs(groups), axis=1) / 127, rtol=1e-7, atol=0)
    assert np.max(np.abs(q.astype(int))) == 127
    step = np.repeat(scales, 16).reshape(6, 32)
    assert np.all(np.abs(restored - values) <= 0.5 * step * (1 + 1e-5))


def test_quantize_rejects_partial_group():
    with pytest.raises(ValueError, match="multiple of the group size"):
        checkpoint.quantize_q8_0(np.ones(10, dtype=np.float32), 4)


def test_quantize_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        checkpoint.quantize_q8_0(np.array([1.0, np.nan], dtype=np.float32), 2)


@pytest.mark.parametrize(
    "dim, hidden_dim, expected",
    [(48, 96, 16), (288, 768, 32), (64, 128, 64), (512, 1376, 32), (30, 60, 2), (15, 45, 1)],
)
def test_default_group_size(dim: int, hidden_dim: int, expected: int):
    config = Config(dim, hidden_dim, 1, 1, 1, 4, 4)
    assert checkpoint.default_group_size(config) == expected


# ---------------------------------------------------------------------------
# Writers and reader


@pytest.mark.parametrize("format_name, config, shared", ROUND_TRIP_CASES)
def test_round_trip(tmp_path: Path, format_name: str, config: Config, shared: bool):
    weights = checkpoint.random_weights(config, seed=3, shared_classifier=shared)
    path = tmp_path / "model.bin"
    errors = write(format_name, path, config, weights)

    read_format, read_config, read_weights, group_size = checkpoint.read_checkpoint(path)
    assert read_format == format_name
    assert read_config == config
    assert set(read_weights) == set(weights)
    expected_group_size = (
        checkpoint.default_group_size(config) if format_name in Q8_FORMATS else None
    )
    assert group_size == expected_group_size
    assert os.path.getsize(path) == checkpoint.checkpoint_size(
        format_name, config, shared, group_size
    )

    for name, original in weights.items():
        restored = read_weights[name]
        assert restored.dtype == np.float32, name
        assert restored.shape == original.shape, name
        if format_name not in Q8_FORMATS or name.startswith("rms_") or name == "ori_mem":
            assert np.array_equal(restored, original), name
            continue
        # Each layer is a separate tensor, so groups never straddle two layers.
        assert group_size is not None
        if original.ndim == 3:
            expected = np.stack([q8_round_trip(layer, group_size) for layer in original])
        else:
            expected = q8_round_trip(original, group_size)
        assert np.array_equal(restored, expected), name
        assert errors is not None
        assert errors[name] == pytest.approx(float(np.max(np.abs(restored - original)))), name

    if format_name in Q8_FORMATS:
        assert errors is not None
        assert set(errors) == {n for n in weights if n.startswith("w") or n.startswith("aw")} | {
            "embedding"
        }
    else:
        assert errors is None


def test_checkpoint_size_by_hand():
    # Header 256. fp32: 4 * (4 norms * 2 layers * 48 + ori_mem 2 * 5 * 48 + 48) = 3648.
    # Q8_0 with group 16 costs 1.25 bytes per value: embedding 37 * 48 -> 2220, and per
    # layer wq + wk + wv + wo + six FFN matrices = 2304 + 1152 + 1152 + 2304 + 6 * 4608
    # = 34560 values -> 43200 bytes.
    size = checkpoint.checkpoint_size("llama2rnn", MEMORY_GQA, True, 16)
    assert size == 256 + 3648 + 2220 + 2 * 43200
    separate = checkpoint.checkpoint_size("llama2rnn", MEMORY_GQA, False, 16)
    assert separate == size + 2220
    # v1: header 256, then fp32 norms (2 * 2 * 48 + 48), embedding 37 * 48 and per layer
    # 2 * 2304 + 2 * 768 + 3 * 4608 values.
    v1_values = 240 + 1776 + 2 * (4608 + 1536 + 13824)
    assert checkpoint.checkpoint_size("llama2c-v1", VANILLA_GQA, True, None) == 256 + 4 * v1_values
    # v0 adds the two RoPE tables of 20 * 4 values and has a 28-byte header.
    v0_size = checkpoint.checkpoint_size("llama2c-v0", VANILLA_GQA, True, None)
    assert v0_size == 28 + 4 * (v1_values + 2 * 20 * 4)


def test_llama2rnn_header_layout(tmp_path: Path):
    weights = checkpoint.random_weights(MEMORY_GQA, seed=1, shared_classifier=False)
    path = tmp_path / "model.bin"
    checkpoint.write_llama2rnn(path, MEMORY_GQA, weights, group_size=8)
    data = path.read_bytes()
    assert struct.unpack_from("<Ii", data, 0) == (0x616B3432, 2)
    assert struct.unpack_from("<8i", data, 8) == (48, 96, 2, 6, 3, 37, 20, 5)
    assert data[40] == 0
    assert struct.unpack_from("<i", data, 41) == (8,)
    assert data[45:256] == bytes(211)


def test_llama2c_v2_header_layout(tmp_path: Path):
    weights = checkpoint.random_weights(VANILLA_GQA, seed=1)
    path = tmp_path / "model.bin"
    checkpoint.write_llama2c_v2(path, VANILLA_GQA, weights)
    data = path.read_bytes()
    assert struct.unpack_from("<Ii7i", data, 0) == (0x616B3432, 2, 48, 96, 2, 6, 2, 37, 20)
    assert data[36] == 1
    assert struct.unpack_from("<i", data, 37) == (16,)
    assert data[41:256] == bytes(215)


def test_llama2c_v1_header_layout(tmp_path: Path):
    weights = checkpoint.random_weights(VANILLA_GQA, seed=1, shared_classifier=False)
    path = tmp_path / "model.bin"
    checkpoint.write_llama2c_v1(path, VANILLA_GQA, weights)
    data = path.read_bytes()
    assert struct.unpack_from("<Ii7i", data, 0) == (0x616B3432, 1, 48, 96, 2, 6, 2, 37, 20)
    assert data[36] == 0
    assert data[37:256] == bytes(219)
    rms_att = np.frombuffer(data, dtype="<f4", count=2 * 48, offset=256)
    assert np.array_equal(rms_att, weights["rms_att"].reshape(-1))


# File contents after the header, written out independently of the layout tables in
# checkpoint.py: the fp32 arrays in order, then the Q8_0 tensors in order. "rope" is the
# pair of unused RoPE tables of the legacy format.
EXPECTED_ORDER: Dict[str, Tuple[List[str], List[str]]] = {
    "llama2rnn": (
        ["rms_att", "rms_ffn", "rms_mem", "rms_mff", "ori_mem", "rms_final"],
        ["embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "aw1", "aw2", "aw3", "wcls"],
    ),
    "llama2c-v2": (
        ["rms_att", "rms_ffn", "rms_final"],
        ["embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"],
    ),
    "llama2c-v1": (
        ["rms_att", "rms_ffn", "rms_final", "embedding", "wq", "wk", "wv", "wo", "w1", "w2"]
        + ["w3", "wcls"],
        [],
    ),
    "llama2c-v0": (
        ["embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"]
        + ["rms_final", "rope", "wcls"],
        [],
    ),
}


def expected_body(format_name: str, config: Config, weights, group_size: Optional[int]) -> bytes:
    """Build the bytes after the header: fp32 arrays whole, Q8_0 tensors layer by layer."""
    fp32_names, q8_names = EXPECTED_ORDER[format_name]
    entries = [(name, False) for name in fp32_names] + [(name, True) for name in q8_names]
    parts = []
    for name, is_q8 in entries:
        if name == "wcls" and "wcls" not in weights:
            continue
        if name == "rope":
            # Two tables of seq_len * head_size / 2 floats: cos, then sin.
            j = np.arange(config.head_size // 2)
            angles = np.arange(config.seq_len)[:, None] * 10000.0 ** (-2.0 * j / config.head_size)
            parts.append(np.cos(angles).astype("<f4").tobytes())
            parts.append(np.sin(angles).astype("<f4").tobytes())
            continue
        array = weights[name]
        if not is_q8:
            parts.append(array.astype("<f4").tobytes())
            continue
        assert group_size is not None
        tensors = list(array) if array.ndim == 3 else [array]
        for tensor in tensors:
            q, scales = checkpoint.quantize_q8_0(tensor, group_size)
            parts.append(q.tobytes())
            parts.append(scales.astype("<f4").tobytes())
    return b"".join(parts)


@pytest.mark.parametrize("format_name, config, shared", ROUND_TRIP_CASES)
def test_file_body_layout(tmp_path: Path, format_name: str, config: Config, shared: bool):
    weights = checkpoint.random_weights(config, seed=2, shared_classifier=shared)
    path = tmp_path / "model.bin"
    write(format_name, path, config, weights)
    data = path.read_bytes()
    group_size = checkpoint.default_group_size(config) if format_name in Q8_FORMATS else None
    header_size = 28 if format_name == "llama2c-v0" else 256
    body = data[header_size:]
    expected = expected_body(format_name, config, weights, group_size)
    assert len(body) == len(expected)
    assert body == expected


def test_v0_separate_classifier_negates_vocab(tmp_path: Path):
    for shared, expected_vocab in ((True, 37), (False, -37)):
        weights = checkpoint.random_weights(VANILLA_GQA, seed=4, shared_classifier=shared)
        path = tmp_path / f"shared_{shared}.bin"
        checkpoint.write_llama2c_v0(path, VANILLA_GQA, weights)
        data = path.read_bytes()
        assert struct.unpack_from("<7i", data, 0) == (48, 96, 2, 6, 2, expected_vocab, 20)
        _, config, read_weights, _ = checkpoint.read_checkpoint(path)
        assert config.vocab_size == 37
        assert ("wcls" in read_weights) == (not shared)


def test_v0_layout_and_rope_tables(tmp_path: Path):
    config = VANILLA_MHA
    weights = checkpoint.random_weights(config, seed=5, shared_classifier=False)
    path = tmp_path / "model.bin"
    checkpoint.write_llama2c_v0(path, config, weights)
    data = path.read_bytes()
    embedding = np.frombuffer(data, dtype="<f4", count=weights["embedding"].size, offset=28)
    assert np.array_equal(embedding, weights["embedding"].reshape(-1))

    classifier_bytes = 4 * weights["wcls"].size
    table_values = config.seq_len * config.head_size // 2
    table_offset = len(data) - classifier_bytes - 8 * table_values
    tables = np.frombuffer(data, dtype="<f4", count=2 * table_values, offset=table_offset)
    cos_table = tables[:table_values].reshape(config.seq_len, -1)
    sin_table = tables[table_values:].reshape(config.seq_len, -1)
    assert np.allclose(cos_table[0], 1.0)
    assert np.allclose(sin_table[0], 0.0)
    assert cos_table[3, 0] == pytest.approx(np.cos(3.0), abs=1e-6)
    assert sin_table[2, 1] == pytest.approx(np.sin(2.0 * 10000 ** (-2 / 16)), abs=1e-6)

    classifier = np.frombuffer(data, dtype="<f4", offset=len(data) - classifier_bytes)
    assert np.array_equal(classifier, weights["wcls"].reshape(-1))


@pytest.mark.parametrize("format_name", ["llama2rnn", "llama2c-v2", "llama2c-v1", "llama2c-v0"])
def test_reader_rejects_truncated_file(tmp_path: Path, format_name: str):
    config = MEMORY_MHA if format_name == "llama2rnn" else VANILLA_MHA
    path = tmp_path / "model.bin"
    write(format_name, path, config, checkpoint.random_weights(config, seed=0))
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(ValueError, match="bytes"):
        checkpoint.read_checkpoint(path)


def test_reader_rejects_unknown_version(tmp_path: Path):
    path = tmp_path / "model.bin"
    checkpoint.write_llama2c_v1(path, VANILLA_MHA, checkpoint.random_weights(VANILLA_MHA, seed=0))
    data = bytearray(path.read_bytes())
    struct.pack_into("<i", data, 4, 3)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="unsupported checkpoint version 3"):
        checkpoint.read_checkpoint(path)


def test_reader_rejects_garbage(tmp_path: Path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"not a checkpoint at all, just some text bytes")
    with pytest.raises(ValueError):
        checkpoint.read_checkpoint(path)


def test_writer_rejects_wrong_shape(tmp_path: Path):
    weights = checkpoint.random_weights(MEMORY_GQA, seed=0)
    weights["wk"] = np.zeros((2, 48, 48), dtype=np.float32)
    with pytest.raises(ValueError, match=r"'wk' has shape \(2, 48, 48\), expected \(2, 24, 48\)"):
        checkpoint.write_llama2rnn(tmp_path / "model.bin", MEMORY_GQA, weights)


def test_writer_rejects_missing_weight(tmp_path: Path):
    weights = checkpoint.random_weights(MEMORY_GQA, seed=0)
    del weights["aw2"]
    with pytest.raises(ValueError, match=r"missing \['aw2'\]"):
        checkpoint.write_llama2rnn(tmp_path / "model.bin", MEMORY_GQA, weights)


def test_llama2c_writer_rejects_memory_model(tmp_path: Path):
    weights = checkpoint.random_weights(MEMORY_GQA, seed=0)
    for format_name in ("llama2c-v2", "llama2c-v1", "llama2c-v0"):
        with pytest.raises(ValueError, match="needs mem_len 0"):
            write(format_name, tmp_path / "model.bin", MEMORY_GQA, weights)


def test_llama2rnn_writer_rejects_vanilla_model(tmp_path: Path):
    weights = checkpoint.random_weights(VANILLA_GQA, seed=0)
    with pytest.raises(ValueError, match="needs mem_len > 0"):
        checkpoint.write_llama2rnn(tmp_path / "model.bin", VANILLA_GQA, weights)


def test_writer_rejects_bad_group_size(tmp_path: Path):
    weights = checkpoint.random_weights(MEMORY_GQA, seed=0)
    with pytest.raises(ValueError, match="group_size 32 must divide dim 48"):
        checkpoint.write_llama2rnn(tmp_path / "model.bin", MEMORY_GQA, weights, group_size=32)


def test_config_validate_rejects_odd_head_size():
    with pytest.raises(ValueError, match="head_size 3 must be even"):
        Config(12, 24, 1, 4, 4, 8, 8).validate()


def test_config_properties():
    assert MEMORY_GQA.head_size == 8
    assert MEMORY_GQA.kv_dim == 24
    assert MEMORY_GQA.kv_mul == 2
    assert MEMORY_GQA.is_memory_model
    assert not VANILLA_GQA.is_memory_model


# ---------------------------------------------------------------------------
# Batched formulation of the model, independent of reference.py


class Batched:
    """Whole-chunk matrix formulation of the model, used to cross-check the token loop.

    Rows of every matrix are tokens (or memory slots). RoPE uses complex multiplication
    and attention uses an explicit mask, unlike the reference.
    """

    def __init__(self, config: Config, weights: Dict[str, np.ndarray], group_size: Optional[int]):
        self.config = config
        self.w = {name: value.astype(np.float64) for name, value in weights.items()}
        self.group_size = group_size

    def linear(self, rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        if self.group_size is not None:
            group_size = self.group_size
            rows = np.stack([q8_round_trip(row.astype(np.float32), group_size) for row in rows])
        return rows.astype(np.float64) @ matrix.T

    @staticmethod
    def norm(rows: np.ndarray, weight: np.ndarray) -> np.ndarray:
        inverse_rms = 1.0 / np.sqrt(np.mean(rows**2, axis=1, keepdims=True) + 1e-5)
        return rows * inverse_rms * weight

    def rotate(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        head_size = self.config.head_size
        n_heads = rows.shape[1] // head_size
        frequencies = 1.0 / 10000.0 ** (np.arange(0, head_size, 2) / head_size)
        phase = np.exp(1j * np.outer(positions, np.tile(frequencies, n_heads)))
        as_complex = rows[:, 0::2] + 1j * rows[:, 1::2]
        rotated = as_complex * phase
        result = np.empty_like(rows)
        result[:, 0::2] = rotated.real
        result[:, 1::2] = rotated.imag
        return result

    def swiglu(self, rows: np.ndarray, up1: np.ndarray, down: np.ndarray, up3: np.ndarray):
        a = self.linear(rows, up1)
        gated = a / (1.0 + np.exp(-a)) * self.linear(rows, up3)
        return self.linear(gated, down)

    def memory_keys_values(self, layer: int, memory: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        w = self.w
        g = self.norm(memory, w["rms_mff"][layer])
        updated = memory + self.swiglu(g, w["aw1"][layer], w["aw2"][layer], w["aw3"][layer])
        normed = self.norm(updated, w["rms_mem"][layer])
        keys = self.rotate(self.linear(normed, w["wk"][layer]), np.arange(len(memory)))
        values = self.linear(normed, w["wv"][layer])
        return keys, values

    def attend(self, queries, keys, values, allowed: np.ndarray) -> np.ndarray:
        """Run masked multi-head attention, where query i attends to key j iff ``allowed[i, j]``."""
        config = self.config
        head_size = config.head_size
        output = np.zeros((len(queries), config.dim))
        for head in range(config.n_heads):
            kv = (head // config.kv_mul) * head_size
            q = queries[:, head * head_size : (head + 1) * head_size]
            scores = q @ keys[:, kv : kv + head_size].T / np.sqrt(head_size)
            scores = np.where(allowed, scores, -np.inf)
            probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            output[:, head * head_size : (head + 1) * head_size] = (
                probabilities @ values[:, kv : kv + head_size]
            )
        return output

    def block(self, layer: int, x: np.ndarray, attention: Callable[..., np.ndarray]):
        """Run one layer on rows ``x``. ``attention(q, k, v)`` returns the output before wo."""
        w = self.w
        xb = self.norm(x, w["rms_att"][layer])
        q = self.linear(xb, w["wq"][layer])
        k = self.linear(xb, w["wk"][layer])
        v = self.linear(xb, w["wv"][layer])
        att = attention(q, k, v)
        x = x + self.linear(att, w["wo"][layer])
        h = self.norm(x, w["rms_ffn"][layer])
        return x + self.swiglu(h, w["w1"][layer], w["w2"][layer], w["w3"][layer]), att

    def logits(self, x: np.ndarray) -> np.ndarray:
        classifier = self.w.get("wcls", self.w["embedding"])
        return self.linear(self.norm(x, self.w["rms_final"]), classifier)

    def run_memory_model(self, tokens: List[int], mode: str) -> np.ndarray:
        config = self.config
        M = config.mem_len
        memory_kv = [
            self.memory_keys_values(layer, self.w["ori_mem"][layer])
            for layer in range(config.n_layers)
        ]
        all_logits = []
        for start in range(0, len(tokens), M):
            chunk = tokens[start : start + M]
            n = len(chunk)
            x = self.w["embedding"][chunk]
            positions = M + np.arange(n)
            causal = np.tri(n, dtype=bool)
            for layer in range(config.n_layers):
                old_keys, old_values = memory_kv[layer]

                def chunk_attention(q, k, v, old_keys=old_keys, old_values=old_values):
                    q = self.rotate(q, positions)
                    k = self.rotate(k, positions)
                    if mode == "chunk":
                        keys = np.concatenate([old_keys, k])
                        values = np.concatenate([old_values, v])
                        allowed = np.concatenate([np.ones((n, M), dtype=bool), causal], axis=1)
                        return self.attend(q, keys, values, allowed)
                    # Token mode: query c attends to memory rows s < c recomputed from this
                    # chunk's outputs and the old rows s >= c. Row s depends only on the
                    # outputs of queries before it, so n Jacobi sweeps reach the exact
                    # solution.
                    slots = np.arange(M)
                    sees_new = slots[None, :] < np.arange(n)[:, None]
                    allowed = np.concatenate([~sees_new, sees_new, causal], axis=1)
                    att = np.zeros((n, config.dim))
                    for _ in range(n):
                        memory = np.zeros((M, config.dim))
                        memory[:n] = att
                        new_keys, new_values = self.memory_keys_values(layer, memory)
                        keys = np.concatenate([old_keys, new_keys, k])
                        values = np.concatenate([old_values, new_values, v])
                        att = self.attend(q, keys, values, allowed)
                    return att

                x, att = self.block(layer, x, chunk_attention)
                # After a full chunk both modes have recomputed every slot from this
                # chunk's outputs. Only the last chunk can be partial, so its memory
                # is never used again.
                if n == M:
                    memory_kv[layer] = self.memory_keys_values(layer, att)
            all_logits.append(self.logits(x))
        return np.concatenate(all_logits)

    def run_vanilla_model(self, tokens: List[int]) -> np.ndarray:
        n = len(tokens)
        positions = np.arange(n)
        x = self.w["embedding"][tokens]

        def causal_attention(q, k, v):
            allowed = np.tri(n, dtype=bool)
            return self.attend(self.rotate(q, positions), self.rotate(k, positions), v, allowed)

        for layer in range(self.config.n_layers):
            x, _ = self.block(layer, x, causal_attention)
        return self.logits(x)


def reference_logits(model: ReferenceModel, tokens: List[int]) -> np.ndarray:
    return np.stack([model.forward(token) for token in tokens])


def sample_tokens(config: Config, count: int, seed: int) -> List[int]:
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=count).tolist()


# ---------------------------------------------------------------------------
# Reference model


@pytest.mark.parametrize("mode", ["chunk", "token"])
@pytest.mark.parametrize("shared", [True, False])
def test_memory_model_matches_batched(mode: str, shared: bool):
    config = MEMORY_GQA
    weights = checkpoint.random_weights(config, seed=11, shared_classifier=shared)
    tokens = sample_tokens(config, 13, seed=1)  # two full chunks of 5 and a partial one
    expected = Batched(config, weights, None).run_memory_model(tokens, mode)
    actual = reference_logits(ReferenceModel(config, weights, mode=mode), tokens)
    assert actual.shape == (13, config.vocab_size)
    assert np.allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["chunk", "token"])
def test_quantized_activations_match_batched(mode: str):
    config = MEMORY_GQA
    weights = checkpoint.random_weights(config, seed=12)
    tokens = sample_tokens(config, 8, seed=2)
    expected = Batched(config, weights, 16).run_memory_model(tokens, mode)
    model = ReferenceModel(config, weights, mode=mode, quantize_activations=True, group_size=16)
    assert np.allclose(reference_logits(model, tokens), expected, rtol=1e-5, atol=1e-5)


def test_vanilla_model_matches_batched():
    config = VANILLA_GQA
    weights = checkpoint.random_weights(config, seed=13, shared_classifier=False)
    tokens = sample_tokens(config, config.seq_len, seed=3)
    expected = Batched(config, weights, None).run_vanilla_model(tokens)
    actual = reference_logits(ReferenceModel(config, weights), tokens)
    assert np.allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_vanilla_quantized_matches_batched():
    config = VANILLA_GQA
    weights = checkpoint.random_weights(config, seed=14)
    tokens = sample_tokens(config, 6, seed=4)
    expected = Batched(config, weights, 16).run_vanilla_model(tokens)
    model = ReferenceModel(config, weights, quantize_activations=True, group_size=16)
    assert np.allclose(reference_logits(model, tokens), expected, rtol=1e-5, atol=1e-5)


def test_vanilla_model_rejects_past_seq_len():
    config = VANILLA_MHA
    model = ReferenceModel(config, checkpoint.random_weights(config, seed=0))
    for _ in range(config.seq_len):
        model.forward(1)
    assert model.pos == config.seq_len
    with pytest.raises(ValueError, match="exceeds seq_len"):
        model.forward(1)


def test_memory_model_runs_past_seq_len():
    config = MEMORY_MHA
    model = ReferenceModel(config, checkpoint.random_weights(config, seed=0))
    for _ in range(config.seq_len + 2 * config.mem_len):
        logits = model.forward(2)
    assert model.pos == config.seq_len + 2 * config.mem_len
    assert np.all(np.isfinite(logits))


def test_memory_update_changes_logits():
    config = MEMORY_GQA
    weights = checkpoint.random_weights(config, seed=15)
    tokens = sample_tokens(config, config.mem_len + 2, seed=5)
    updating = ReferenceModel(config, weights)
    frozen = ReferenceModel(config, weights)
    # Skip every update after the initial state.
    frozen.update_memory_slot = lambda layer, slot: None  # type: ignore[method-assign]
    updating_logits = reference_logits(updating, tokens)
    frozen_logits = reference_logits(frozen, tokens)
    M = config.mem_len
    assert np.array_equal(updating_logits[:M], frozen_logits[:M])
    assert np.max(np.abs(updating_logits[M] - frozen_logits[M])) > 1e-2
    assert np.max(np.abs(updating_logits[M + 1] - frozen_logits[M + 1])) > 1e-2


def test_token_mode_differs_after_first_token():
    config = MEMORY_GQA
    weights = checkpoint.random_weights(config, seed=16)
    tokens = sample_tokens(config, 3, seed=6)
    chunk_logits = reference_logits(ReferenceModel(config, weights, mode="chunk"), tokens)
    token_logits = reference_logits(ReferenceModel(config, weights, mode="token"), tokens)
    assert np.array_equal(chunk_logits[0], token_logits[0])
    assert np.max(np.abs(chunk_logits[1] - token_logits[1])) > 1e-2
    assert np.max(np.abs(chunk_logits[2] - token_logits[2])) > 1e-2


def test_forward_writes_one_memory_slot():
    config = MEMORY_MHA
    model = ReferenceModel(config, checkpoint.random_weights(config, seed=17))
    initial = model.memory.copy()
    model.forward(3)
    assert not np.array_equal(model.memory[:, 0], initial[:, 0])
    assert np.array_equal(model.memory[:, 1:], initial[:, 1:])


def test_quantized_activations_change_logits_slightly():
    config = MEMORY_GQA
    weights = checkpoint.random_weights(config, seed=18)
    tokens = sample_tokens(config, 6, seed=7)
    exact = reference_logits(ReferenceModel(config, weights), tokens)
    model = ReferenceModel(config, weights, quantize_activations=True, group_size=16)
    quantized = reference_logits(model, tokens)
    difference = np.max(np.abs(exact - quantized))
    assert difference > 0
    assert difference < 0.1 * np.std(exact)


def test_random_weights_give_spread_logits():
    for config in (MEMORY_GQA, VANILLA_GQA):
        model = ReferenceModel(config, checkpoint.random_weights(config, seed=19))
        logits = reference_logits(model, sample_tokens(config, 4, seed=8))
        assert np.all(np.isfinite(logits))
        assert np.all(np.std(logits, axis=1) > 0.3)
        assert np.all(np.std(logits, axis=1) < 10)


def test_reference_rejects_missing_group_size():
    config = MEMORY_MHA
    with pytest.raises(ValueError, match="group_size"):
        ReferenceModel(config, checkpoint.random_weights(config, seed=0), quantize_activations=True)


def test_reference_runs_from_checkpoint_file(tmp_path: Path):
    config = MEMORY_GQA
    weights = checkpoint.random_weights(config, seed=20, shared_classifier=False)
    path = tmp_path / "model.bin"
    checkpoint.write_llama2rnn(path, config, weights)
    _, read_config, read_weights, group_size = checkpoint.read_checkpoint(path)
    tokens = sample_tokens(config, 7, seed=9)
    from_file = ReferenceModel(
        read_config, read_weights, quantize_activations=True, group_size=group_size
    )
    original = ReferenceModel(config, weights)
    file_logits = reference_logits(from_file, tokens)
    original_logits = reference_logits(original, tokens)
    assert not np.array_equal(file_logits, original_logits)
    assert np.allclose(file_logits, original_logits, atol=0.1 * np.std(original_logits))
