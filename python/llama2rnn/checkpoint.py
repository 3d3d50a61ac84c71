"""Read and write Llama2RNN and llama2.c checkpoints, and quantize weights to Q8_0.

Four binary formats are supported, all little-endian:

``llama2rnn``
    Memory model, Q8_0 matrices. Header: u32 magic, i32 version 2, eight i32 (dim,
    hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, mem_len), u8
    shared_classifier at offset 40, unaligned i32 group_size at offset 41, zero padding
    to 256 bytes.
``llama2c-v2``
    llama2.c version 2, Q8_0 matrices, no memory. Same magic and version, seven i32, u8
    shared_classifier at offset 36, i32 group_size at offset 37, padding to 256 bytes.
``llama2c-v1``
    llama2.c version 1, fp32. Magic, version 1, seven i32, u8 shared_classifier at
    offset 36, padding to 256 bytes.
``llama2c-v0``
    Legacy llama2.c export, fp32, no magic: the file starts with the seven i32. A
    negative vocab_size marks a separate classifier.

Weights are exchanged as a ``dict[str, np.ndarray]`` of float32 arrays with the layer
index first for per-layer tensors (see ``weight_shapes``). The classifier is shared
with the embedding table exactly when the dict has no ``"wcls"`` entry.

A Q8_0 tensor is stored as all of its int8 values followed by all of its fp32 group
scales. Each layer's matrix is a separate tensor, so the int8 values of layer 0 are
followed by the scales of layer 0 and then the int8 values of layer 1.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

__all__ = [
    "FORMATS",
    "MAGIC",
    "Config",
    "checkpoint_size",
    "default_group_size",
    "dequantize_q8_0",
    "quantize_q8_0",
    "random_weights",
    "read_checkpoint",
    "validate_weights",
    "weight_shapes",
    "write_llama2c_v0",
    "write_llama2c_v1",
    "write_llama2c_v2",
    "write_llama2rnn",
]

PathLike = Union[str, "os.PathLike[str]"]
Weights = Dict[str, np.ndarray]

MAGIC = 0x616B3432
HEADER_SIZE = 256
FORMATS = ("llama2rnn", "llama2c-v2", "llama2c-v1", "llama2c-v0")

# Largest magnitude of a Q8_0 value. -128 is never produced, so the range is symmetric.
Q8_MAX = 127

# struct layouts of the headers. "<" disables alignment padding, which puts the group
# size of the Q8_0 formats at the unaligned offsets 41 and 37.
_LLAMA2RNN_HEADER = struct.Struct("<Ii8iBi")
_LLAMA2C_V2_HEADER = struct.Struct("<Ii7iBi")
_LLAMA2C_V1_HEADER = struct.Struct("<Ii7iB")
_LLAMA2C_V0_HEADER = struct.Struct("<7i")

# Names of the tensors that have one entry per layer, stacked along axis 0.
_PER_LAYER = frozenset(
    [
        "rms_att",
        "rms_ffn",
        "rms_mem",
        "rms_mff",
        "ori_mem",
        "wq",
        "wk",
        "wv",
        "wo",
        "w1",
        "w2",
        "w3",
        "aw1",
        "aw2",
        "aw3",
    ]
)

# Storage order of each format: the fp32 section, then the Q8_0 section. "wcls" is
# written only for a separate classifier. The v0 layout also contains the two RoPE
# tables, which readers skip.
_FREQ_REAL = "freq_cis_real"
_FREQ_IMAG = "freq_cis_imag"
_LAYOUTS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "llama2rnn": (
        ("rms_att", "rms_ffn", "rms_mem", "rms_mff", "ori_mem", "rms_final"),
        ("embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "aw1", "aw2", "aw3", "wcls"),
    ),
    "llama2c-v2": (
        ("rms_att", "rms_ffn", "rms_final"),
        ("embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"),
    ),
    "llama2c-v1": (
        (
            "rms_att",
            "rms_ffn",
            "rms_final",
            "embedding",
            "wq",
            "wk",
            "wv",
            "wo",
            "w1",
            "w2",
            "w3",
            "wcls",
        ),
        (),
    ),
    "llama2c-v0": (
        (
            "embedding",
            "rms_att",
            "wq",
            "wk",
            "wv",
            "wo",
            "rms_ffn",
            "w1",
            "w2",
            "w3",
            "rms_final",
            _FREQ_REAL,
            _FREQ_IMAG,
            "wcls",
        ),
        (),
    ),
}


@dataclass(frozen=True)
class Config:
    """Model hyperparameters as stored in a checkpoint header.

    ``mem_len`` is the number of memory slots M per layer, which is also the chunk
    length. It is 0 for a plain llama2.c model. Call ``validate`` before relying on the
    derived properties, because construction does not check the values. That lets tests
    describe invalid headers.
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    mem_len: int = 0

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.n_kv_heads

    @property
    def kv_mul(self) -> int:
        """Number of query heads that share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_memory_model(self) -> bool:
        return self.mem_len > 0

    def validate(self) -> None:
        """Raise ValueError unless the values describe a model that can be run."""
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"invalid config: {name} must be positive, got {value}")
        if self.seq_len <= 0:
            raise ValueError(f"invalid config: seq_len must be positive, got {self.seq_len}")
        if self.mem_len < 0:
            raise ValueError(f"invalid config: mem_len must be >= 0, got {self.mem_len}")
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"invalid config: dim {self.dim} is not a multiple of n_heads {self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"invalid config: n_heads {self.n_heads} is not a multiple of "
                f"n_kv_heads {self.n_kv_heads}"
            )
        if self.head_size % 2 != 0:
            raise ValueError(
                f"invalid config: head_size {self.head_size} must be even because RoPE "
                "rotates pairs of values"
            )


# ---------------------------------------------------------------------------
# Q8_0 quantization


def quantize_q8_0(w: np.ndarray, group_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Quantize ``w`` to Q8_0 and return the flat int8 values and the float32 scales.

    ``w`` is flattened in C order and split into groups of ``group_size`` consecutive
    values. Each group gets ``scale = max|x| / 127`` and ``q = round(x / scale)``, with
    ties rounded away from zero as C's ``roundf`` does. The division runs in float32 so
    that the result matches an engine that quantizes float32 activations. A group of
    zeros gets scale 0 and all q 0.
    """
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    if flat.size % group_size != 0:
        raise ValueError(
            f"cannot quantize {flat.size} values in groups of {group_size}: "
            "the size must be a multiple of the group size"
        )
    if not np.all(np.isfinite(flat)):
        raise ValueError("cannot quantize a tensor that contains NaN or infinity")

    groups = flat.reshape(-1, group_size)
    scales = np.max(np.abs(groups), axis=1) / np.float32(Q8_MAX)
    # Zero groups divide by 1 instead of 0 so that their values stay 0.
    divisors = np.where(scales == 0, np.float32(1), scales).astype(np.float32)
    ratios = groups / divisors[:, None]

    # Round half away from zero in float64. Adding 0.5 is exact there for any float32
    # ratio, whereas float32 addition can round 0.49999997 + 0.5 up to 1.
    ratios64 = ratios.astype(np.float64)
    rounded = np.sign(ratios64) * np.floor(np.abs(ratios64) + 0.5)
    q = np.clip(rounded, -Q8_MAX, Q8_MAX).astype(np.int8)
    return q.reshape(-1), scales.astype(np.float32)


def dequantize_q8_0(q: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Return the flat float32 values ``q * scale`` of a Q8_0 tensor."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    values = np.asarray(q, dtype=np.int8).reshape(-1)
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    if values.size != scales.size * group_size:
        raise ValueError(
            f"{values.size} Q8_0 values do not match {scales.size} scales "
            f"of group size {group_size}"
        )
    groups = values.reshape(-1, group_size).astype(np.float32)
    return (groups * scales[:, None]).reshape(-1)


def default_group_size(config: Config) -> int:
    """Return the Q8_0 group size that the writers use when none is given.

    It is the largest of 64, 32, 16, ... that divides both dim and hidden_dim, so that
    every matrix row contains a whole number of groups.
    """
    group_size = 64
    while config.dim % group_size != 0 or config.hidden_dim % group_size != 0:
        group_size //= 2
    return group_size


def _validate_group_size(config: Config, group_size: int) -> None:
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if config.dim % group_size != 0 or config.hidden_dim % group_size != 0:
        raise ValueError(
            f"group_size {group_size} must divide dim {config.dim} and hidden_dim "
            f"{config.hidden_dim} so that every matrix row contains a whole number of "
            f"groups. default_group_size() returns {default_group_size(config)} for this "
            "config"
        )


# ---------------------------------------------------------------------------
# Weight dict


def weight_shapes(config: Config, *, shared_classifier: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Return the shape of every entry of the weight dict for ``config``.

    Memory weights are included iff ``config.mem_len > 0``, and ``"wcls"`` iff the
    classifier is separate. Matrices are (out, in).
    """
    n_layers = config.n_layers
    dim = config.dim
    hidden_dim = config.hidden_dim
    kv_dim = config.kv_dim
    shapes: Dict[str, Tuple[int, ...]] = {
        "embedding": (config.vocab_size, dim),
        "rms_att": (n_layers, dim),
        "rms_ffn": (n_layers, dim),
        "wq": (n_layers, dim, dim),
        "wk": (n_layers, kv_dim, dim),
        "wv": (n_layers, kv_dim, dim),
        "wo": (n_layers, dim, dim),
        "w1": (n_layers, hidden_dim, dim),
        "w2": (n_layers, dim, hidden_dim),
        "w3": (n_layers, hidden_dim, dim),
        "rms_final": (dim,),
    }
    if not shared_classifier:
        shapes["wcls"] = (config.vocab_size, dim)
    if config.is_memory_model:
        shapes["rms_mem"] = (n_layers, dim)
        shapes["rms_mff"] = (n_layers, dim)
        shapes["aw1"] = (n_layers, hidden_dim, dim)
        shapes["aw2"] = (n_layers, dim, hidden_dim)
        shapes["aw3"] = (n_layers, hidden_dim, dim)
        shapes["ori_mem"] = (n_layers, config.mem_len, dim)
    return shapes


def validate_weights(config: Config, weights: Weights) -> None:
    """Raise ValueError unless ``weights`` has exactly the entries and shapes of ``config``.

    The classifier counts as separate when ``weights`` contains ``"wcls"``. All values
    must be finite.
    """
    config.validate()
    expected = weight_shapes(config, shared_classifier="wcls" not in weights)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        kind = "memory model" if config.is_memory_model else "model without memory (mem_len 0)"
        raise ValueError(
            f"weights do not match a {kind}: missing {missing}, unexpected {unexpected}"
        )
    for name, shape in expected.items():
        array = np.asarray(weights[name])
        if array.shape != shape:
            raise ValueError(f"weight {name!r} has shape {array.shape}, expected {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"weight {name!r} contains NaN or infinity")


def random_weights(config: Config, *, seed: int, shared_classifier: bool = True) -> Weights:
    """Return random float32 weights for ``config``, with memory weights iff mem_len > 0.

    Matrices are N(0, 1/in), so each product keeps the scale of its input. Norm weights
    are 1 + N(0, 0.1^2) and ori_mem is N(0, 1). The embedding is N(0, 1/sqrt(dim)), so
    a shared classifier gives logits with standard deviation about dim**0.25.
    """
    config.validate()
    rng = np.random.default_rng(seed)
    weights: Weights = {}
    for name, shape in weight_shapes(config, shared_classifier=shared_classifier).items():
        if name == "embedding":
            values = rng.normal(0.0, config.dim**-0.25, shape)
        elif name.startswith("rms_"):
            values = 1.0 + 0.1 * rng.normal(size=shape)
        elif name == "ori_mem":
            values = rng.normal(size=shape)
        else:
            fan_in = shape[-1]
            values = rng.normal(0.0, fan_in**-0.5, shape)
        weights[name] = values.astype(np.float32)
    return weights


# ---------------------------------------------------------------------------
# Sizes


def _q8_size(count: int, group_size: int) -> int:
    return count + 4 * (count // group_size)


def _tensor_counts(config: Config, name: str) -> List[int]:
    """Return the value counts of the stored tensors of ``name``, one per layer if per-layer."""
    if name in (_FREQ_REAL, _FREQ_IMAG):
        return [config.seq_len * config.head_size // 2]
    shape = weight_shapes(config, shared_classifier=False)[name]
    if name in _PER_LAYER:
        return [int(np.prod(shape[1:]))] * shape[0]
    return [int(np.prod(shape))]


def _layout_names(
    format_name: str, config: Config, shared_classifier: bool
) -> Iterator[Tuple[str, bool]]:
    """Yield (name, is_q8) for each stored weight name of ``format_name`` in file order."""
    fp32_names, q8_names = _LAYOUTS[format_name]
    for names, is_q8 in ((fp32_names, False), (q8_names, True)):
        for name in names:
            if name == "wcls" and shared_classifier:
                continue
            yield name, is_q8


def _header_size(format_name: str) -> int:
    return _LLAMA2C_V0_HEADER.size if format_name == "llama2c-v0" else HEADER_SIZE


def checkpoint_size(
    format: str, config: Config, shared_classifier: bool, group_size: Optional[int]
) -> int:
    """Return the exact byte size of a checkpoint file.

    ``group_size`` is required for the Q8_0 formats ("llama2rnn", "llama2c-v2") and
    ignored for the fp32 ones.
    """
    _check_format_config(format, config)
    is_q8_format = format in ("llama2rnn", "llama2c-v2")
    if is_q8_format:
        if group_size is None:
            raise ValueError(f"format {format!r} needs a group_size")
        _validate_group_size(config, group_size)
    size = _header_size(format)
    for name, is_q8 in _layout_names(format, config, shared_classifier):
        for count in _tensor_counts(config, name):
            if is_q8:
                assert group_size is not None
                size += _q8_size(count, group_size)
            else:
                size += 4 * count
    return size


def _check_format_config(format_name: str, config: Config) -> None:
    if format_name not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format_name!r}, expected one of {FORMATS}")
    config.validate()
    if format_name == "llama2rnn" and not config.is_memory_model:
        raise ValueError(
            "format 'llama2rnn' needs mem_len > 0. Use a llama2.c format for a model without memory"
        )
    if format_name != "llama2rnn" and config.is_memory_model:
        raise ValueError(
            f"format {format_name!r} has no memory weights, so it needs mem_len 0 "
            f"(got {config.mem_len}). Use write_llama2rnn for a memory model"
        )


# ---------------------------------------------------------------------------
# Writers


def _rope_tables(config: Config) -> Tuple[np.ndarray, np.ndarray]:
    """Return the cos and sin tables that legacy v0 files contain, (seq_len, head_size/2)."""
    pair_index = np.arange(config.head_size // 2, dtype=np.float64)
    frequencies = 10000.0 ** (-2.0 * pair_index / config.head_size)
    angles = np.outer(np.arange(config.seq_len, dtype=np.float64), frequencies)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _stored_tensors(config: Config, weights: Weights, name: str) -> List[np.ndarray]:
    """Return the tensors of ``name`` in storage order, one per layer if per-layer."""
    if name == _FREQ_REAL:
        return [_rope_tables(config)[0]]
    if name == _FREQ_IMAG:
        return [_rope_tables(config)[1]]
    array = np.asarray(weights[name], dtype=np.float32)
    if name in _PER_LAYER:
        return list(array)
    return [array]


def _write_checkpoint(
    path: PathLike,
    format_name: str,
    header: bytes,
    config: Config,
    weights: Weights,
    group_size: Optional[int],
) -> Dict[str, float]:
    """Write ``header`` and the weights in the layout of ``format_name``.

    The file is written under a temporary name and renamed over ``path``, so a process
    that has the old file mapped (a running chat) keeps reading the old bytes instead of
    faulting on a truncated file.

    Returns the max absolute quantization error of each Q8_0 weight name, taken over
    all of its layers.
    """
    shared_classifier = "wcls" not in weights
    errors: Dict[str, float] = {}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(header)
            for name, is_q8 in _layout_names(format_name, config, shared_classifier):
                for tensor in _stored_tensors(config, weights, name):
                    if not is_q8:
                        file.write(tensor.astype("<f4").tobytes())
                        continue
                    assert group_size is not None
                    q, scales = quantize_q8_0(tensor, group_size)
                    file.write(q.tobytes())
                    file.write(scales.astype("<f4").tobytes())
                    restored = dequantize_q8_0(q, scales, group_size)
                    error = float(np.max(np.abs(restored - tensor.reshape(-1))))
                    errors[name] = max(errors.get(name, 0.0), error)
        expected_size = checkpoint_size(format_name, config, shared_classifier, group_size)
        actual_size = os.path.getsize(tmp)
        if actual_size != expected_size:
            raise RuntimeError(
                f"wrote {actual_size} bytes for {os.fspath(path)!r} but the {format_name} "
                f"layout needs {expected_size}; this is a bug in the writer"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return errors


def _pad_header(packed: bytes) -> bytes:
    return packed + b"\0" * (HEADER_SIZE - len(packed))


def _prepare(
    format_name: str, config: Config, weights: Weights, group_size: Optional[int]
) -> Optional[int]:
    """Validate the arguments of a writer and return the group size to use."""
    _check_format_config(format_name, config)
    validate_weights(config, weights)
    if format_name not in ("llama2rnn", "llama2c-v2"):
        return None
    if group_size is None:
        group_size = default_group_size(config)
    _validate_group_size(config, group_size)
    return group_size


def write_llama2rnn(
    path: PathLike, config: Config, weights: Weights, group_size: Optional[int] = None
) -> Dict[str, float]:
    """Write a Llama2RNN memory checkpoint with Q8_0 matrices.

    ``group_size`` defaults to ``default_group_size(config)``. Returns the max absolute
    quantization error of each Q8_0 weight name over all of its layers.
    """
    group_size = _prepare("llama2rnn", config, weights, group_size)
    assert group_size is not None
    shared_classifier = "wcls" not in weights
    header = _LLAMA2RNN_HEADER.pack(
        MAGIC,
        2,
        config.dim,
        config.hidden_dim,
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.vocab_size,
        config.seq_len,
        config.mem_len,
        int(shared_classifier),
        group_size,
    )
    return _write_checkpoint(path, "llama2rnn", _pad_header(header), config, weights, group_size)


def write_llama2c_v2(
    path: PathLike, config: Config, weights: Weights, group_size: Optional[int] = None
) -> Dict[str, float]:
    """Write a llama2.c version 2 checkpoint (Q8_0 matrices, no memory).

    ``group_size`` defaults to ``default_group_size(config)``. Returns the max absolute
    quantization error of each Q8_0 weight name over all of its layers.
    """
    group_size = _prepare("llama2c-v2", config, weights, group_size)
    assert group_size is not None
    shared_classifier = "wcls" not in weights
    header = _LLAMA2C_V2_HEADER.pack(
        MAGIC,
        2,
        config.dim,
        config.hidden_dim,
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.vocab_size,
        config.seq_len,
        int(shared_classifier),
        group_size,
    )
    return _write_checkpoint(path, "llama2c-v2", _pad_header(header), config, weights, group_size)


def write_llama2c_v1(path: PathLike, config: Config, weights: Weights) -> None:
    """Write a llama2.c version 1 checkpoint (fp32, no memory)."""
    _prepare("llama2c-v1", config, weights, None)
    shared_classifier = "wcls" not in weights
    header = _LLAMA2C_V1_HEADER.pack(
        MAGIC,
        1,
        config.dim,
        config.hidden_dim,
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.vocab_size,
        config.seq_len,
        int(shared_classifier),
    )
    _write_checkpoint(path, "llama2c-v1", _pad_header(header), config, weights, None)


def write_llama2c_v0(path: PathLike, config: Config, weights: Weights) -> None:
    """Write a legacy llama2.c checkpoint (no header, fp32, no memory).

    The file stores vocab_size negated when the classifier is separate. It also
    contains the cos and sin RoPE tables that the legacy layout reserves.
    """
    _prepare("llama2c-v0", config, weights, None)
    shared_classifier = "wcls" not in weights
    stored_vocab_size = config.vocab_size if shared_classifier else -config.vocab_size
    header = _LLAMA2C_V0_HEADER.pack(
        config.dim,
        config.hidden_dim,
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        stored_vocab_size,
        config.seq_len,
    )
    _write_checkpoint(path, "llama2c-v0", header, config, weights, None)


# ---------------------------------------------------------------------------
# Reader


class _Cursor:
    """Sequential reader of little-endian arrays from a byte buffer."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data = data
        self.offset = offset

    def read(self, dtype: str, count: int) -> np.ndarray:
        item_size = np.dtype(dtype).itemsize
        end = self.offset + item_size * count
        if end > len(self.data):
            raise ValueError(
                f"checkpoint is truncated: need {end} bytes, the file has {len(self.data)}"
            )
        array = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset = end
        return array.copy()


def _parse_versioned_header(data: bytes) -> Tuple[str, Config, bool, Optional[int]]:
    """Return (format, config, shared_classifier, group_size) of a file that has a magic."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"checkpoint is truncated: {len(data)} bytes, the header needs 256")
    version = struct.unpack_from("<i", data, 4)[0]
    if version == 1:
        fields = _LLAMA2C_V1_HEADER.unpack_from(data)
        config = Config(*fields[2:9])
        return "llama2c-v1", config, bool(fields[9]), None
    if version != 2:
        raise ValueError(f"unsupported checkpoint version {version}, expected 1 or 2")

    # Both Q8_0 formats use version 2, so the file size decides which layout applies.
    rnn_fields = _LLAMA2RNN_HEADER.unpack_from(data)
    v2_fields = _LLAMA2C_V2_HEADER.unpack_from(data)
    candidates = [
        ("llama2rnn", Config(*rnn_fields[2:10]), bool(rnn_fields[10]), rnn_fields[11]),
        ("llama2c-v2", Config(*v2_fields[2:9]), bool(v2_fields[9]), v2_fields[10]),
    ]
    sizes: Dict[str, Optional[int]] = {}
    matches = []
    for format_name, config, shared, group_size in candidates:
        try:
            sizes[format_name] = checkpoint_size(format_name, config, shared, group_size)
        except ValueError:
            sizes[format_name] = None
            continue
        if sizes[format_name] == len(data):
            matches.append((format_name, config, shared, group_size))
    if len(matches) != 1:
        raise ValueError(
            f"version 2 checkpoint of {len(data)} bytes matches "
            f"{'both layouts' if matches else 'no layout'}: the llama2rnn header implies "
            f"{sizes['llama2rnn']} bytes and the llama2c-v2 header {sizes['llama2c-v2']} "
            "(None means the header values are invalid for that layout)"
        )
    return matches[0]


def _parse_v0_header(data: bytes) -> Tuple[str, Config, bool, Optional[int]]:
    if len(data) < _LLAMA2C_V0_HEADER.size:
        raise ValueError(f"checkpoint is truncated: {len(data)} bytes")
    fields = list(_LLAMA2C_V0_HEADER.unpack_from(data))
    shared_classifier = fields[5] > 0
    fields[5] = abs(fields[5])
    config = Config(*fields)
    try:
        expected = checkpoint_size("llama2c-v0", config, shared_classifier, None)
    except ValueError as error:
        raise ValueError(
            f"not a checkpoint: no magic, and the legacy v0 header is invalid ({error})"
        ) from error
    if expected != len(data):
        raise ValueError(
            f"legacy v0 checkpoint has {len(data)} bytes but its header implies {expected}"
        )
    return "llama2c-v0", config, shared_classifier, None


def read_checkpoint(path: PathLike) -> Tuple[str, Config, Weights, Optional[int]]:
    """Read a checkpoint of any supported format.

    Returns (format, config, weights, group_size). The weights are float32 in the dict
    layout of ``weight_shapes``, with Q8_0 tensors dequantized. group_size is None for
    the fp32 formats. Raises ValueError for an unknown or inconsistent file.
    """
    with open(path, "rb") as file:
        data = file.read()
    if len(data) >= 4 and struct.unpack_from("<I", data, 0)[0] == MAGIC:
        format_name, config, shared_classifier, group_size = _parse_versioned_header(data)
    else:
        format_name, config, shared_classifier, group_size = _parse_v0_header(data)

    expected_size = checkpoint_size(format_name, config, shared_classifier, group_size)
    if expected_size != len(data):
        raise ValueError(
            f"{format_name} checkpoint has {len(data)} bytes but its header implies {expected_size}"
        )

    shapes = weight_shapes(config, shared_classifier=shared_classifier)
    cursor = _Cursor(data, _header_size(format_name))
    weights: Weights = {}
    for name, is_q8 in _layout_names(format_name, config, shared_classifier):
        tensors = []
        for count in _tensor_counts(config, name):
            if is_q8:
                assert group_size is not None
                q = cursor.read("i1", count)
                scales = cursor.read("<f4", count // group_size)
                tensors.append(dequantize_q8_0(q, scales, group_size))
            else:
                tensors.append(cursor.read("<f4", count).astype(np.float32))
        if name in (_FREQ_REAL, _FREQ_IMAG):
            continue
        weights[name] = np.concatenate(tensors).reshape(shapes[name])
    return format_name, config, weights, group_size
