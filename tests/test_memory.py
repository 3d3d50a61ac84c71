"""Memory files: exact resume in a fresh process, corruption, locking, storage and the CLI."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from reference import checkpoint

import llama2rnn
from llama2rnn import MemoryFileError, Model, cli
from llama2rnn import memory as memory_store
from llama2rnn.memory import MemoryInUseError, MemoryWriteError

Config = checkpoint.Config

SMALL = Config(
    dim=64,
    hidden_dim=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    vocab_size=97,
    seq_len=64,
    mem_len=4,
)
# Grouped-query attention: 6 query heads on 2 key/value heads, M 5.
GQA = Config(
    dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=61, seq_len=32, mem_len=5
)
VANILLA = Config(
    dim=64,
    hidden_dim=160,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    vocab_size=83,
    seq_len=24,
    mem_len=0,
)

PROMPT = [1, 5, 9, 2, 7]
GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": None}
# Random models soon repeat one token with near certainty at temperature 1, so sampling uses a
# high temperature to keep the random generator in play.
SEEDED = {"temperature": 3.0, "top_p": 0.95, "seed": 1234}

# Byte range of the save time in the header; it differs between otherwise equal saves.
SAVED_TIME = slice(96, 104)

# Runs in a fresh interpreter: loads each job's memory and continues it, writing the sampled
# tokens and the logits after each of them to job["out"] (.npz).
CONTINUE_SCRIPT = r"""
import json, sys
import numpy as np
from llama2rnn import Model

spec = json.loads(sys.argv[1])
models = {}
for job in spec["jobs"]:
    key = (job["checkpoint"], job["mode"])
    if key not in models:
        models[key] = Model.load(job["checkpoint"], threads=1, mode=job["mode"])
    model = models[key]
    model.load_memory(job["memory"], attach=False)
    model.feed(job["prompt"])
    model.engine.set_sampling(job["temperature"], job["top_p"], job["seed"])
    tokens, logits = [], []
    for _ in range(job["steps"]):
        token = model.engine.sample()
        logits.append(model.forward(token))
        tokens.append(token)
    np.savez(job["out"], tokens=np.array(tokens), logits=np.array(logits, dtype=np.float32))
"""

# Holds `sys.argv[1]` open for writing until stdin closes.
HOLD_LOCK_SCRIPT = r"""
import sys
from llama2rnn.memory import MemoryWriter, locate

writer = MemoryWriter.open(locate(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data folder for every test (child processes inherit it)."""
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMA2RNN_HOME", str(home))
    return home


def write_model(folder: Path, config: Config, *, seed: int = 0, name: str | None = None) -> Path:
    path = folder / (name or f"model-{seed}.bin")
    weights = checkpoint.random_weights(config, seed=seed)
    if config.mem_len:
        checkpoint.write_llama2rnn(path, config, weights)
    else:
        checkpoint.write_llama2c_v2(path, config, weights)
    return path


def load(path: Path, mode: str = "chunk") -> Model:
    return Model.load(path, threads=1, mode=mode)


def run_steps(model: Model, steps: int, sampling: dict[str, Any]) -> tuple[list[int], np.ndarray]:
    """Sample `steps` tokens, feeding each; return them and the logits after each."""
    model.engine.set_sampling(sampling["temperature"], sampling["top_p"], sampling["seed"])
    tokens, logits = [], []
    for _ in range(steps):
        token = model.engine.sample()
        logits.append(model.forward(token))
        tokens.append(token)
    return tokens, np.array(logits, dtype=np.float32)


def run_in_fresh_process(jobs: list[dict[str, Any]]) -> list[tuple[list[int], np.ndarray]]:
    subprocess.run(
        [sys.executable, "-c", CONTINUE_SCRIPT, json.dumps({"jobs": jobs})],
        check=True,
        timeout=60,
    )
    results = []
    for job in jobs:
        with np.load(job["out"]) as data:
            results.append(([int(t) for t in data["tokens"]], data["logits"]))
    return results


def without_save_time(data: bytes) -> bytes:
    """Memory-file bytes with the save time and the checksum that covers it blanked."""
    return data[: SAVED_TIME.start] + bytes(8) + data[SAVED_TIME.stop : -4]


def probe_logits(model: Model, token: int = 3) -> np.ndarray:
    """The logits after feeding `token`, leaving the model's state as it was."""
    snapshot = model.snapshot()
    logits = model.forward(token)
    model.restore(snapshot)
    return logits


# =============================================================================================
# Exact resume in a fresh process


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize(
    "config, mode",
    [(SMALL, "chunk"), (SMALL, "token"), (GQA, "chunk"), (GQA, "token")],
    ids=["chunk", "token", "gqa-chunk", "gqa-token"],
)
def test_resume_in_fresh_process_is_exact(tmp_path, config, mode, sampling):
    path = write_model(tmp_path, config)
    steps = 3 * config.mem_len + 2
    half = steps // 2

    reference = load(path, mode)
    reference.feed(PROMPT)
    expected_tokens, expected_logits = run_steps(reference, steps, sampling)

    first = load(path, mode)
    first.feed(PROMPT)
    tokens, _ = run_steps(first, half, sampling)
    assert tokens == expected_tokens[:half]
    first.save_memory("resume")

    job = {
        "checkpoint": str(path),
        "mode": mode,
        "memory": "resume",
        "prompt": [],
        "steps": steps - half,
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "seed": None,
        "out": str(tmp_path / "out.npz"),
    }
    [(tokens, logits)] = run_in_fresh_process([job])
    assert tokens == expected_tokens[half:]
    np.testing.assert_array_equal(logits, expected_logits[half:])


def test_resume_with_new_seed_reseeds(tmp_path):
    path = write_model(tmp_path, SMALL)
    steps, half, new_seed = 12, 6, 99

    # Reference: reseed with new_seed at the half.
    reference = load(path)
    reference.feed(PROMPT)
    run_steps(reference, half, SEEDED)
    reseeded = {**SEEDED, "seed": new_seed}
    expected_tokens, expected_logits = run_steps(reference, steps - half, reseeded)
    # Without the reseed, the saved generator state would continue.
    unseeded = load(path)
    unseeded.feed(PROMPT)
    continued_tokens, _ = run_steps(unseeded, steps, SEEDED)

    first = load(path)
    first.feed(PROMPT)
    run_steps(first, half, SEEDED)
    first.save_memory("resume")
    job = {
        "checkpoint": str(path),
        "mode": "chunk",
        "memory": "resume",
        "prompt": [],
        "steps": steps - half,
        "temperature": SEEDED["temperature"],
        "top_p": SEEDED["top_p"],
        "seed": new_seed,
        "out": str(tmp_path / "out.npz"),
    }
    [(tokens, logits)] = run_in_fresh_process([job])
    assert tokens == expected_tokens
    np.testing.assert_array_equal(logits, expected_logits)
    assert tokens != continued_tokens[half:]
    assert len(set(tokens)) > 2, "sampling collapsed to one token: the test checks nothing"


@pytest.mark.parametrize("mode", ["chunk", "token"])
def test_resume_at_every_chunk_position(tmp_path, mode):
    config = SMALL
    path = write_model(tmp_path, config)
    steps = 3 * config.mem_len
    reference = load(path, mode)
    reference.feed(PROMPT)
    expected_tokens, expected_logits = run_steps(reference, steps, SEEDED)

    # Saves at positions 2M..3M-1 (every chunk position, after two memory updates), and one
    # at position 0, before the prompt.
    jobs = []
    model = load(path, mode)
    memory_file = tmp_path / "memories" / "at-0.mem"
    model.save_memory(str(memory_file))
    jobs.append({"memory": str(memory_file), "prompt": PROMPT, "done": 0})
    model.feed(PROMPT)
    model.engine.set_sampling(SEEDED["temperature"], SEEDED["top_p"], SEEDED["seed"])
    done = 0
    for chunk_position in range(config.mem_len):
        while model.position < 2 * config.mem_len + chunk_position:
            token = model.engine.sample()
            model.forward(token)
            done += 1
        memory_file = tmp_path / "memories" / f"at-{model.position}.mem"
        model.save_memory(str(memory_file))
        header = memory_store.parse_header(memory_file.read_bytes())
        assert header.chunk_rows == chunk_position
        jobs.append({"memory": str(memory_file), "prompt": [], "done": done})

    for index, job in enumerate(jobs):
        job.update(
            {
                "checkpoint": str(path),
                "mode": mode,
                "steps": steps - job["done"],
                "temperature": SEEDED["temperature"],
                "top_p": SEEDED["top_p"],
                "seed": SEEDED["seed"] if job["done"] == 0 else None,
                "out": str(tmp_path / f"out-{index}.npz"),
            }
        )
    results = run_in_fresh_process(jobs)
    for job, (tokens, logits) in zip(jobs, results):
        done = job["done"]
        assert tokens == expected_tokens[done:], f"resumed from {job['memory']}"
        np.testing.assert_array_equal(logits, expected_logits[done:], err_msg=job["memory"])


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_cli_generate_with_memory_continues_text(tmp_path, chitchat_tokenizer, sampling):
    tokenizer = llama2rnn.load_tokenizer(chitchat_tokenizer.bin_path)
    config = Config(
        dim=64,
        hidden_dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=tokenizer.vocab_size,
        seq_len=64,
        mem_len=8,
    )
    path = write_model(tmp_path, config)
    prompts = ["Hi, how are you?", "What did you do today?"]
    temperature, top_p, seed = sampling["temperature"], sampling["top_p"], 7

    reference = Model.load(path, tokenizer, threads=1)
    expected_first = reference.generate(prompts[0], 10, temperature, top_p, seed=seed)
    expected_second = reference.generate(prompts[1], 10, temperature, top_p)

    base = [
        sys.executable,
        "-m",
        "llama2rnn",
        "generate",
        "--model",
        str(path),
        "--tokenizer",
        str(chitchat_tokenizer.bin_path),
        "--threads",
        "1",
        "--temperature",
        str(temperature),
        "--top-p",
        str(top_p),
        "--steps",
        "10",
        "--memory",
        "chat",
    ]
    first = subprocess.run(
        base + ["--prompt", prompts[0], "--seed", str(seed)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout == expected_first + "\n"
    second = subprocess.run(
        base + ["--prompt", prompts[1]], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout == expected_second + "\n"

    saved = memory_store.locate("chat").path.read_bytes()
    expected_state = reference.snapshot().data
    assert without_save_time(saved) == without_save_time(expected_state)


# =============================================================================================
# Model API


def test_snapshot_is_independent_copy(tmp_path):
    model = load(write_model(tmp_path, SMALL))
    model.feed(PROMPT)
    snapshot = model.snapshot()
    data = snapshot.data
    expected = probe_logits(model)
    model.feed([4, 4, 4, 4, 4, 4])
    assert snapshot.data == data
    model.restore(snapshot)
    assert model.position == len(PROMPT)
    np.testing.assert_array_equal(model.forward(3), expected)


def test_restore_rejects_other_model(tmp_path):
    model = load(write_model(tmp_path, SMALL, seed=0))
    other = load(write_model(tmp_path, SMALL, seed=1))
    other.feed(PROMPT)
    model.feed([3])
    before = model.engine.save_state()
    with pytest.raises(MemoryFileError, match="other weights"):
        model.restore(other.snapshot())
    assert model.engine.save_state() == before


def test_last_token_is_tracked_and_saved(tmp_path, chitchat_tokenizer):
    tokenizer = llama2rnn.load_tokenizer(chitchat_tokenizer.bin_path)
    config = Config(
        dim=32,
        hidden_dim=64,
        n_layers=1,
        n_heads=4,
        n_kv_heads=4,
        vocab_size=tokenizer.vocab_size,
        seq_len=32,
        mem_len=4,
    )
    model = Model.load(write_model(tmp_path, config), tokenizer, threads=1)
    assert model.snapshot().last_token is None
    model.feed([5, 6, 7])
    assert model.snapshot().last_token == 7
    model.forward(11)
    assert model.snapshot().last_token == 11
    model.generate("Hello", 3, temperature=0.0)
    last = model.snapshot().last_token
    assert last is not None and last != 11
    model.save_memory("tracked")
    saved = memory_store.locate("tracked").path.read_bytes()
    assert memory_store.parse_header(saved).last_token == last
    fresh = Model.load(model.engine.path, tokenizer, threads=1)
    fresh.load_memory("tracked")
    assert fresh.snapshot().last_token == last
    fresh.reset_memory()
    assert fresh.snapshot().last_token is None
    assert fresh.position == 0


def test_open_memory_creates_loads_and_resets(tmp_path):
    path = write_model(tmp_path, SMALL)
    model = load(path)
    assert model.open_memory("chat") is False
    assert model.memory_path == memory_store.locate("chat").path
    assert not model.memory_path.exists()
    model.feed(PROMPT)
    model.save_memory()
    saved = model.memory_path.read_bytes()
    model.close_memory()
    assert model.memory_path is None

    other = load(path)
    assert other.open_memory("chat") is True
    assert other.position == len(PROMPT)
    other.close_memory()

    fresh = load(path)
    assert fresh.open_memory("chat", reset=True) is True
    assert fresh.position == 0
    # The file is replaced only by the next save.
    assert memory_store.locate("chat").path.read_bytes() == saved
    fresh.save_memory()
    assert memory_store.parse_header(memory_store.locate("chat").path.read_bytes()).position == 0


def test_save_memory_rejects_overwrite(tmp_path):
    model = load(write_model(tmp_path, SMALL))
    model.feed(PROMPT)
    model.save_memory("kept")
    kept = memory_store.locate("kept").path.read_bytes()
    model.feed([1])
    with pytest.raises(FileExistsError, match="memory 'kept' already exists"):
        model.save_memory("kept")
    assert memory_store.locate("kept").path.read_bytes() == kept
    model.save_memory("kept", overwrite=True)
    assert memory_store.parse_header(memory_store.locate("kept").path.read_bytes()).position == 6
    with pytest.raises(ValueError, match="no memory is open"):
        model.save_memory()


def test_load_memory_missing_raises(tmp_path):
    model = load(write_model(tmp_path, SMALL))
    with pytest.raises(FileNotFoundError, match="memory 'absent' not found"):
        model.load_memory("absent")
    assert model.memory_path is None
    # The failed load released the lock it took.
    with memory_store.MemoryWriter.open(memory_store.locate("absent")):
        pass


def test_failed_open_keeps_state_and_releases_lock(tmp_path):
    model = load(write_model(tmp_path, SMALL, seed=0))
    other = load(write_model(tmp_path, SMALL, seed=1))
    other.feed(PROMPT)
    other.save_memory("foreign")
    model.feed([8, 9])
    before = model.engine.save_state()
    with pytest.raises(MemoryFileError, match="cannot load memory 'foreign'"):
        model.open_memory("foreign")
    assert model.engine.save_state() == before
    assert model.memory_path is None
    with memory_store.MemoryWriter.open(memory_store.locate("foreign")):
        pass


def test_memory_from_plain_llama2c_model(tmp_path):
    path = write_model(tmp_path, VANILLA)
    model = load(path)
    model.feed(PROMPT)
    expected = probe_logits(model)
    model.save_memory("plain")
    fresh = load(path)
    fresh.load_memory("plain", attach=False)
    assert fresh.position == len(PROMPT)
    np.testing.assert_array_equal(fresh.forward(3), expected)


def test_reset_and_position_zero_load_clear_logits(tmp_path):
    model = load(write_model(tmp_path, SMALL))
    empty = model.engine.save_state()
    model.feed(PROMPT)
    assert np.any(np.asarray(model.engine.logits()) != 0)
    model.engine.reset()
    np.testing.assert_array_equal(model.engine.logits(), 0.0)
    model.feed(PROMPT)
    model.engine.load_state(empty)
    np.testing.assert_array_equal(model.engine.logits(), 0.0)


def test_initial_memory_computed_or_copied(tmp_path):
    # A reset leaves the initial memory's keys and values to be made on first use. The first
    # state computes them, later resets copy them, and a save made before any token contains
    # them too.
    path = write_model(tmp_path, SMALL)
    model = load(path)
    first = model.engine.save_state()
    model.feed(PROMPT)
    model.engine.reset()
    assert model.engine.save_state() == first
    other = load(path)
    other.feed(PROMPT)
    other.engine.load_state(first)
    np.testing.assert_array_equal(other.forward(3), load(path).forward(3))


def test_plain_memory_past_seq_len_is_rejected(tmp_path):
    model = load(write_model(tmp_path, VANILLA))
    model.feed(list(range(1, VANILLA.seq_len - 1)))
    patched = bytearray(model.engine.save_state())
    struct.pack_into("<Q", patched, 64, 1000)
    patched[-4:] = struct.pack("<I", zlib.crc32(bytes(patched[:-4])))
    guard = StateGuard(model)
    expect_rejected(model, tmp_path / "far.mem", bytes(patched), guard, "position 1000 is past")


# =============================================================================================
# Corrupt and foreign files


class StateGuard:
    """The model's state before a failed load, to check that the load changed nothing."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.state = model.engine.save_state()
        self.last_token = model.snapshot().last_token
        self.logits = probe_logits(model)

    def check(self, context: str) -> None:
        assert self.model.engine.save_state() == self.state, context
        assert self.model.snapshot().last_token == self.last_token, context
        np.testing.assert_array_equal(probe_logits(self.model), self.logits, err_msg=context)


@pytest.fixture
def saved_model(tmp_path: Path) -> tuple[Model, bytes]:
    """A model at position 10, and memory-file bytes of its state at position 7 (part way into
    the second chunk)."""
    model = load(write_model(tmp_path, GQA))
    model.feed(PROMPT + [11, 12])
    data = model.engine.save_state(12, 1)
    model.feed([13, 14, 15])
    return model, data


def expect_rejected(model: Model, file: Path, data: bytes, guard: StateGuard, match: str) -> None:
    file.write_bytes(data)
    with pytest.raises(MemoryFileError, match=match):
        model.load_memory(str(file), attach=False)
    guard.check(match)


def test_truncated_files_are_rejected(tmp_path, saved_model):
    model, data = saved_model
    guard = StateGuard(model)
    header = memory_store.HEADER_BYTES
    offsets = {0, 1, 7, 8, 12, 16, 100, header - 1, header, header + 1, header + 4}
    offsets |= set(range(0, len(data), max(1, len(data) // 50)))
    offsets |= set(range(len(data) - 9, len(data)))
    file = tmp_path / "truncated.mem"
    for offset in sorted(offsets):
        file.write_bytes(data[:offset])
        with pytest.raises(MemoryFileError):
            model.load_memory(str(file), attach=False)
        with pytest.raises(MemoryFileError):
            memory_store.check_memory_bytes(data[:offset], "truncated")
    guard.check("after truncated loads")
    expect_rejected(model, file, data + b"\0", guard, "checksum|bytes")


def test_every_header_bit_flip_is_rejected(tmp_path, saved_model):
    model, data = saved_model
    guard = StateGuard(model)
    file = tmp_path / "flipped.mem"
    for offset in range(memory_store.HEADER_BYTES):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            file.write_bytes(flipped)
            with pytest.raises(MemoryFileError):
                model.load_memory(str(file), attach=False)
        if offset % 16 == 0:
            guard.check(f"after flips in header byte {offset}")
    guard.check("after header flips")


def test_payload_and_checksum_bit_flips_are_rejected(tmp_path, saved_model):
    model, data = saved_model
    guard = StateGuard(model)
    file = tmp_path / "flipped.mem"
    rng = np.random.default_rng(5)
    payload_offsets = rng.integers(memory_store.HEADER_BYTES, len(data) - 4, size=300)
    flips = [(int(offset), int(rng.integers(8))) for offset in payload_offsets]
    flips += [(offset, bit) for offset in range(len(data) - 4, len(data)) for bit in range(8)]
    for offset, bit in flips:
        flipped = bytearray(data)
        flipped[offset] ^= 1 << bit
        file.write_bytes(flipped)
        with pytest.raises(MemoryFileError, match="checksum"):
            model.load_memory(str(file), attach=False)
    guard.check("after payload flips")


def test_memory_of_other_weights_is_rejected(tmp_path, saved_model):
    model, _ = saved_model
    other = load(write_model(tmp_path, GQA, seed=1))
    other.feed(PROMPT)
    guard = StateGuard(model)
    message = "same config but other weights"
    expect_rejected(model, tmp_path / "other.mem", other.engine.save_state(), guard, message)


def test_memory_of_other_config_is_rejected(tmp_path, saved_model):
    model, _ = saved_model
    other = load(write_model(tmp_path, SMALL))
    other.feed(PROMPT)
    guard = StateGuard(model)
    expect_rejected(model, tmp_path / "other.mem", other.engine.save_state(), guard, "config")


def test_memory_of_other_mode_is_rejected(tmp_path, saved_model):
    model, _ = saved_model
    token_mode = load(Path(model.engine.path), "token")
    token_mode.feed(PROMPT)
    guard = StateGuard(model)
    data = token_mode.engine.save_state()
    expect_rejected(model, tmp_path / "token.mem", data, guard, "token update mode")


def test_unknown_version_is_rejected(tmp_path, saved_model):
    model, data = saved_model
    guard = StateGuard(model)
    patched = bytearray(data)
    struct.pack_into("<I", patched, 8, 2)
    body = bytes(patched[:-4])
    patched[-4:] = struct.pack("<I", zlib.crc32(body))
    expect_rejected(model, tmp_path / "v2.mem", bytes(patched), guard, "version 2 is not supported")
    with pytest.raises(MemoryFileError, match="version 2"):
        memory_store.check_memory_bytes(bytes(patched), "v2")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is a text file\n" * 300, b"L2RN"],
    ids=["empty", "text", "magic-prefix"],
)
def test_non_memory_files_are_rejected(tmp_path, saved_model, content):
    model, _ = saved_model
    guard = StateGuard(model)
    expect_rejected(model, tmp_path / "text.mem", content, guard, "not a llama2rnn memory file")


# =============================================================================================
# Names and folders


def test_data_home_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA2RNN_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert memory_store.data_home() == tmp_path / "a"
    monkeypatch.delenv("LLAMA2RNN_HOME")
    assert memory_store.data_home() == tmp_path / "xdg" / "llama2rnn"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert memory_store.data_home() == tmp_path / "user" / ".local" / "share" / "llama2rnn"


def test_names_and_paths(data_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("default", "chat-2", "a_b", "v1.2", "X"):
        location = memory_store.locate(name)
        assert location.path == data_home / "memories" / f"{name}.mem"
        assert location.lock_path == data_home / "memories" / f"{name}.lock"
        assert location.name == name
    assert memory_store.locate("saved.mem").path == tmp_path / "saved.mem"
    assert memory_store.locate("saved.mem").name is None
    assert memory_store.locate("saved.mem").lock_path == tmp_path / "saved.lock"
    assert memory_store.locate("./state").path == tmp_path / "state"
    assert memory_store.locate("./state").lock_path == tmp_path / "state.lock"
    assert memory_store.locate(tmp_path / "x").path == tmp_path / "x"


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a b", "naïve", "a:b", "x" * 201, "a*"])
def test_invalid_names_raise(name):
    with pytest.raises(ValueError, match="memory name"):
        memory_store.locate(name)


def test_listing_ignores_temps_and_locks(data_home, tmp_path):
    model = load(write_model(tmp_path, SMALL))
    model.feed(PROMPT)
    model.save_memory("a")
    model.save_memory("b")
    folder = data_home / "memories"
    (folder / ".a.mem.123-0123abcd.tmp").write_bytes(b"partial")
    (folder / "a.lock").write_text("{}")
    (folder / "notes.txt").write_text("x")
    (folder / "broken.mem").write_bytes(b"not a memory")
    listings = memory_store.list_memories()
    assert [item.name for item in listings] == ["a", "b", "broken"]
    assert listings[0].header is not None and listings[0].header.position == len(PROMPT)
    assert listings[2].header is None
    assert "not a llama2rnn memory file" in (listings[2].error or "")


def test_save_removes_stale_temps_only_of_its_memory(data_home, tmp_path):
    model = load(write_model(tmp_path, SMALL))
    model.save_memory("a")
    folder = data_home / "memories"
    stale = folder / ".a.mem.4242-deadbeef.tmp"
    stale.write_bytes(b"left by a killed save")
    foreign = folder / ".a.mem.b.mem.4242-deadbeef.tmp"
    foreign.write_bytes(b"belongs to a.mem.b.mem")
    model.open_memory("a")
    model.save_memory()
    assert not stale.exists()
    assert foreign.exists()
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".a.mem.b.mem.4242-deadbeef.tmp", "a.lock", "a.mem"]
    model.close_memory()
    assert not (folder / "a.lock").exists()


def test_saved_file_is_private(tmp_path):
    model = load(write_model(tmp_path, SMALL))
    path = model.save_memory("private")
    assert path.stat().st_mode & 0o777 == 0o600


# =============================================================================================
# Locking


@pytest.fixture
def lock_holder() -> Iterator[Any]:
    """Start a child process that holds a memory's writer lock; yields a starter function."""
    children: list[subprocess.Popen[str]] = []

    def start(name: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK_SCRIPT, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


def test_second_writer_gets_holder_pid(tmp_path, lock_holder):
    model = load(write_model(tmp_path, SMALL))
    model.feed(PROMPT)
    model.save_memory("shared")
    model.reset()
    child = lock_holder("shared")
    with pytest.raises(MemoryInUseError) as raised:
        model.open_memory("shared")
    message = str(raised.value)
    assert f"memory 'shared' is in use by process {child.pid} (python -c shared)" in message
    assert message.endswith("close it first")
    with pytest.raises(MemoryInUseError, match=f"process {child.pid}"):
        model.save_memory("shared", overwrite=True)
    assert model.memory_path is None
    # Readers do not need the lock.
    model.load_memory("shared", attach=False)
    assert model.position == len(PROMPT)

    # A killed holder leaves its lock file, which no longer blocks.
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert memory_store.locate("shared").lock_path.exists()
    assert memory_store.lock_holder(memory_store.locate("shared")) is None
    model.open_memory("shared")
    model.save_memory()


def test_cli_reports_memory_in_use(tmp_path, lock_holder, capsys):
    model = load(write_model(tmp_path, SMALL))
    model.save_memory("busy")
    child = lock_holder("busy")
    assert cli.main(["memory", "rm", "busy", "--yes"]) == 1
    error = capsys.readouterr().err
    assert f"memory 'busy' is in use by process {child.pid}" in error
    assert memory_store.locate("busy").path.exists()
    assert cli.main(["memory", "show", "busy"]) == 0
    assert f"by process {child.pid}" in capsys.readouterr().out


def test_same_process_second_writer_is_rejected(tmp_path):
    path = write_model(tmp_path, SMALL)
    first, second = load(path), load(path)
    first.open_memory("mine")
    with pytest.raises(MemoryInUseError, match=f"process {os.getpid()}"):
        second.open_memory("mine")
    # Opening it again through the same model reuses its lock.
    first.save_memory()
    first.open_memory("mine")
    first.load_memory("mine")
    first.close_memory()
    second.open_memory("mine")


# =============================================================================================
# Failed writes


def read_only_folder_works(folder: Path) -> bool:
    """Whether chmod makes `folder` unwritable for this process (it does not for root)."""
    probe = folder / "probe"
    folder.chmod(0o500)
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return True
    finally:
        folder.chmod(0o700)
    probe.unlink()
    return False


def assert_old_file_kept(folder: Path, path: Path, old: bytes) -> None:
    assert path.read_bytes() == old
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(memory_store.TEMP_SUFFIX)]
    assert leftovers == []


def test_read_only_folder_write_fails_cleanly(tmp_path):
    folder = tmp_path / "memories"
    folder.mkdir()
    if not read_only_folder_works(folder):
        pytest.skip("running as root: chmod does not stop writes (simulated in the next test)")
    model = load(write_model(tmp_path, SMALL))
    path = folder / "x.mem"
    model.save_memory(str(path))
    old = path.read_bytes()
    model.open_memory(str(path))
    model.feed(PROMPT)
    folder.chmod(0o500)
    try:
        with pytest.raises(MemoryWriteError, match=f"cannot save memory file {path}"):
            model.save_memory()
    finally:
        folder.chmod(0o700)
    assert_old_file_kept(folder, path, old)


@pytest.mark.parametrize(
    "function, code",
    [
        ("open", errno.EACCES),
        ("write", errno.ENOSPC),
        ("fsync", errno.EIO),
        ("replace", errno.EACCES),
    ],
)
def test_simulated_write_failure_keeps_old_file(tmp_path, monkeypatch, function, code):
    folder = tmp_path / "memories"
    folder.mkdir()
    model = load(write_model(tmp_path, SMALL))
    path = folder / "x.mem"
    model.open_memory(str(path))
    model.save_memory()
    old = path.read_bytes()
    model.feed(PROMPT)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as patch:
        patch.setattr(os, function, fail)
        with pytest.raises(MemoryWriteError) as raised:
            model.save_memory()
    message = str(raised.value)
    assert f"cannot save memory file {path}" in message
    assert os.strerror(code) in message
    assert "unchanged" in message
    assert raised.value.errno == code
    assert_old_file_kept(folder, path, old)
    # The memory is still open and the next save works.
    model.save_memory()
    assert memory_store.parse_header(path.read_bytes()).position == len(PROMPT)


def test_folder_sync_failure_says_file_replaced(tmp_path, monkeypatch):
    model = load(write_model(tmp_path, SMALL))
    model.feed(PROMPT)

    def fail(folder: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(memory_store, "_fsync_folder", fail)
    with pytest.raises(MemoryWriteError, match="replaced the old one but may not survive"):
        model.save_memory("synced")
    assert memory_store.parse_header(memory_store.locate("synced").path.read_bytes()).position == 5


# =============================================================================================
# Raw memory dumps of the C runtime


def to_raw_dump(data: bytes, config: Config, rng: np.random.Generator) -> bytes:
    """Convert memory-file bytes to the C runtime's raw dump (a plain model has no `mem`).
    The parts of the caches that the C runtime would hold but the memory file does not (rows
    past the window, and floats kv_dim..dim of each row) get random values, which the import
    must ignore."""
    header = memory_store.parse_header(data)
    n_layers, dim, kv_dim, mem_len = config.n_layers, config.dim, config.kv_dim, config.mem_len
    window_rows = mem_len + header.chunk_rows
    floats = np.frombuffer(data, dtype="<f4", offset=memory_store.HEADER_BYTES)
    mem = floats[: n_layers * mem_len * dim]
    rest = floats[mem.size :]
    parts = [mem.tobytes()]
    for index in range(2):
        rows = rest[index * n_layers * window_rows * kv_dim :][: n_layers * window_rows * kv_dim]
        cache = rng.standard_normal((n_layers, config.seq_len, dim)).astype("<f4")
        cache[:, :window_rows, :kv_dim] = rows.reshape(n_layers, window_rows, kv_dim)
        parts.append(cache.tobytes())
    parts.append(struct.pack("<i", header.position))
    return b"".join(parts)


@pytest.mark.parametrize(
    "config, position",
    [
        (GQA, 0),
        (GQA, 3),
        (GQA, GQA.mem_len),
        (GQA, GQA.mem_len + 2),
        (GQA, 3 * GQA.mem_len - 1),
        (VANILLA, 0),
        (VANILLA, 7),
    ],
)
def test_raw_import_matches_saved_state(tmp_path, config, position):
    path = write_model(tmp_path, config)
    model = load(path)
    rng = np.random.default_rng(position)
    tokens = [int(t) for t in rng.integers(0, config.vocab_size, position)]
    model.feed(tokens)
    raw = tmp_path / "dump.bin"
    raw.write_bytes(to_raw_dump(model.engine.save_state(), config, np.random.default_rng(1)))
    assert raw.stat().st_size == memory_store.raw_dump_size(model.engine.config)

    imported = load(path)
    imported.import_raw_memory(raw)
    assert imported.position == position
    assert imported.snapshot().last_token is None
    for token in [4, 17, 30, 2, 9, 9, 41]:
        np.testing.assert_array_equal(imported.forward(token), model.forward(token))


def test_raw_import_rejects_wrong_size(tmp_path):
    model = load(write_model(tmp_path, GQA))
    model.feed([1])
    before = model.engine.save_state()
    raw = tmp_path / "dump.bin"
    size = memory_store.raw_dump_size(model.engine.config)
    for wrong in (0, size - 4, size + 4):
        raw.write_bytes(bytes(wrong))
        with pytest.raises(MemoryFileError, match=f"a raw dump of this model .* is {size} bytes"):
            model.import_raw_memory(raw)
    assert model.engine.save_state() == before


def test_cli_import_raw(tmp_path, capsys):
    path = write_model(tmp_path, GQA)
    model = load(path)
    model.feed([5, 6, 7, 8, 9, 10, 11])
    raw = tmp_path / "dump.bin"
    raw.write_bytes(to_raw_dump(model.engine.save_state(), GQA, np.random.default_rng(2)))
    args = ["memory", "import-raw", str(raw), "old", "--model", str(path), "--threads", "1"]
    assert cli.main(args) == 0
    assert "at 7 tokens" in capsys.readouterr().out
    assert cli.main(args) == 1
    assert "already exists" in capsys.readouterr().err
    loaded = load(path)
    loaded.load_memory("old", attach=False)
    np.testing.assert_array_equal(loaded.forward(3), model.forward(3))


# =============================================================================================
# CLI


def saved_memory(tmp_path: Path, name: str, tokens: list[int] = PROMPT) -> Model:
    model = load(write_model(tmp_path, SMALL))
    model.feed(tokens)
    model.save_memory(name)
    return model


def test_cli_list_and_show(tmp_path, data_home, capsys):
    assert cli.main(["memory", "list"]) == 0
    assert "no memories in" in capsys.readouterr().out
    model = saved_memory(tmp_path, "chat")
    (data_home / "memories" / "broken.mem").write_bytes(b"junk")
    assert cli.main(["memory", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "TOKENS", "LAST", "SAVED", "SIZE"]
    assert lines[1].startswith("broken")
    assert "invalid memory file" in lines[1]
    assert lines[2].startswith("chat")
    assert "llama2rnn chunk, dim 64, 2 layers, M 4" in lines[2]
    assert f"  {len(PROMPT)}  " in lines[2]

    assert cli.main(["memory", "show", "chat"]) == 0
    shown = dict(
        re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()
    )
    assert shown["tokens consumed"] == str(len(PROMPT))
    assert shown["chunk position"] == f"{len(PROMPT) % 4} of 4"
    assert shown["weights fingerprint"] == f"{model.engine.fingerprint:016x}"
    assert shown["last token"] == str(PROMPT[-1])
    assert shown["in use"] == "no"
    assert "checksum valid" in shown["size"]

    assert cli.main(["memory", "show", "broken"]) == 1
    assert "memory 'broken': invalid memory file" in capsys.readouterr().err
    assert cli.main(["memory", "show", "absent"]) == 1
    assert "memory 'absent' not found" in capsys.readouterr().err


def test_cli_fork_export_import(tmp_path, capsys):
    saved_memory(tmp_path, "chat")
    original = memory_store.locate("chat").path.read_bytes()
    assert cli.main(["memory", "fork", "chat", "branch"]) == 0
    assert memory_store.locate("branch").path.read_bytes() == original
    assert cli.main(["memory", "fork", "chat", "branch"]) == 1
    assert "memory 'branch' already exists" in capsys.readouterr().err
    assert cli.main(["memory", "fork", "chat", ".bad"]) == 1

    exported = tmp_path / "out" / "chat.mem"
    assert cli.main(["memory", "export", "chat", str(exported)]) == 0
    assert exported.read_bytes() == original
    assert not (tmp_path / "out" / "chat.lock").exists()
    assert cli.main(["memory", "export", "chat", str(exported)]) == 1

    assert cli.main(["memory", "import", str(exported), "copy"]) == 0
    assert memory_store.locate("copy").path.read_bytes() == original
    assert cli.main(["memory", "import", str(exported), "copy"]) == 1
    capsys.readouterr()

    corrupt = tmp_path / "corrupt.mem"
    damaged = bytearray(original)
    damaged[500] ^= 0x10
    corrupt.write_bytes(damaged)
    assert cli.main(["memory", "import", str(corrupt), "bad"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert not memory_store.locate("bad").path.exists()
    corrupt.write_bytes(original[:-10])
    assert cli.main(["memory", "import", str(corrupt), "bad"]) == 1
    assert not memory_store.locate("bad").path.exists()


class FakeTerminal:
    def __init__(self, answer: str | None) -> None:
        self.answer = answer

    def isatty(self) -> bool:
        return self.answer is not None

    def readline(self) -> str:
        return (self.answer or "") + "\n"


def test_cli_rm_confirms(tmp_path, monkeypatch, capsys):
    saved_memory(tmp_path, "chat")
    path = memory_store.locate("chat").path

    monkeypatch.setattr(sys, "stdin", FakeTerminal(None))
    assert cli.main(["memory", "rm", "chat"]) == 1
    assert "pass --yes" in capsys.readouterr().err
    assert path.exists()

    monkeypatch.setattr(sys, "stdin", FakeTerminal("n"))
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli.main(["memory", "rm", "chat"]) == 1
    assert path.exists()

    monkeypatch.setattr(sys, "stdin", FakeTerminal("y"))
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert cli.main(["memory", "rm", "chat"]) == 0
    assert not path.exists()
    assert not memory_store.locate("chat").lock_path.exists()

    saved_memory(tmp_path, "other")
    monkeypatch.setattr(sys, "stdin", FakeTerminal(None))
    assert cli.main(["memory", "rm", "other", "--yes"]) == 0
    assert not memory_store.locate("other").path.exists()
    assert cli.main(["memory", "rm", "other", "--yes"]) == 1
    assert "memory 'other' not found" in capsys.readouterr().err


def test_cli_generate_reset_needs_memory(capsys):
    assert cli.main(["generate", "--reset"]) == 1
    assert "--reset needs --memory" in capsys.readouterr().err
