"""Invalid checkpoint files must raise a clear Python exception, never crash or hang.

Every bad file is a valid random checkpoint with edited header bytes, or one that is
truncated or extended. Each test checks the exception type and that the message names the
offending field and value. A Rust panic would surface as ``pyo3_runtime.PanicException``, a
BaseException that ``pytest.raises(ValueError)`` does not catch, so it fails the test.

Headers that imply huge allocations (n_layers, seq_len) can abort the process instead of
raising, which would take the whole pytest run down. Those cases, and the header fuzz loop,
load in a child process with a 1 GiB address-space limit and report back how the load ended.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from reference import checkpoint

import llama2rnn
from llama2rnn import CheckpointError, Model, TokenizerError

Config = checkpoint.Config

MEMORY = Config(
    dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=37, seq_len=16, mem_len=4
)
PLAIN = replace(MEMORY, mem_len=0)

FORMATS = ("llama2rnn", "llama2c-v2", "llama2c-v1", "llama2c-v0")
Q8_FORMATS = ("llama2rnn", "llama2c-v2")
WRITERS = {
    "llama2rnn": checkpoint.write_llama2rnn,
    "llama2c-v2": checkpoint.write_llama2c_v2,
    "llama2c-v1": checkpoint.write_llama2c_v1,
    "llama2c-v0": checkpoint.write_llama2c_v0,
}

CONFIG_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# Byte offset of every header field, as documented at the top of rust/checkpoint.rs.
FIELD_OFFSETS = {
    "llama2rnn": {
        "magic": 0,
        "version": 4,
        **{name: 8 + 4 * i for i, name in enumerate(CONFIG_FIELDS)},
        "mem_len": 36,
        "shared_classifier": 40,
        "group_size": 41,
    },
    "llama2c-v2": {
        "magic": 0,
        "version": 4,
        **{name: 8 + 4 * i for i, name in enumerate(CONFIG_FIELDS)},
        "shared_classifier": 36,
        "group_size": 37,
    },
    "llama2c-v1": {
        "magic": 0,
        "version": 4,
        **{name: 8 + 4 * i for i, name in enumerate(CONFIG_FIELDS)},
        "shared_classifier": 36,
    },
    "llama2c-v0": {name: 4 * i for i, name in enumerate(CONFIG_FIELDS)},
}
# Bytes past the last header field. The rest of the 256-byte header is padding.
HEADER_FIELDS_END = {"llama2rnn": 45, "llama2c-v2": 41, "llama2c-v1": 37, "llama2c-v0": 28}
HEADER_SIZE = {"llama2rnn": 256, "llama2c-v2": 256, "llama2c-v1": 256, "llama2c-v0": 28}
# struct codes of the fields that are not an i32.
FIELD_STRUCT_CODES = {"magic": "<I", "shared_classifier": "<B"}

I32_MAX = 2**31 - 1
I32_MIN = -(2**31)


def config_for(fmt: str) -> Config:
    return MEMORY if fmt == "llama2rnn" else PLAIN


def write_valid(
    folder: Path, fmt: str, config: Config | None = None, *, shared: bool = True
) -> Path:
    config = config or config_for(fmt)
    path = folder / f"valid-{fmt}.bin"
    weights = checkpoint.random_weights(config, seed=0, shared_classifier=shared)
    WRITERS[fmt](path, config, weights)
    return path


def patched(source: Path, fmt: str, name: str, **fields: int) -> Path:
    """Copy `source` to `name` with the given header fields overwritten."""
    data = bytearray(source.read_bytes())
    for field, value in fields.items():
        code = FIELD_STRUCT_CODES.get(field, "<i")
        struct.pack_into(code, data, FIELD_OFFSETS[fmt][field], value)
    path = source.parent / name
    path.write_bytes(bytes(data))
    return path


def truncated(source: Path, length: int) -> Path:
    path = source.parent / f"{source.stem}-{length}.bin"
    path.write_bytes(source.read_bytes()[:length])
    return path


def load_error(path: Path, **kwargs) -> CheckpointError:
    """Load `path`, which must raise CheckpointError, and return the exception."""
    with pytest.raises(CheckpointError) as info:
        Model.load(path, threads=1, **kwargs)
    return info.value


def fp32_section_bytes(fmt: str, config: Config) -> int:
    """Size of the fp32 norm (and ori_mem) section that starts right after a Q8_0 header."""
    layers, dim = config.n_layers, config.dim
    if fmt == "llama2rnn":
        return 4 * (4 * layers * dim + layers * config.mem_len * dim + dim)
    return 4 * (2 * layers * dim + dim)


# ---------------------------------------------------------------------------------------------
# Child-process loads


_CHILD_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import llama2rnn
    with open(sys.argv[2]) as file:
        cases = json.load(file)
    for index, case in enumerate(cases):
        print(json.dumps({"start": index}), flush=True)
        try:
            model = llama2rnn.Model.load(case["path"], threads=1, **case.get("kwargs", {}))
            model.forward(0)
            outcome = {"index": index, "type": None, "message": ""}
        except BaseException as error:
            outcome = {"index": index, "type": type(error).__name__, "message": str(error)}
        print(json.dumps(outcome), flush=True)
    """
)
# A small model needs under 300 MiB of address space. The limit makes an oversized
# allocation fail at once on any machine instead of swapping or running for minutes.
CHILD_ADDRESS_SPACE = 1 << 30
CHILD_TIMEOUT_S = 20


@dataclass
class ChildOutcome:
    """How one load ended in the child: `error_type` None means it loaded and ran forward."""

    index: int
    error_type: str | None
    message: str


@dataclass
class ChildCrash:
    """A child process that exited abnormally or timed out while loading case `index`."""

    index: int
    reason: str


def load_in_child(folder: Path, cases: list[dict]) -> tuple[list[ChildOutcome], ChildCrash | None]:
    """Load each case ({"path": ..., "kwargs": {...}}) in one child process, in order.

    Stops at the first case that kills or hangs the child and returns it as the crash.
    """
    cases_path = folder / "child-cases.json"
    cases_path.write_text(json.dumps(cases))
    command = [sys.executable, "-c", _CHILD_SCRIPT, str(CHILD_ADDRESS_SPACE), str(cases_path)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        stdout = run.stdout
        stderr = run.stderr
        reason = f"exit status {run.returncode}"
        finished = run.returncode == 0
    except subprocess.TimeoutExpired as expired:
        # TimeoutExpired carries bytes even when the run was in text mode.
        partial = expired.stdout or b""
        stdout = partial.decode() if isinstance(partial, bytes) else partial
        stderr = ""
        reason = f"timed out after {CHILD_TIMEOUT_S} s"
        finished = False
    outcomes = []
    started = -1
    for line in stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            outcomes.append(ChildOutcome(record["index"], record["type"], record["message"]))
    if finished and len(outcomes) == len(cases):
        return outcomes, None
    stderr_lines = stderr.strip().splitlines()
    first_stderr_line = stderr_lines[0] if stderr_lines else "no output on stderr"
    assert started >= 0, f"the child process failed before its first load: {reason}: {stderr}"
    return outcomes, ChildCrash(started, f"{reason}: {first_stderr_line}")


def load_one_in_child(folder: Path, path: Path) -> ChildOutcome:
    outcomes, crash = load_in_child(folder, [{"path": str(path)}])
    assert crash is None, f"loading {path.name} crashed the process: {crash.reason}"
    return outcomes[0]


# ---------------------------------------------------------------------------------------------
# Valid files


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_files_load(tmp_path, fmt):
    model = Model.load(write_valid(tmp_path, fmt), threads=1)
    assert model.format == fmt
    assert model.config == config_for(fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_header_padding_is_ignored(tmp_path, fmt):
    source = write_valid(tmp_path, fmt)
    data = bytearray(source.read_bytes())
    for offset in range(HEADER_FIELDS_END[fmt], HEADER_SIZE[fmt]):
        data[offset] = 0xA5
    path = tmp_path / "padded-header.bin"
    path.write_bytes(bytes(data))
    assert Model.load(path, threads=1).format == fmt


def test_legacy_negative_vocab_loads(tmp_path):
    weights = checkpoint.random_weights(PLAIN, seed=5, shared_classifier=False)
    legacy = tmp_path / "legacy.bin"
    checkpoint.write_llama2c_v0(legacy, PLAIN, weights)
    vocab_offset = FIELD_OFFSETS["llama2c-v0"]["vocab_size"]
    stored_vocab = struct.unpack_from("<i", legacy.read_bytes(), vocab_offset)[0]
    assert stored_vocab == -PLAIN.vocab_size

    model = Model.load(legacy, threads=1)
    assert model.format == "llama2c-v0"
    assert model.config.vocab_size == PLAIN.vocab_size
    assert model.engine.config["shared_classifier"] is False

    # The same fp32 weights in version 1 must give the same logits, which holds only if the
    # legacy file's separate classifier was read.
    versioned = tmp_path / "v1.bin"
    checkpoint.write_llama2c_v1(versioned, PLAIN, weights)
    reference_model = Model.load(versioned, threads=1)
    for token in (0, 5, 36):
        np.testing.assert_array_equal(model.forward(token), reference_model.forward(token))


# ---------------------------------------------------------------------------------------------
# Paths that are not checkpoints


def test_missing_file_raises_file_not_found(tmp_path):
    path = tmp_path / "no-such-model.bin"
    with pytest.raises(FileNotFoundError) as info:
        Model.load(path, threads=1)
    assert str(path) in str(info.value)


def test_directory_raises_os_error(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(OSError) as info:
        Model.load(folder, threads=1)
    assert not isinstance(info.value, (FileNotFoundError, CheckpointError))
    assert str(folder) in str(info.value)


def test_text_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is a text file and not a checkpoint at all.\n" * 40)
    message = str(load_error(path))
    assert "first 4 bytes are 0x6c6c6568" in message  # "hell" read as a little-endian u32
    assert "magic 0x616b3432" in message
    assert "read as a legacy headerless llama2.c checkpoint" in message


def test_ascii_legacy_header_raises(tmp_path):
    # As a legacy header this ASCII reads as dim 0x40404040 with n_heads and n_kv_heads
    # 0x20202020 (head_size 2), so it passes every divisibility check, and n_layers
    # 0x6e6f6f6e (about 1.85e9) reaches the layout planning.
    path = tmp_path / "ascii.txt"
    path.write_text("@@@@abcdnoon" + " " * 8 + "vocaseql" + "just some ordinary text\n" * 30)
    outcome = load_one_in_child(tmp_path, path)
    assert outcome.error_type == "CheckpointError", outcome
    assert "first 4 bytes are 0x40404040" in outcome.message


# ---------------------------------------------------------------------------------------------
# Short, truncated and padded files


@pytest.mark.parametrize("length", [0, 1, 27])
def test_file_shorter_than_any_header(tmp_path, length):
    path = truncated(write_valid(tmp_path, "llama2rnn"), length)
    message = str(load_error(path))
    assert f"the file is {length} bytes long, too short for any checkpoint header" in message


@pytest.mark.parametrize("length", [28, 40, 100, 255])
def test_prefix_of_memory_checkpoint(tmp_path, length):
    path = truncated(write_valid(tmp_path, "llama2rnn"), length)
    message = str(load_error(path))
    assert f"{length} bytes" in message
    if length < HEADER_FIELDS_END["llama2rnn"]:
        assert "the file ends inside the header" in message
    else:
        size = checkpoint.checkpoint_size("llama2rnn", MEMORY, True, 32)
        assert f"as a Llama2RNN memory checkpoint it would be {size} bytes" in message


@pytest.mark.parametrize("length", [1, 27, 100, 255])
def test_zero_filled_file(tmp_path, length):
    path = tmp_path / "zeros.bin"
    path.write_bytes(bytes(length))
    message = str(load_error(path))
    if length < 28:
        assert f"the file is {length} bytes long" in message
    else:
        assert "first 4 bytes are 0x00000000" in message
        assert "dim is 0, expected a positive integer" in message


def truncation_points(fmt: str) -> dict[str, int]:
    """Named lengths to cut a valid file of `fmt` to, each inside a different section."""
    config = config_for(fmt)
    size = checkpoint.checkpoint_size(fmt, config, True, 32 if fmt in Q8_FORMATS else None)
    header = HEADER_SIZE[fmt]
    points = {"header": header // 2 if fmt != "llama2c-v0" else 20, "after-header": header}
    if fmt in Q8_FORMATS:
        fp32_end = header + fp32_section_bytes(fmt, config)
        points["fp32-section"] = (header + fp32_end) // 2 + 1
        points["int8-values"] = fp32_end + config.vocab_size * config.dim // 2
        points["scales"] = fp32_end + config.vocab_size * config.dim + 3
    else:
        points["fp32-section"] = header + 4 * config.vocab_size * config.dim // 2 + 2
    points["middle"] = size // 2
    points["last-byte"] = size - 1
    return points


TRUNCATIONS = [(fmt, where) for fmt in FORMATS for where in truncation_points(fmt)]


@pytest.mark.parametrize("fmt, where", TRUNCATIONS, ids=[f"{f}-{w}" for f, w in TRUNCATIONS])
def test_truncated_file(tmp_path, fmt, where):
    source = write_valid(tmp_path, fmt)
    size = source.stat().st_size
    length = truncation_points(fmt)[where]
    message = str(load_error(truncated(source, length)))
    if length < 28:
        assert f"the file is {length} bytes long, too short" in message
    elif fmt in Q8_FORMATS:
        assert f"version 2 file of {length} bytes matches no layout" in message
        if fmt == "llama2rnn":
            assert "as a Llama2RNN memory checkpoint" in message
        else:
            assert "as a plain llama2.c version 2" in message
        assert f"it would be {size} bytes" in message
    else:
        assert f"should be {size} bytes for this config" in message
        assert f"but the file is {length} bytes (truncated)" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_extra_byte(tmp_path, fmt):
    source = write_valid(tmp_path, fmt)
    size = source.stat().st_size
    path = tmp_path / "padded.bin"
    path.write_bytes(source.read_bytes() + b"\0")
    message = str(load_error(path))
    if fmt in Q8_FORMATS:
        assert f"version 2 file of {size + 1} bytes matches no layout" in message
        assert f"it would be {size} bytes" in message
    else:
        assert f"should be {size} bytes for this config" in message
        assert f"but the file is {size + 1} bytes" in message
        assert "longer than its header implies" in message


def test_random_truncations_raise(tmp_path):
    rng = random.Random(20240611)
    for fmt in FORMATS:
        source = write_valid(tmp_path, fmt)
        data = source.read_bytes()
        for _ in range(60):
            length = rng.randrange(0, len(data))
            path = tmp_path / "cut.bin"
            path.write_bytes(data[:length])
            with pytest.raises(CheckpointError) as info:
                Model.load(path, threads=1)
            assert f"{length} bytes" in str(info.value), (fmt, length)


# ---------------------------------------------------------------------------------------------
# Magic, version and format


def test_wrong_magic(tmp_path):
    path = patched(write_valid(tmp_path, "llama2rnn"), "llama2rnn", "magic.bin", magic=0xDEADBEEF)
    message = str(load_error(path))
    assert "magic 0x616b3432 (its first 4 bytes are 0xdeadbeef)" in message
    assert "read as a legacy headerless llama2.c checkpoint" in message


@pytest.mark.parametrize("version", [0, 3, -1, I32_MAX])
def test_unknown_version(tmp_path, version):
    path = patched(write_valid(tmp_path, "llama2rnn"), "llama2rnn", "version.bin", version=version)
    assert f"version is {version}, expected 1 or 2" in str(load_error(path))


def test_expected_llama2rnn_rejects_plain_file(tmp_path):
    path = write_valid(tmp_path, "llama2c-v2")
    message = str(load_error(path, expected_format="llama2rnn"))
    assert "the file is a plain llama2.c version 2 (Q8_0) checkpoint" in message
    assert "but a Llama2RNN memory checkpoint was requested" in message


def test_expected_plain_rejects_memory_file(tmp_path):
    path = write_valid(tmp_path, "llama2rnn")
    message = str(load_error(path, expected_format="llama2c-v2"))
    assert "the file is a Llama2RNN memory checkpoint" in message
    assert "but a plain llama2.c version 2 (Q8_0) checkpoint was requested" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_expected_format_accepts_matching_file(tmp_path, fmt):
    assert Model.load(write_valid(tmp_path, fmt), threads=1, expected_format=fmt).format == fmt


def test_unknown_expected_format_name(tmp_path):
    with pytest.raises(ValueError, match='unknown checkpoint format "gguf"') as info:
        Model.load(write_valid(tmp_path, "llama2rnn"), threads=1, expected_format="gguf")
    assert not isinstance(info.value, CheckpointError)


# ---------------------------------------------------------------------------------------------
# Field values


def nonpositive_cases() -> list[tuple[str, str, int]]:
    cases = []
    for fmt in FORMATS:
        fields = CONFIG_FIELDS + (("mem_len",) if fmt == "llama2rnn" else ())
        for field in fields:
            # A negative legacy vocab_size marks a separate classifier, so only 0 and the one
            # value without a positive counterpart are invalid there.
            values = (0, -1, I32_MIN)
            if (fmt, field) == ("llama2c-v0", "vocab_size"):
                values = (0, I32_MIN)
            cases.extend((fmt, field, value) for value in values)
    return cases


NONPOSITIVE = nonpositive_cases()


@pytest.mark.parametrize(
    "fmt, field, value", NONPOSITIVE, ids=[f"{f}-{n}-{v}" for f, n, v in NONPOSITIVE]
)
def test_nonpositive_field(tmp_path, fmt, field, value):
    path = patched(write_valid(tmp_path, fmt), fmt, "field.bin", **{field: value})
    message = str(load_error(path))
    if fmt == "llama2c-v0" and field == "vocab_size" and value < 0:
        # A negative legacy vocab_size marks a separate classifier; only i32::MIN has no size.
        assert f"{field} is {value}, expected a nonzero integer" in message
    else:
        assert f"{field} is {value}, expected a positive integer" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_n_heads_not_dividing_dim(tmp_path, fmt):
    path = patched(write_valid(tmp_path, fmt), fmt, "heads.bin", n_heads=3)
    assert "n_heads is 3, expected a divisor of dim 32" in str(load_error(path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_odd_head_size(tmp_path, fmt):
    # dim 32 over 32 heads gives head_size 1, which RoPE cannot rotate in pairs.
    path = patched(write_valid(tmp_path, fmt), fmt, "odd.bin", n_heads=32)
    message = str(load_error(path))
    assert "n_heads is 32" in message
    assert "head_size = dim / n_heads even" in message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_kv_heads", [3, 8])
def test_n_kv_heads_not_dividing_n_heads(tmp_path, fmt, n_kv_heads):
    path = patched(write_valid(tmp_path, fmt), fmt, "kv.bin", n_kv_heads=n_kv_heads)
    assert f"n_kv_heads is {n_kv_heads}, expected a divisor of n_heads 4" in str(load_error(path))


@pytest.mark.parametrize("fmt", Q8_FORMATS)
@pytest.mark.parametrize(
    "group_size, expected",
    [
        (0, "group_size is 0, expected a positive integer"),
        (-1, "group_size is -1, expected a positive integer"),
        (I32_MIN, f"group_size is {I32_MIN}, expected a positive integer"),
        (3, "group_size is 3, expected a divisor of dim 32"),
    ],
)
def test_invalid_group_size(tmp_path, fmt, group_size, expected):
    path = patched(write_valid(tmp_path, fmt), fmt, "gs.bin", group_size=group_size)
    assert expected in str(load_error(path))


@pytest.mark.parametrize("fmt", Q8_FORMATS)
def test_group_size_not_dividing_hidden_dim(tmp_path, fmt):
    # The writers pick group size 16 for hidden_dim 48; 32 divides dim 32 but not 48.
    config = replace(config_for(fmt), hidden_dim=48)
    path = patched(write_valid(tmp_path, fmt, config), fmt, "gs.bin", group_size=32)
    assert "group_size is 32, expected a divisor of hidden_dim 48" in str(load_error(path))


@pytest.mark.parametrize("fmt", ["llama2rnn", "llama2c-v2", "llama2c-v1"])
@pytest.mark.parametrize("flag", [2, 255])
def test_shared_classifier_flag_out_of_range(tmp_path, fmt, flag):
    path = patched(write_valid(tmp_path, fmt), fmt, "flag.bin", shared_classifier=flag)
    assert f"shared_classifier is {flag}, expected 0 or 1" in str(load_error(path))


# ---------------------------------------------------------------------------------------------
# Sizes that overflow or imply huge allocations (loaded in a child process)


@dataclass(frozen=True)
class HugeCase:
    fmt: str
    fields: dict[str, int]
    # Every string must appear in the message.
    expected: tuple[str, ...]
    # Error types the case may raise: a header the file contradicts is a CheckpointError,
    # and a consistent header too large for the machine may be a ValueError.
    types: tuple[str, ...] = ("CheckpointError",)


HUGE_CASES = {
    "dim-and-vocab-max": HugeCase(
        "llama2c-v1", {"dim": I32_MAX, "vocab_size": I32_MAX}, ("dim 2147483647",)
    ),
    # dim 2**31-2 over one head passes every divisibility check, and vocab_size * dim * 4
    # bytes of fp32 embedding is past 2**64.
    "embedding-bytes-overflow": HugeCase(
        "llama2c-v1",
        {"dim": I32_MAX - 1, "n_heads": 1, "n_kv_heads": 1, "vocab_size": I32_MAX},
        ("overflow a 64-bit file offset",),
    ),
    # One layer of Q8_0 matrices this wide sums to about 10 * 2**61 bytes.
    "q8-matrix-bytes-overflow": HugeCase(
        "llama2rnn",
        {
            "dim": 2**30,
            "hidden_dim": 2**31 - 32,
            "n_layers": 1,
            "n_heads": 1,
            "n_kv_heads": 1,
            "vocab_size": I32_MAX,
            "mem_len": 1,
        },
        ("overflow a 64-bit file offset",),
    ),
    "hidden-dim-max": HugeCase("llama2c-v1", {"hidden_dim": I32_MAX}, ("bytes for this config",)),
    "mem-len-max": HugeCase("llama2rnn", {"mem_len": I32_MAX}, ("it would be",)),
    "memory-n-layers-max": HugeCase("llama2rnn", {"n_layers": I32_MAX}, ("it would be",)),
    "plain-q8-n-layers-max": HugeCase("llama2c-v2", {"n_layers": I32_MAX}, ("it would be",)),
    "fp32-n-layers-max": HugeCase("llama2c-v1", {"n_layers": I32_MAX}, ("bytes for this config",)),
    "legacy-n-layers-max": HugeCase(
        "llama2c-v0", {"n_layers": I32_MAX}, ("bytes for this config",)
    ),
    "fp32-n-layers-2-24": HugeCase("llama2c-v1", {"n_layers": 2**24}, ("bytes for this config",)),
    # The file size of a plain model does not depend on seq_len, so these headers are
    # consistent. The engine must still refuse the key/value cache they imply, with a
    # MemoryError that names seq_len instead of aborting the process.
    "plain-q8-seq-len-max": HugeCase(
        "llama2c-v2", {"seq_len": I32_MAX}, ("seq_len",), ("MemoryError",)
    ),
    "fp32-seq-len-max": HugeCase(
        "llama2c-v1", {"seq_len": I32_MAX}, ("seq_len",), ("MemoryError",)
    ),
    "legacy-seq-len-max": HugeCase("llama2c-v0", {"seq_len": I32_MAX}, ("bytes for this config",)),
}


@pytest.mark.parametrize("name", list(HUGE_CASES))
def test_huge_header_values(tmp_path, name):
    case = HUGE_CASES[name]
    path = patched(write_valid(tmp_path, case.fmt), case.fmt, f"{name}.bin", **case.fields)
    outcome = load_one_in_child(tmp_path, path)
    assert outcome.error_type in case.types, outcome
    for text in case.expected:
        assert text in outcome.message


def test_memory_model_ignores_huge_seq_len(tmp_path):
    # A memory model's cache has 2 * mem_len rows, so seq_len only documents training.
    path = patched(write_valid(tmp_path, "llama2rnn"), "llama2rnn", "seq.bin", seq_len=I32_MAX)
    outcome = load_one_in_child(tmp_path, path)
    assert outcome.error_type is None, outcome


# ---------------------------------------------------------------------------------------------
# Fuzzing


def test_header_byte_fuzz(tmp_path):
    """Random header bytes either load (and run one token) or raise CheckpointError/ValueError."""
    rng = random.Random(1234)
    cases = []
    for fmt in FORMATS:
        data = write_valid(tmp_path, fmt).read_bytes()
        for iteration in range(75):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(HEADER_FIELDS_END[fmt])] = rng.randrange(256)
            path = tmp_path / f"fuzz-{fmt}-{iteration}.bin"
            path.write_bytes(bytes(mutated))
            cases.append({"path": str(path), "header": mutated[: HEADER_FIELDS_END[fmt]].hex()})

    outcomes, crash = load_in_child(tmp_path, cases)
    if crash is not None:
        case = cases[crash.index]
        name = Path(case["path"]).name
        pytest.fail(f"{name} (header {case['header']}) crashed the process: {crash.reason}")
    allowed = (None, "CheckpointError", "ValueError", "MemoryError")
    unexpected = [
        (Path(cases[o.index]["path"]).name, o.error_type, o.message)
        for o in outcomes
        if o.error_type not in allowed
    ]
    assert not unexpected
    # The loop must mostly exercise rejections, and CheckpointError must carry a message.
    rejected = [o for o in outcomes if o.error_type is not None]
    assert len(rejected) > len(outcomes) // 2
    assert all(o.message for o in rejected)


# ---------------------------------------------------------------------------------------------
# Tokenizer mismatch


def write_tokenizer_bin(path: Path, n_pieces: int) -> None:
    """Write a minimal llama2.c tokenizer.bin with <unk>, BOS, EOS and single letters."""
    letters = [bytes([ord("a") + i % 26]) * (1 + i // 26) for i in range(n_pieces - 3)]
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", *letters]
    with open(path, "wb") as file:
        file.write(struct.pack("<i", max(map(len, pieces))))
        for index, piece in enumerate(pieces):
            file.write(struct.pack("<fi", -float(index), len(piece)))
            file.write(piece)


def test_tokenizer_vocab_mismatch_by_path(tmp_path):
    path = write_valid(tmp_path, "llama2rnn")
    tokenizer_path = tmp_path / "small-tokenizer.bin"
    write_tokenizer_bin(tokenizer_path, 10)
    with pytest.raises(TokenizerError) as info:
        Model.load(path, tokenizer=tokenizer_path, threads=1)
    message = str(info.value)
    assert "has 10 pieces" in message
    assert f"vocab_size is {MEMORY.vocab_size}" in message
    assert str(tokenizer_path) in message


def test_tokenizer_vocab_mismatch_next_to_checkpoint(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = write_valid(folder, "llama2c-v1")
    write_tokenizer_bin(folder / "tokenizer.bin", PLAIN.vocab_size + 1)
    with pytest.raises(TokenizerError) as info:
        Model.load(path, threads=1)
    assert f"has {PLAIN.vocab_size + 1} pieces" in str(info.value)
    assert f"vocab_size is {PLAIN.vocab_size}" in str(info.value)


def test_tokenizer_object_vocab_mismatch(tmp_path):
    tokenizer_path = tmp_path / "tokenizer.bin"
    write_tokenizer_bin(tokenizer_path, 50)
    tokenizer = llama2rnn.load_tokenizer(tokenizer_path)
    with pytest.raises(TokenizerError) as info:
        Model.load(write_valid(tmp_path, "llama2rnn"), tokenizer=tokenizer, threads=1)
    assert "50 pieces" in str(info.value)
    assert f"vocab_size is {MEMORY.vocab_size}" in str(info.value)


def test_chitchat_tokenizer_vocab_mismatch(tmp_path, chitchat_tokenizer):
    path = write_valid(tmp_path, "llama2rnn")
    with pytest.raises(TokenizerError) as info:
        Model.load(path, tokenizer=chitchat_tokenizer.bin_path, threads=1)
    assert "has 2000 pieces" in str(info.value)
    assert f"vocab_size is {MEMORY.vocab_size}" in str(info.value)


def test_matching_tokenizer_loads(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = write_valid(folder, "llama2rnn")
    write_tokenizer_bin(folder / "tokenizer.bin", MEMORY.vocab_size)
    model = Model.load(path, threads=1)
    assert model.tokenizer.vocab_size == MEMORY.vocab_size


def test_rewrite_keeps_loaded_model_running(tmp_path):
    # The writers replace the file by a rename, so a model that has the old file mapped
    # keeps its bytes. Writing in place would change or truncate them under it (SIGBUS).
    path = write_valid(tmp_path, "llama2rnn")
    model = Model.load(path, threads=1)
    before = model.forward(1)
    config = config_for("llama2rnn")
    checkpoint.write_llama2rnn(path, config, checkpoint.random_weights(config, seed=1))
    model.reset()
    assert np.array_equal(model.forward(1), before)
    assert not np.array_equal(Model.load(path, threads=1).forward(1), before)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
