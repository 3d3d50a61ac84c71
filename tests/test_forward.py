"""The Rust engine against the numpy reference forward pass, on random checkpoints."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from reference import ReferenceModel, checkpoint

import llama2rnn
from llama2rnn import Model

Config = checkpoint.Config

# The engine computes in float32 and the reference in float64. With activations quantized
# the same way on both sides, their logits agree to about 3e-7 of the logit scale, until an
# activation lands on the other side of a Q8_0 rounding boundary: that shifts one value by a
# quantization step, and the memory carries the difference (about 1e-2) into later tokens.
# So the typical token must agree tightly, and every token loosely; a wrong computation
# (wrong mode, position or head) gives errors of order 1 on most tokens.
MEDIAN_TOLERANCE = 1e-5
MAX_TOLERANCE = 5e-2

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
# GQA and sizes that reach odd corners: head_size 8, 6 query heads on 2 kv heads, M 5.
ODD_GQA = Config(
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

WRITERS = {
    "llama2rnn": checkpoint.write_llama2rnn,
    "llama2c-v2": checkpoint.write_llama2c_v2,
    "llama2c-v1": checkpoint.write_llama2c_v1,
    "llama2c-v0": checkpoint.write_llama2c_v0,
}


def write_random(
    tmp_path: Path, fmt: str, config: Config, *, seed: int = 0, shared: bool = True
) -> Path:
    path = tmp_path / f"{fmt}-{seed}.bin"
    weights = checkpoint.random_weights(config, seed=seed, shared_classifier=shared)
    WRITERS[fmt](path, config, weights)
    return path


def reference_for(path: Path, mode: str = "chunk") -> ReferenceModel:
    fmt, config, weights, group_size = checkpoint.read_checkpoint(path)
    return ReferenceModel(
        config,
        weights,
        mode=mode,
        quantize_activations=group_size is not None,
        group_size=group_size,
    )


def token_stream(n: int, vocab_size: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab_size, size=n)]


def assert_logits_close(model: Model, ref: ReferenceModel, tokens: list[int]) -> None:
    errors = []
    for i, token in enumerate(tokens):
        got = model.forward(token)
        expected = ref.forward(token)
        assert got.dtype == np.float32
        assert got.shape == expected.shape
        scale = max(1.0, float(np.abs(expected).max()))
        errors.append(float(np.abs(got - expected).max()) / scale)
        assert errors[-1] < MAX_TOLERANCE, f"token {i}: relative error {errors[-1]:.2e}"
    median = float(np.median(errors))
    assert median < MEDIAN_TOLERANCE, (
        f"median relative error {median:.2e} over {len(tokens)} tokens"
    )


@pytest.mark.parametrize(
    "config, shared, mode",
    [
        (SMALL, True, "chunk"),
        (SMALL, False, "chunk"),
        (ODD_GQA, True, "chunk"),
        (ODD_GQA, False, "token"),
        (SMALL, True, "token"),
    ],
    ids=["small", "separate-classifier", "odd-gqa", "odd-gqa-token-mode", "token-mode"],
)
def test_memory_model_matches_reference(tmp_path, config, shared, mode):
    path = write_random(tmp_path, "llama2rnn", config, shared=shared)
    model = Model.load(path, threads=1, mode=mode)
    assert model.format == "llama2rnn"
    # Three and a half chunks: three memory updates, then a partial chunk.
    tokens = token_stream(config.mem_len * 7 // 2, config.vocab_size)
    assert_logits_close(model, reference_for(path, mode), tokens)


@pytest.mark.parametrize("fmt", ["llama2c-v2", "llama2c-v1", "llama2c-v0"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_vanilla_model_matches_reference(tmp_path, fmt, shared):
    path = write_random(tmp_path, fmt, VANILLA, shared=shared)
    model = Model.load(path, threads=1)
    assert model.format == fmt
    assert_logits_close(
        model, reference_for(path), token_stream(VANILLA.seq_len, VANILLA.vocab_size)
    )


def test_vanilla_model_stops_at_seq_len(tmp_path):
    path = write_random(tmp_path, "llama2c-v2", VANILLA)
    model = Model.load(path, threads=1)
    for token in token_stream(VANILLA.seq_len, VANILLA.vocab_size):
        model.forward(token)
    with pytest.raises(llama2rnn.ContextFullError, match="seq_len 24"):
        model.forward(1)
    model.reset()
    model.forward(1)
    assert model.position == 1


def test_memory_model_runs_past_seq_len(tmp_path):
    config = Config(**{**SMALL.__dict__, "seq_len": 8})
    path = write_random(tmp_path, "llama2rnn", config)
    model = Model.load(path, threads=1)
    for token in token_stream(40, config.vocab_size):
        logits = model.forward(token)
    assert np.isfinite(logits).all()
    assert model.position == 40


def run_tokens(model: Model, tokens: list[int]) -> np.ndarray:
    return np.stack([model.forward(t) for t in tokens])


def kernel_test_models(tmp_path, mem_len: int, seed: int):
    """Yield a small model's checkpoint path, config and group size, for sizes 64 and 32.

    Group size 64 takes the 64-byte SIMD loops, and 32 the 32-byte ones.
    """
    config = Config(
        dim=128,
        hidden_dim=384,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=300,
        seq_len=128,
        mem_len=mem_len,
    )
    for group_size in (64, 32):
        path = tmp_path / f"gs{group_size}.bin"
        weights = checkpoint.random_weights(config, seed=seed)
        checkpoint.write_llama2rnn(path, config, weights, group_size=group_size)
        yield path, config, group_size


def test_kernel_paths_and_threads_agree_exactly(tmp_path):
    for path, config, group_size in kernel_test_models(tmp_path, mem_len=8, seed=3):
        tokens = token_stream(20, config.vocab_size)
        expected = run_tokens(Model.load(path, threads=1, kernel="generic"), tokens)
        for kernel in llama2rnn.supported_kernels():
            for threads in (1, 2, 3):
                got = run_tokens(Model.load(path, threads=threads, kernel=kernel), tokens)
                assert np.array_equal(got, expected), (
                    f"{kernel} with {threads} threads, gs {group_size}"
                )


def test_kernel_paths_agree_exactly_on_batches(tmp_path):
    # M 27: prefill chunks and memory updates multiply 27 rows at once, which the amx path
    # takes as a full tile of 16 and a padded one of 11. The tokens cross two updates.
    for path, config, group_size in kernel_test_models(tmp_path, mem_len=27, seed=5):
        tokens = token_stream(2 * config.mem_len + 5, config.vocab_size, seed=2)
        expected = run_tokens(Model.load(path, threads=1, kernel="generic"), tokens)[-1]
        for kernel in llama2rnn.supported_kernels():
            for threads in (1, 2):
                model = Model.load(path, threads=threads, kernel=kernel)
                model.feed(tokens[:-1])
                got = model.forward(tokens[-1])
                assert np.array_equal(got, expected), (
                    f"{kernel} with {threads} threads, gs {group_size}"
                )


@pytest.mark.parametrize("mode", ["chunk", "token"])
def test_memory_update_splits_agree_exactly(tmp_path, mode):
    # M 40 splits an update on the pool into tasks of 16, 16 and 8 slots per layer at 2
    # threads, 13, 13, 13 and 1 at 3, and 8 at 5. With three layers, the lanes take tasks of
    # different layers at once.
    config = Config(
        dim=64,
        hidden_dim=160,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=101,
        seq_len=256,
        mem_len=40,
    )
    path = write_random(tmp_path, "llama2rnn", config)
    tokens = token_stream(2 * config.mem_len + 7, config.vocab_size, seed=9)
    expected = run_tokens(Model.load(path, threads=1, mode=mode), tokens)
    for threads in (2, 3, 5):
        # Every token and update on the pool, so that the lanes run for every update.
        stepped = llama2rnn._llama2rnn.Engine(path, threads=threads, mode=mode, governed=False)
        got = np.stack([stepped.forward(t) for t in tokens])
        assert np.array_equal(got, expected), f"{threads} threads"
        batched = Model.load(path, threads=threads, mode=mode)
        batched.feed(tokens[:-1])
        assert np.array_equal(batched.forward(tokens[-1]), expected[-1]), f"{threads} threads"


def test_pool_decode_matches_one_thread(tmp_path):
    # kv_dim 512: from chunk position 63 on, the window has enough keys for a decode token
    # to split its heads across the pool (6, 6 and 4 of the 16 heads at 3 threads, which
    # splits a GQA pair). The tokens run past a memory update.
    config = Config(
        dim=1024,
        hidden_dim=128,
        n_layers=1,
        n_heads=16,
        n_kv_heads=8,
        vocab_size=64,
        seq_len=256,
        mem_len=128,
    )
    path = write_random(tmp_path, "llama2rnn", config)
    tokens = token_stream(140, config.vocab_size, seed=4)

    def decode(threads: int) -> np.ndarray:
        engine = llama2rnn._llama2rnn.Engine(path, threads=threads, governed=threads == 1)
        return np.stack([engine.forward(t) for t in tokens])

    expected = decode(1)
    for threads in (2, 3):
        assert np.array_equal(decode(threads), expected), f"{threads} threads"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_decodes_without_pool(tmp_path):
    # A child made by fork() has none of the parent's pool threads. It must still decode,
    # with the same logits, and not wait for threads that do not exist.
    path = write_random(tmp_path, "llama2rnn", SMALL)
    tokens = token_stream(SMALL.mem_len + 3, SMALL.vocab_size, seed=6)
    expected = run_tokens(Model.load(path, threads=1), tokens)
    engine = llama2rnn._llama2rnn.Engine(path, threads=2, governed=False)
    engine.forward(tokens[0])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: decode the rest, send the logits, and leave without cleanup
        try:
            logits = np.stack([engine.forward(t) for t in tokens[1:]])
            os.write(write_end, logits.astype(np.float32).tobytes())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish decoding within 60 s")
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as pipe:
        got = np.frombuffer(pipe.read(), dtype=np.float32)
    assert np.array_equal(got.reshape(expected[1:].shape), expected[1:])


def test_second_thread_gets_a_clear_error(tmp_path):
    # One engine runs one call at a time: a call from another thread while a long feed runs
    # raises at once, and the feed finishes undisturbed.
    path = write_random(tmp_path, "llama2rnn", SMALL)
    engine = llama2rnn._llama2rnn.Engine(path, threads=1)
    tokens = token_stream(200_000, SMALL.vocab_size, seed=8)
    started = threading.Event()

    def feed() -> None:
        started.set()
        engine.feed(tokens)

    feeder = threading.Thread(target=feed)
    feeder.start()
    started.wait()
    error, fed_here = None, 0
    while feeder.is_alive() and error is None:
        try:
            engine.forward(1)
            fed_here += 1
        except RuntimeError as raised:
            error = str(raised)
    feeder.join()
    assert error is not None, "the feed ended before a second call overlapped it"
    assert "another thread" in error
    assert engine.position == len(tokens) + fed_here
    engine.forward(1)
    assert engine.position == len(tokens) + fed_here + 1


def test_reset_restores_initial_state(tmp_path):
    path = write_random(tmp_path, "llama2rnn", SMALL)
    model = Model.load(path, threads=1)
    tokens = token_stream(11, SMALL.vocab_size)
    first = run_tokens(model, tokens)
    model.reset()
    assert model.position == 0
    assert np.array_equal(run_tokens(model, tokens), first)


def test_forward_rejects_out_of_range_token(tmp_path):
    model = Model.load(write_random(tmp_path, "llama2rnn", SMALL), threads=1)
    for token in (-1, SMALL.vocab_size, 2**40, 2**63, -(2**70)):
        with pytest.raises(ValueError, match="out of range"):
            model.forward(token)
    assert model.position == 0


def test_feed_rejects_token_beyond_64_bits(tmp_path):
    model = Model.load(write_random(tmp_path, "llama2rnn", SMALL), threads=1)
    with pytest.raises(ValueError, match=f"token id {2**64} is out of range"):
        model.feed([1, 2**64, 3])
    assert model.position == 0


def test_signal_stops_long_feed_between_pieces(tmp_path):
    """A signal handler that raises ends a long feed after the piece that was running, and
    the tokens consumed until then stay consumed."""
    engine = llama2rnn._llama2rnn.Engine(
        str(write_random(tmp_path, "llama2rnn", SMALL)), threads=1, kernel="generic"
    )
    tokens = token_stream(200_000, SMALL.vocab_size)

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Stop):
            engine.feed(tokens)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert 0 < engine.position < len(tokens)
    # The state goes on exactly as one that was fed the same prefix in one call.
    prefix = tokens[: engine.position]
    other = llama2rnn._llama2rnn.Engine(str(engine.path), threads=1, kernel="generic")
    other.feed(prefix)
    assert np.array_equal(engine.logits(), other.logits())


def test_kernel_variable_names_itself_when_invalid(tmp_path, monkeypatch):
    path = write_random(tmp_path, "llama2rnn", SMALL)
    monkeypatch.setenv("LLAMA2RNN_KERNEL", "sse9")
    with pytest.raises(ValueError, match="LLAMA2RNN_KERNEL='sse9'"):
        Model.load(path, threads=1)
    monkeypatch.setenv("LLAMA2RNN_KERNEL", "")
    assert Model.load(path, threads=1).kernel == llama2rnn.detected_kernel()
    monkeypatch.setenv("LLAMA2RNN_KERNEL", "generic")
    assert Model.load(path, threads=1).kernel == "generic"


def test_unknown_kernel_and_mode_raise(tmp_path):
    path = write_random(tmp_path, "llama2rnn", SMALL)
    with pytest.raises(ValueError, match="kernel path"):
        Model.load(path, kernel="sse9")
    with pytest.raises(ValueError, match="update mode"):
        Model.load(path, mode="sometimes")
    with pytest.raises(ValueError, match="threads"):
        Model.load(path, threads=0)
    vanilla = write_random(tmp_path, "llama2c-v2", VANILLA)
    with pytest.raises(ValueError, match="token update mode"):
        Model.load(vanilla, mode="token")


@pytest.mark.parametrize(
    "fmt, config, mode",
    [
        ("llama2rnn", SMALL, "chunk"),
        ("llama2rnn", ODD_GQA, "chunk"),
        ("llama2rnn", ODD_GQA, "token"),
        ("llama2c-v2", VANILLA, "chunk"),
        ("llama2c-v1", VANILLA, "chunk"),
    ],
    ids=["memory", "memory-odd-gqa", "memory-token-mode", "plain-q8", "plain-fp32"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_feed_matches_token_by_token(tmp_path, fmt, config, mode, threads):
    path = write_random(tmp_path, fmt, config)
    n = min(config.seq_len - 2, 23)
    tokens = token_stream(n + 2, config.vocab_size, seed=5)
    one_by_one = Model.load(path, threads=1, mode=mode)
    expected = run_tokens(one_by_one, tokens)
    batched = Model.load(path, threads=threads, mode=mode)
    # Batches that start mid-chunk, cross chunk ends and end on one.
    for start, end in [(0, 3), (3, 3 + n // 2), (3 + n // 2, n)]:
        batched.feed(tokens[start:end])
        assert batched.position == end
    assert np.array_equal(batched.engine.logits(), expected[n - 1])
    following = run_tokens(batched, tokens[n:])
    assert np.array_equal(following, expected[n:])
