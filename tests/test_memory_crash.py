"""A save killed at a random moment leaves a loadable memory: the old state or the new one."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reference import checkpoint

from llama2rnn import Model
from llama2rnn import memory as memory_store

# Large enough that a save (230 to 310 KB) takes a noticeable share of the saver's loop.
CONFIG = checkpoint.Config(
    dim=128,
    hidden_dim=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    vocab_size=256,
    seq_len=128,
    mem_len=32,
)
FIRST_TOKENS = list(range(10, 50))  # state A: position 40, chunk position 8
MORE_TOKENS = list(range(60, 80))  # state B: position 60, chunk position 28
ITERATIONS = 40
MIN_ITERATIONS = 20
DEADLINE_S = 30.0
MAX_KILL_DELAY_S = 0.02
SAVED_TIME = slice(96, 104)

# Saves the memory named argv[2] over and over, alternating states A and B. Prints "saved"
# after the first save, then loops until killed.
SAVER_SCRIPT = r"""
import sys
from llama2rnn import Model

model = Model.load(sys.argv[1], threads=1)
model.engine.set_sampling(1.0, 0.9, 0)
model.feed(FIRST_TOKENS)
first = model.snapshot()
model.feed(MORE_TOKENS)
second = model.snapshot()
model.open_memory(sys.argv[2])
model.restore(first)
model.save_memory()
print("saved", flush=True)
while True:
    for snapshot in (second, first):
        model.restore(snapshot)
        model.save_memory()
""".replace("FIRST_TOKENS", repr(FIRST_TOKENS)).replace("MORE_TOKENS", repr(MORE_TOKENS))


def comparable(data: bytes) -> bytes:
    """Memory-file bytes without the save time and the checksum that covers it."""
    return data[: SAVED_TIME.start] + data[SAVED_TIME.stop : -4]


def temp_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(memory_store.TEMP_SUFFIX)}


def test_killed_saves_leave_loadable_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2RNN_HOME", str(tmp_path / "home"))
    model_path = tmp_path / "model.bin"
    checkpoint.write_llama2rnn(model_path, CONFIG, checkpoint.random_weights(CONFIG, seed=0))
    model = Model.load(model_path, threads=1)
    model.engine.set_sampling(1.0, 0.9, 0)  # the saver's sampler state
    model.feed(FIRST_TOKENS)
    state_a = comparable(model.snapshot().data)
    model.feed(MORE_TOKENS)
    state_b = comparable(model.snapshot().data)
    location = memory_store.locate("crash")
    folder = location.path.parent

    rng = random.Random(20240611)
    seen = {"A": 0, "B": 0}
    kills_leaving_temp = 0
    previous_temps: set[str] = set()
    started = time.monotonic()
    iterations = 0
    while iterations < ITERATIONS and time.monotonic() - started < DEADLINE_S:
        child = subprocess.Popen(
            [sys.executable, "-c", SAVER_SCRIPT, str(model_path), "crash"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "saved":
                child.wait(timeout=10)
                errors = child.stderr.read() if child.stderr else ""
                pytest.fail(f"the saver process failed: {line!r} {errors}")
            # The first save of this child removed what killed children left.
            survivors = previous_temps & temp_files(folder)
            assert not survivors, f"stale temporary files survived a save: {survivors}"
            time.sleep(rng.uniform(0.0, MAX_KILL_DELAY_S))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
        iterations += 1

        previous_temps = temp_files(folder)
        kills_leaving_temp += bool(previous_temps)
        listed = memory_store.list_memories()
        assert [item.name for item in listed] == ["crash"], f"iteration {iterations}"
        assert listed[0].header is not None, listed[0].error
        data = location.path.read_bytes()
        memory_store.check_memory_bytes(data, location.label)
        state = comparable(data)
        assert state in (state_a, state_b), f"iteration {iterations}: neither saved state"
        seen["A" if state == state_a else "B"] += 1
        model.load_memory("crash", attach=False)
        assert model.position in (len(FIRST_TOKENS), len(FIRST_TOKENS) + len(MORE_TOKENS))

    assert iterations >= MIN_ITERATIONS, f"only {iterations} kills in {DEADLINE_S} s"
    # If no kill ever hit a save in progress, the test would prove nothing.
    assert kills_leaving_temp > 0, f"no kill out of {iterations} interrupted a save"
    print(f"{iterations} kills: final states {seen}, {kills_leaving_temp} left a temporary file")
