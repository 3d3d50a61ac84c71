"""`llama2rnn eval`: windows, losses against Model.forward, memory horizon, plain models, CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from reference import ReferenceModel, checkpoint

from llama2rnn import Model, evaluate
from llama2rnn.eval_cli import add_eval_command

Config = checkpoint.Config

# Grouped-query attention (6 query heads on 2 key/value heads), so that kv_dim != dim.
MEMORY = Config(
    dim=48,
    hidden_dim=96,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    vocab_size=61,
    seq_len=32,
    mem_len=5,
)
PLAIN = Config(
    dim=64,
    hidden_dim=160,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    vocab_size=61,
    seq_len=24,
    mem_len=0,
)
# Conversation lengths of the synthetic split. With LONG_TOKENS 256, the last three are long.
CONVERSATIONS = [40, 90, 60, 300, 500, 700]
LONG_TOKENS = 256
TARGET = 16


def write_model(folder: Path, config: Config, seed: int = 0) -> Path:
    path = folder / f"model-{config.mem_len}-{seed}.bin"
    weights = checkpoint.random_weights(config, seed=seed)
    if config.mem_len:
        checkpoint.write_llama2rnn(path, config, weights)
    else:
        checkpoint.write_llama2c_v2(path, config, weights)
    return path


def write_prepared_data(folder: Path, lengths: list[int], vocab_size: int, seed: int = 5) -> Path:
    """Write a validation split in the layout of `python -m llama2rnn.train prepare`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, size=sum(lengths)).astype(np.uint16)
    index = np.zeros(len(lengths) + 1, dtype=np.int64)
    index[1:] = np.cumsum(lengths)
    tokens[index[:-1]] = 1  # every conversation starts with BOS, as in the real data
    tokens.tofile(folder / "val.bin")
    np.save(folder / "val_index.npy", index)
    meta = {
        "format_version": 1,
        "vocab_size": vocab_size,
        "bos_id": 1,
        "eos_id": 2,
        "splits": {"val": {"conversations": len(lengths), "tokens": int(index[-1])}},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def memory_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("eval-memory"), MEMORY)


@pytest.fixture(scope="module")
def plain_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("eval-plain"), PLAIN)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared_data(tmp_path_factory.mktemp("eval-data"), CONVERSATIONS, 61)


@pytest.fixture()
def memory_model(memory_model_path: Path) -> Model:
    return Model.load(memory_model_path, threads=1)


@pytest.fixture()
def data(data_dir: Path) -> evaluate.EvalData:
    return evaluate.load_eval_data(data_dir, "val", 61)


def direct_losses(model: Model, stream: np.ndarray, position: int, context: int) -> np.ndarray:
    """Negative log-likelihoods of the target tokens from Model.forward, one token at a time."""
    model.reset()
    for token in stream[position - context : position - 1]:
        model.forward(int(token))
    losses = []
    for i in range(TARGET):
        logits = model.forward(int(stream[position - 1 + i])).astype(np.float64)
        top = logits.max()
        log_normalizer = top + math.log(np.exp(logits - top).sum())
        losses.append(log_normalizer - logits[int(stream[position + i])])
    return np.asarray(losses)


# ---------------------------------------------------------------------------------------------
# Window placement


@pytest.mark.parametrize(
    "length, longest, target, max_windows, expected",
    [
        (100, 20, 10, 8, 8),
        (100, 20, 10, 100, 8),
        (100, 90, 10, 8, 1),
        (100, 91, 10, 8, 0),
        (1000, 1, 1, 3, 3),
    ],
)
def test_target_positions_fit(
    length: int, longest: int, target: int, max_windows: int, expected: int
) -> None:
    positions = evaluate.target_positions(length, longest, target, max_windows)
    assert len(positions) == expected
    for position in positions:
        assert position >= longest, f"{position} leaves no room for context {longest}"
        assert position + target <= length, f"{position} runs past the stream end"
    for first, second in zip(positions, positions[1:]):
        assert second - first >= target, f"spans at {first} and {second} overlap"


def test_target_positions_spread_to_end() -> None:
    positions = evaluate.target_positions(1000, 100, 50, 4)
    assert positions[0] == 100
    assert positions[-1] == 950


# ---------------------------------------------------------------------------------------------
# Losses


def test_window_matches_forward(memory_model: Model, data: evaluate.EvalData) -> None:
    stream = data.tokens
    position, context = 400, 37  # the context ends part way through a chunk of 5
    losses, feed_seconds, score_seconds = evaluate.window_losses(
        memory_model.engine, stream, position, context, TARGET
    )
    expected = direct_losses(memory_model, stream, position, context)
    assert losses.shape == (TARGET,)
    assert feed_seconds >= 0.0
    assert score_seconds >= 0.0
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-4)


def test_window_feeds_in_slices(
    memory_model: Model, data: evaluate.EvalData, monkeypatch: pytest.MonkeyPatch
) -> None:
    position, context = 400, 37
    whole, _, _ = evaluate.window_losses(
        memory_model.engine, data.tokens, position, context, TARGET
    )
    # A slice of 12 tokens rounds down to 10, two chunks of 5.
    monkeypatch.setattr(evaluate, "FEED_SLICE", 12)
    fed: list[int] = []
    sliced, _, _ = evaluate.window_losses(
        memory_model.engine, data.tokens, position, context, TARGET, fed.append
    )
    assert fed == [10, 10, 10, 6]
    np.testing.assert_array_equal(sliced, whole)


def test_window_rejects_misfit(memory_model: Model, data: evaluate.EvalData) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        evaluate.window_losses(memory_model.engine, data.tokens, 10, 11, TARGET)
    with pytest.raises(ValueError, match="does not fit"):
        evaluate.window_losses(memory_model.engine, data.tokens, len(data.tokens) - 5, 4, TARGET)


def test_stream_table_rows(memory_model: Model, data: evaluate.EvalData) -> None:
    contexts = [4, 16, 64, 400, 5000]
    rows = evaluate.evaluate_contexts(
        memory_model.engine, memory_model.config, [data.tokens], contexts, TARGET, 3
    )
    assert [row.context for row in rows] == contexts
    for row in rows[:4]:
        assert row.windows == 3, f"context {row.context}"
        assert row.target_tokens == 3 * TARGET, f"context {row.context}"
        assert row.loss is not None
        assert math.isfinite(row.loss), f"context {row.context}: loss {row.loss}"
        assert row.standard_error is not None
        assert row.note == ""
    assert rows[4].windows == 0
    assert rows[4].loss is None
    assert "no stream has 5016 tokens" in rows[4].note
    table = evaluate.format_context_table(rows)
    assert table.count("\n") == 1 + len(contexts)
    assert "| 5,000 | 0 | 0 | n/a: no stream has 5016 tokens" in table


def test_row_loss_matches_forward(memory_model: Model, data: evaluate.EvalData) -> None:
    context = 23
    [row] = evaluate.evaluate_contexts(
        memory_model.engine, memory_model.config, [data.tokens], [context], TARGET, 1
    )
    [position] = evaluate.target_positions(len(data.tokens), context, TARGET, 1)
    expected = direct_losses(memory_model, data.tokens, position, context).mean()
    assert row.windows == 1
    assert row.loss == pytest.approx(expected, rel=1e-4)
    assert row.standard_error is None


def test_rows_share_targets(memory_model: Model, data: evaluate.EvalData) -> None:
    """Each row is the mean of the direct losses at the same target positions."""
    rows = evaluate.evaluate_contexts(
        memory_model.engine, memory_model.config, [data.tokens], [1, 64], TARGET, 2
    )
    positions = evaluate.target_positions(len(data.tokens), 64, TARGET, 2)
    for row in rows:
        expected = np.mean(
            [direct_losses(memory_model, data.tokens, p, row.context).mean() for p in positions]
        )
        assert row.loss == pytest.approx(expected, rel=1e-4), f"context {row.context}"
    shortest, longest = rows
    assert shortest.window_keys == longest.window_keys
    assert shortest.difference is None
    assert longest.baseline_context == 1
    assert longest.difference is not None
    assert longest.difference == pytest.approx(longest.loss - shortest.loss, abs=1e-9)
    assert longest.difference_error is not None


def test_long_conversations_table(memory_model: Model, data: evaluate.EvalData) -> None:
    conversations = data.long_conversations(LONG_TOKENS)
    assert [len(c) for c in conversations] == [300, 500, 700]
    rows = evaluate.evaluate_contexts(
        memory_model.engine, memory_model.config, conversations, [4, 400, 1000], TARGET, 2
    )
    short, medium, long = rows
    assert short.streams == 3
    assert short.windows == 6
    assert medium.streams == 2, "only conversations of 416 tokens or more fit context 400"
    assert medium.windows == 4
    assert medium.loss is not None
    assert math.isfinite(medium.loss)
    assert long.loss is None
    assert "no stream has 1016 tokens" in long.note
    # Context 400 shares only the windows of the two longer conversations with context 4.
    shared = dict(zip(short.window_keys, short.window_losses))
    expected = np.mean(
        [loss - shared[key] for key, loss in zip(medium.window_keys, medium.window_losses)]
    )
    assert {key[0] for key in medium.window_keys} == {1, 2}
    assert medium.difference == pytest.approx(expected, abs=1e-9)
    assert long.difference is None


# ---------------------------------------------------------------------------------------------
# Plain llama2.c models


def test_plain_model_long_contexts_na(plain_model_path: Path, data: evaluate.EvalData) -> None:
    model = Model.load(plain_model_path, threads=1)
    # seq_len 24 and target 16: a window runs context - 1 + 16 tokens, so context 9 is the last.
    assert evaluate.model_context_limit(model.config, TARGET) == 9
    rows = evaluate.evaluate_contexts(
        model.engine, model.config, [data.tokens], [4, 9, 10, 256], TARGET, 2
    )
    for row in rows[:2]:
        assert row.loss is not None, f"context {row.context}: {row.note}"
        assert math.isfinite(row.loss)
    for row in rows[2:]:
        assert row.loss is None, f"context {row.context}"
        assert "seq_len 24" in row.note
    horizon = evaluate.measure_horizon(model.engine, model.config, data.tokens, 2, 4, 2, [0.1])
    assert horizon.note == "a plain llama2.c model has no memory"
    assert horizon.differences == []


# ---------------------------------------------------------------------------------------------
# Memory horizon


def test_memory_keys_match_reference(memory_model_path: Path, data: evaluate.EvalData) -> None:
    _, config, weights, group_size = checkpoint.read_checkpoint(memory_model_path)
    reference = ReferenceModel(config, weights, quantize_activations=True, group_size=group_size)
    model = Model.load(memory_model_path, threads=1)
    tokens = [int(t) for t in data.tokens[: 2 * config.mem_len + 2]]
    checkpoints = {0, config.mem_len, 2 * config.mem_len + 2}
    for step in range(len(tokens) + 1):
        if step in checkpoints:
            keys = evaluate.memory_keys(model.engine.save_state())
            expected = reference.key_cache[:, : config.mem_len]
            assert keys.shape == (config.n_layers, config.mem_len, config.kv_dim)
            scale = max(1.0, float(np.abs(expected).max()))
            error = float(np.abs(keys - expected).max()) / scale
            assert error < 5e-2, f"after {step} tokens: relative error {error:.2e}"
        if step < len(tokens):
            model.forward(tokens[step])
            reference.forward(tokens[step])


def test_same_chunk_gives_no_difference(memory_model: Model, data: evaluate.EvalData) -> None:
    mem_len = MEMORY.mem_len
    changed = 3 * mem_len
    original = np.asarray(data.tokens[changed : changed + mem_len])
    differences = evaluate.key_differences(memory_model.engine, data.tokens, 0, 3, 6, original)
    np.testing.assert_array_equal(differences, np.zeros(7))


def test_changed_chunk_differs(memory_model: Model, data: evaluate.EvalData) -> None:
    mem_len = MEMORY.mem_len
    changed = 3 * mem_len
    replacement = evaluate.pick_replacement(data.tokens, changed, mem_len)
    differences = evaluate.key_differences(memory_model.engine, data.tokens, 0, 3, 6, replacement)
    assert differences.shape == (7,)
    assert differences[0] > 0.0, "the changed chunk left the memory keys unchanged"
    assert np.all(np.isfinite(differences))
    assert evaluate.horizon_at(differences, 1e9) == 0


def test_measure_horizon(memory_model: Model, data: evaluate.EvalData) -> None:
    thresholds = [1e9, 1e-30]
    result = evaluate.measure_horizon(
        memory_model.engine, memory_model.config, data.tokens, 3, 8, 2, thresholds
    )
    assert result.note == ""
    assert len(result.changed_offsets) == 3
    assert len(result.differences) == 3
    for differences in result.differences:
        assert len(differences) == 9
        assert differences[0] > 0.0
    huge, tiny = result.horizons
    assert huge == [0, 0, 0]
    for horizon in tiny:
        # The keys of a random model rarely become bit-identical again. If they do, that
        # happens after the changed chunk, so the horizon is not 0.
        assert horizon is None or 0 < horizon <= 8
    text = evaluate.format_horizons(result)
    assert "| 1e+09 | 0.0 | 0, 0, 0 | 0 |" in text


@pytest.mark.parametrize(
    "differences, threshold, expected",
    [
        ([0.5, 0.05, 0.005], 1.0, 0),
        ([0.5, 0.05, 0.005], 0.1, 1),
        ([0.5, 0.05, 0.005], 0.01, 2),
        ([0.5, 0.05, 0.005], 0.001, None),
        ([0.5, 0.005, 0.05, 0.005], 0.01, 3),
    ],
)
def test_horizon_at_cases(differences: list[float], threshold: float, expected: int | None) -> None:
    assert evaluate.horizon_at(np.asarray(differences), threshold) == expected


def test_horizon_needs_long_stream(memory_model: Model) -> None:
    stream = np.arange(3, 40, dtype=np.uint16)
    result = evaluate.measure_horizon(
        memory_model.engine, memory_model.config, stream, 2, 10, 2, [0.1]
    )
    assert "fewer than the 65 that one run needs" in result.note


# ---------------------------------------------------------------------------------------------
# Data checks and the command line


def test_data_vocab_mismatch(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size 61 but the model has 97"):
        evaluate.load_eval_data(data_dir, "val", 97)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llama2rnn")
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_command(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))


def test_cli_writes_tables_and_json(
    memory_model_path: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "eval.json"
    status = run_cli(
        [
            "eval",
            "--model",
            str(memory_model_path),
            "--data-dir",
            str(data_dir),
            "--contexts",
            "8,64,5000",
            "--target",
            str(TARGET),
            "--windows",
            "2",
            "--long-tokens",
            str(LONG_TOKENS),
            "--horizon-positions",
            "2",
            "--horizon-chunks",
            "4",
            "--warmup-chunks",
            "1",
            "--threads",
            "1",
            "--json",
            str(output),
        ]
    )
    assert status == 0
    captured = capsys.readouterr()
    assert "### Held-out stream" in captured.out
    assert "### Long conversations: 3 val conversations longer than 256 tokens" in captured.out
    assert "### Memory horizon" in captured.out
    assert "| 64 | 2 | 32 |" in captured.out
    assert "n/a: no stream has 5016 tokens" in captured.out
    assert "held-out stream [" in captured.err

    report = json.loads(output.read_text())
    assert report["config"]["mem_len"] == MEMORY.mem_len
    assert [row["context"] for row in report["stream"]["rows"]] == [8, 64, 5000]
    assert report["stream"]["rows"][2]["loss"] is None
    assert report["long_conversations"]["conversations"] == 3
    assert report["long_conversations"]["tokens"] == 1500
    assert len(report["horizon"]["differences"]) == 2
    assert len(report["horizon"]["mean_differences"]) == 5


def test_cli_plain_model(
    plain_model_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_cli(
        [
            "eval",
            "--model",
            str(plain_model_path),
            "--data-dir",
            str(data_dir),
            "--contexts",
            "8,256",
            "--target",
            str(TARGET),
            "--windows",
            "2",
            "--threads",
            "1",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "n/a: context + target exceeds seq_len 24 + 1 of this plain model" in out
    assert "n/a: a plain llama2.c model has no memory" in out


def test_cli_rejects_bad_contexts(memory_model_path: Path, data_dir: Path) -> None:
    with pytest.raises(ValueError, match="context length 0 is invalid"):
        run_cli(
            [
                "eval",
                "--model",
                str(memory_model_path),
                "--data-dir",
                str(data_dir),
                "--contexts",
                "0,8",
                "--threads",
                "1",
            ]
        )
