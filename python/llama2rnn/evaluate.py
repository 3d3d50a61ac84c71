"""Long-context evaluation of a checkpoint on prepared held-out data, run on the engine.

Three measurements:

- Loss against context length, with the held-out conversations read as one stream.
- The same, with each long held-out conversation read as its own stream.
- Memory horizon: for how many chunks a change to one chunk stays visible in the memory.

Windows are paired across context lengths. In each stream a few target spans of ``target``
tokens are chosen, evenly spaced, and every context length C scores the same spans, with
the C tokens right before a span as its context. The rows of a table therefore differ only
in how much context came before the same tokens, so the noise of the token choice largely
cancels when rows are compared.

A window starts from the initial state (``reset``) and feeds the first C - 1 context
tokens in batches (``feed``). Then ``score`` runs the last context token and the target
tokens one at a time and returns the negative log-likelihood of each target token.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import _llama2rnn
from .checkpoint import Config
from .model import Model
from .train.data import read_index, read_meta, read_tokens

DEFAULT_CONTEXTS = (256, 512, 1024, 4096, 32768)
DEFAULT_TARGET = 256
DEFAULT_WINDOWS = 8
DEFAULT_LONG_TOKENS = 4096
DEFAULT_THRESHOLDS = (1e-1, 1e-2, 1e-3)
DEFAULT_HORIZON_POSITIONS = 4
DEFAULT_HORIZON_CHUNKS = 128
DEFAULT_WARMUP_CHUNKS = 8
# Header length of memory-file format version 1, the only version that
# read_memory_header accepts.
MEMORY_FILE_HEADER_BYTES = 128

# Receives (tokens run through the model so far, tokens planned in all).
ProgressCallback = Callable[[int, int], None]
# Tokens per feed call while feeding a context, rounded down to whole chunks, so that long
# contexts report progress. Engine.feed splits its input at chunk boundaries, so slices of
# whole chunks run the same batches as one call.
FEED_SLICE = 4096


# ---------------------------------------------------------------------------------------------
# Loss against context length


@dataclass
class ContextRow:
    """Loss of one context length, summed over all windows of all streams."""

    context: int
    windows: int = 0
    streams: int = 0
    target_tokens: int = 0
    loss_sum: float = 0.0
    # Mean loss of each window, for the standard error across windows.
    window_losses: list[float] = field(default_factory=list)
    # (stream index, target offset) of each window, in the order of window_losses.
    window_keys: list[tuple[int, int]] = field(default_factory=list)
    feed_tokens: int = 0
    feed_seconds: float = 0.0
    score_tokens: int = 0
    score_seconds: float = 0.0
    # Why the row has no windows, when it has none.
    note: str = ""
    # Mean loss change against the shortest context over the same windows, and its standard
    # error across windows. None for the shortest context itself and rows without windows.
    baseline_context: int | None = None
    difference: float | None = None
    difference_error: float | None = None

    @property
    def loss(self) -> float | None:
        """Mean negative log-likelihood in nats per target token, None without windows."""
        if self.target_tokens == 0:
            return None
        return self.loss_sum / self.target_tokens

    @property
    def standard_error(self) -> float | None:
        """Standard error of the mean window loss, None with fewer than two windows.

        It is taken across windows because the tokens within one window are correlated.
        """
        if len(self.window_losses) < 2:
            return None
        values = np.asarray(self.window_losses, dtype=np.float64)
        return float(values.std(ddof=1) / math.sqrt(len(values)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loss"] = self.loss
        data["standard_error"] = self.standard_error
        data["feed_tokens_per_s"] = rate(self.feed_tokens, self.feed_seconds)
        data["score_tokens_per_s"] = rate(self.score_tokens, self.score_seconds)
        return data


def rate(tokens: int, seconds: float) -> float | None:
    """Return tokens per second, None when no tokens were run or no time was measured."""
    if tokens == 0 or seconds <= 0:
        return None
    return tokens / seconds


def model_context_limit(config: Config, target: int) -> int | None:
    """Return the longest context that fits a plain llama2.c model, None for memory models.

    A window runs C - 1 + target tokens, which must fit in seq_len positions.
    """
    if config.is_memory_model:
        return None
    return config.seq_len - target + 1


def target_positions(length: int, longest_context: int, target: int, max_windows: int) -> list[int]:
    """Return the start offsets of non-overlapping target spans in a stream of `length`.

    The spans are evenly spaced from `longest_context` (so that the longest context fits
    before the first one) to the end of the stream, at most `max_windows` of them.
    """
    room = length - longest_context
    count = min(max_windows, room // target) if room >= 0 else 0
    if count <= 0:
        return []
    first = longest_context
    last = length - target
    if count == 1:
        return [first + (last - first) // 2]
    # Consecutive spans start at least (last - first) // (count - 1) >= target apart.
    return [first + (i * (last - first)) // (count - 1) for i in range(count)]


def window_losses(
    engine: _llama2rnn.Engine,
    stream: np.ndarray,
    position: int,
    context: int,
    target: int,
    on_fed: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, float, float]:
    """Score one window and return (losses, feed seconds, score seconds).

    The losses are the negative log-likelihoods in nats of `stream[position : position +
    target]`, each given the `context` tokens before `position` and the target tokens
    before it, starting from the initial state. `on_fed`, when given, receives the number
    of context tokens fed after each feed call.
    """
    if position < context or position + target > len(stream):
        raise ValueError(
            f"a window at {position} with context {context} and target {target} does not fit "
            f"in a stream of {len(stream)} tokens"
        )
    mem_len = engine.config["mem_len"]
    step = max(1, FEED_SLICE // mem_len) * mem_len if mem_len else FEED_SLICE
    engine.reset()
    started = time.perf_counter()
    for start in range(position - context, position - 1, step):
        end = min(start + step, position - 1)
        engine.feed(stream[start:end].tolist())
        if on_fed is not None:
            on_fed(end - start)
    fed = time.perf_counter()
    losses = engine.score(stream[position - 1 : position + target].tolist())
    scored = time.perf_counter()
    return losses, fed - started, scored - fed


@dataclass(frozen=True)
class WindowPlan:
    """The windows of one stream: target offsets, each scored with every context listed."""

    stream: int
    positions: list[int]
    contexts: list[int]


def plan_windows(
    lengths: Sequence[int],
    contexts: Sequence[int],
    target: int,
    max_windows: int,
    context_limit: int | None,
) -> list[WindowPlan]:
    """Plan the windows of each stream, skipping contexts that do not fit the stream or
    the model."""
    plans = []
    for index, length in enumerate(lengths):
        fitting = [
            c
            for c in contexts
            if c + target <= length and (context_limit is None or c <= context_limit)
        ]
        if not fitting:
            continue
        positions = target_positions(length, max(fitting), target, max_windows)
        if positions:
            plans.append(WindowPlan(index, positions, fitting))
    return plans


def planned_tokens(plans: Sequence[WindowPlan], target: int) -> int:
    """Return the number of tokens that the planned windows run through the model."""
    return sum(len(p.positions) * sum(c - 1 + target for c in p.contexts) for p in plans)


def evaluate_contexts(
    engine: _llama2rnn.Engine,
    config: Config,
    streams: Sequence[np.ndarray],
    contexts: Sequence[int],
    target: int,
    max_windows: int,
    progress: ProgressCallback | None = None,
) -> list[ContextRow]:
    """Measure the loss of each context length over paired windows of `streams`.

    Contexts that fit no stream or exceed a plain model's seq_len get a row without
    windows and a note saying why.
    """
    validate_window_options(contexts, target, max_windows)
    context_limit = model_context_limit(config, target)
    plans = plan_windows([len(s) for s in streams], contexts, target, max_windows, context_limit)
    total = planned_tokens(plans, target)
    rows = {c: ContextRow(c) for c in contexts}
    done = 0

    def report(tokens: int) -> None:
        nonlocal done
        done += tokens
        if progress is not None:
            progress(done, total)

    report(0)
    for plan in plans:
        stream = streams[plan.stream]
        for context in plan.contexts:
            rows[context].streams += 1
        for position in plan.positions:
            for context in plan.contexts:
                losses, feed_seconds, score_seconds = window_losses(
                    engine, stream, position, context, target, report
                )
                row = rows[context]
                row.windows += 1
                row.target_tokens += len(losses)
                row.loss_sum += float(np.sum(losses, dtype=np.float64))
                row.window_losses.append(float(np.mean(losses, dtype=np.float64)))
                row.window_keys.append((plan.stream, position))
                row.feed_tokens += context - 1
                row.feed_seconds += feed_seconds
                row.score_tokens += target
                row.score_seconds += score_seconds
                report(target)
    baseline = rows[min(contexts)]
    for context, row in rows.items():
        if row.windows:
            if row is not baseline:
                set_paired_difference(row, baseline)
            continue
        if context_limit is not None and context > context_limit:
            row.note = f"context + target exceeds seq_len {config.seq_len} + 1 of this plain model"
        else:
            row.note = f"no stream has {context + target} tokens (context + target)"
    return list(rows.values())


def set_paired_difference(row: ContextRow, baseline: ContextRow) -> None:
    """Set the row's mean loss change against `baseline` over the windows they share.

    Windows with the same stream and target offset score the same tokens, so the
    difference cancels the variation between windows and its standard error is small.
    """
    baseline_losses = dict(zip(baseline.window_keys, baseline.window_losses))
    differences = [
        loss - baseline_losses[key]
        for key, loss in zip(row.window_keys, row.window_losses)
        if key in baseline_losses
    ]
    if not differences:
        return
    values = np.asarray(differences, dtype=np.float64)
    row.baseline_context = baseline.context
    row.difference = float(values.mean())
    if len(values) >= 2:
        row.difference_error = float(values.std(ddof=1) / math.sqrt(len(values)))


def validate_window_options(contexts: Sequence[int], target: int, max_windows: int) -> None:
    if not contexts:
        raise ValueError("no context lengths given: pass at least one, for example 256")
    for context in contexts:
        if context < 1:
            raise ValueError(f"context length {context} is invalid: use 1 or more tokens")
    if target < 1:
        raise ValueError(f"target {target} is invalid: use 1 or more tokens")
    if max_windows < 1:
        raise ValueError(f"windows {max_windows} is invalid: use 1 or more")


# ---------------------------------------------------------------------------------------------
# Memory horizon


def memory_keys(state: bytes) -> np.ndarray:
    """Return the memory key rows (n_layers, mem_len, kv_dim) of memory-file bytes.

    The layout is documented in docs/memory-file.md: after the header come the f32 memory
    vectors (n_layers, mem_len, dim), then per layer mem_len memory key rows followed by
    the key rows of the current chunk.
    """
    header = _llama2rnn.read_memory_header(state)
    config = header["config"]
    n_layers, mem_len, dim = config["n_layers"], config["mem_len"], config["dim"]
    if mem_len == 0:
        raise ValueError("a plain llama2.c model has no memory keys")
    kv_dim = dim // config["n_heads"] * config["n_kv_heads"]
    layer_rows = mem_len + header["chunk_rows"]
    offset = MEMORY_FILE_HEADER_BYTES + 4 * n_layers * mem_len * dim
    keys = np.frombuffer(
        state, dtype="<f4", count=n_layers * layer_rows * kv_dim, offset=offset
    ).reshape(n_layers, layer_rows, kv_dim)
    return keys[:, :mem_len, :]


def relative_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """Return ||reference - other|| / ||reference|| (Frobenius norms, float64)."""
    a = reference.astype(np.float64)
    b = other.astype(np.float64)
    norm = np.linalg.norm(a)
    if norm == 0.0:
        return 0.0 if np.array_equal(a, b) else math.inf
    return float(np.linalg.norm(a - b) / norm)


def key_differences(
    engine: _llama2rnn.Engine,
    stream: np.ndarray,
    start: int,
    warmup_chunks: int,
    chunks: int,
    replacement: np.ndarray,
) -> np.ndarray:
    """Measure how a changed chunk spreads through the memory keys.

    From the initial state, feed `warmup_chunks` chunks of `stream` from `start`. Then run
    the stream on twice: once as it is and once with the next chunk replaced by
    `replacement`. Return the relative difference of the memory keys between the two runs
    after the changed chunk (index 0) and after each of the `chunks` chunks that follow.
    """
    mem_len = engine.config["mem_len"]
    if len(replacement) != mem_len:
        raise ValueError(f"the replacement has {len(replacement)} tokens, not mem_len {mem_len}")
    changed = start + warmup_chunks * mem_len
    end = changed + (chunks + 1) * mem_len
    if end > len(stream):
        raise ValueError(
            f"the run from {start} needs {end} tokens, but the stream has {len(stream)}"
        )
    engine.reset()
    engine.feed(stream[start:changed].tolist())
    before = engine.save_state()

    engine.feed(stream[changed : changed + mem_len].tolist())
    original = engine.save_state()
    engine.load_state(before)
    engine.feed(replacement.tolist())
    modified = engine.save_state()

    differences = np.empty(chunks + 1, dtype=np.float64)
    differences[0] = relative_difference(memory_keys(original), memory_keys(modified))
    for lag in range(1, chunks + 1):
        chunk = stream[changed + lag * mem_len : changed + (lag + 1) * mem_len].tolist()
        # The two runs take turns on the one engine, so only their states are kept.
        engine.load_state(original)
        engine.feed(chunk)
        original = engine.save_state()
        engine.load_state(modified)
        engine.feed(chunk)
        modified = engine.save_state()
        differences[lag] = relative_difference(memory_keys(original), memory_keys(modified))
    return differences


def horizon_at(differences: np.ndarray, threshold: float) -> int | None:
    """Return after how many chunks the difference stays below `threshold`.

    `differences[j]` is measured j chunks after the changed chunk. The result is the
    smallest h such that every measured difference from h on is below the threshold. It is
    0 when the difference is below the threshold right after the changed chunk, and None
    when it is still at or above the threshold at the last measured chunk.
    """
    above = np.flatnonzero(np.asarray(differences) >= threshold)
    if above.size == 0:
        return 0
    last = int(above[-1])
    if last == len(differences) - 1:
        return None
    return last + 1


def pick_replacement(stream: np.ndarray, changed: int, mem_len: int) -> np.ndarray:
    """Return mem_len held-out tokens from far away in `stream` that differ from the chunk at
    `changed`."""
    original = stream[changed : changed + mem_len]
    candidates = len(stream) - mem_len + 1
    offset = (changed + len(stream) // 2) % candidates
    for _ in range(16):
        replacement = np.asarray(stream[offset : offset + mem_len])
        if not np.array_equal(replacement, original):
            return replacement
        offset = (offset + mem_len + 1) % candidates
    raise ValueError(
        f"found no replacement for the chunk at {changed} that differs from it: the stream "
        "repeats itself"
    )


@dataclass
class HorizonResult:
    """Memory-key differences after a changed chunk, and the horizon at each threshold."""

    mem_len: int
    chunks: int
    warmup_chunks: int
    # Stream offset of the changed chunk of each run.
    changed_offsets: list[int] = field(default_factory=list)
    # differences[run][j]: relative memory-key difference j chunks after the changed chunk.
    differences: list[list[float]] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    # horizons[i][run]: horizon_at(differences[run], thresholds[i]), None when not reached.
    horizons: list[list[int | None]] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    @property
    def mean_differences(self) -> np.ndarray | None:
        if not self.differences:
            return None
        return np.mean(np.asarray(self.differences, dtype=np.float64), axis=0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        means = self.mean_differences
        data["mean_differences"] = means.tolist() if means is not None else None
        return data


def measure_horizon(
    engine: _llama2rnn.Engine,
    config: Config,
    stream: np.ndarray,
    positions: int,
    chunks: int,
    warmup_chunks: int,
    thresholds: Sequence[float],
    progress: ProgressCallback | None = None,
) -> HorizonResult:
    """Measure the memory horizon at `positions` evenly spaced places in `stream`.

    Each run starts from the initial state `warmup_chunks` chunks before the changed chunk
    and follows it for `chunks` chunks (see `key_differences`).

    NOTE: for Q8_0 checkpoints the engine rounds activations to 8 bits. Once two runs differ,
    rounding flips keep adding new differences, so the relative difference levels off
    instead of decaying to 0 (near 4e-3 on an early checkpoint of the default model, see
    docs/long-context.md). Thresholds below that level report no horizon.
    """
    result = HorizonResult(config.mem_len, chunks, warmup_chunks, thresholds=list(thresholds))
    if positions < 0 or chunks < 0 or warmup_chunks < 0:
        raise ValueError(
            f"horizon positions {positions}, chunks {chunks} and warmup chunks "
            f"{warmup_chunks} are invalid: use 0 or more"
        )
    for threshold in thresholds:
        if not threshold > 0:
            raise ValueError(f"threshold {threshold} is invalid: use a positive number")
    if not config.is_memory_model:
        result.note = "a plain llama2.c model has no memory"
        return result
    if positions == 0:
        result.note = "not measured (no positions requested)"
        return result
    mem_len = config.mem_len
    span = (warmup_chunks + 1 + chunks) * mem_len
    if span > len(stream):
        result.note = (
            f"the stream has {len(stream)} tokens, fewer than the {span} that one run needs"
        )
        return result
    starts = np.linspace(0, len(stream) - span, positions).astype(np.int64).tolist()
    total = positions * (warmup_chunks + 2 * (chunks + 1)) * mem_len
    started = time.perf_counter()
    if progress is not None:
        progress(0, total)
    for run, start in enumerate(starts):
        changed = start + warmup_chunks * mem_len
        replacement = pick_replacement(stream, changed, mem_len)
        differences = key_differences(engine, stream, start, warmup_chunks, chunks, replacement)
        result.changed_offsets.append(changed)
        result.differences.append(differences.tolist())
        if progress is not None:
            progress((run + 1) * total // positions, total)
    result.horizons = [
        [horizon_at(np.asarray(d), threshold) for d in result.differences]
        for threshold in thresholds
    ]
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------
# Data and the whole report


@dataclass
class EvalData:
    """A split of a prepared data directory: its token stream and conversation offsets."""

    tokens: np.ndarray
    index: np.ndarray

    def long_conversations(self, min_tokens: int) -> list[np.ndarray]:
        """Return the conversations longer than `min_tokens` tokens, in stream order."""
        starts, ends = self.index[:-1], self.index[1:]
        return [self.tokens[s:e] for s, e in zip(starts, ends) if e - s > min_tokens]


def load_eval_data(data_dir: str | os.PathLike[str], split: str, vocab_size: int) -> EvalData:
    """Read a split of a prepared data directory, checking it against the model's vocab."""
    meta = read_meta(data_dir)
    if meta.get("vocab_size") != vocab_size:
        raise ValueError(
            f"the data in {data_dir} has vocab_size {meta.get('vocab_size')} but the model has "
            f"{vocab_size}: pass the data directory prepared with this model's tokenizer"
        )
    tokens = read_tokens(data_dir, split)
    if len(tokens) == 0:
        raise ValueError(f"the {split} split in {data_dir} is empty")
    largest = int(tokens.max())
    if largest >= vocab_size:
        raise ValueError(
            f"the {split} split in {data_dir} contains token {largest}, out of range for "
            f"vocab_size {vocab_size}"
        )
    index = read_index(data_dir, split)
    if len(index) < 2 or index[0] != 0 or index[-1] != len(tokens):
        raise ValueError(
            f"{split}_index.npy in {data_dir} does not match {split}.bin ({len(tokens)} "
            "tokens): prepare the data again"
        )
    return EvalData(np.asarray(tokens), index)


@dataclass
class EvalReport:
    """All numbers of one evaluation run."""

    model: str
    config: dict[str, Any]
    data_dir: str
    split: str
    target: int
    max_windows: int
    stream_tokens: int
    stream_rows: list[ContextRow]
    long_tokens: int
    long_conversations: int
    long_conversation_tokens: int
    long_rows: list[ContextRow]
    horizon: HorizonResult
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "config": self.config,
            "data_dir": self.data_dir,
            "split": self.split,
            "target": self.target,
            "max_windows": self.max_windows,
            "stream": {
                "tokens": self.stream_tokens,
                "rows": [row.to_dict() for row in self.stream_rows],
            },
            "long_conversations": {
                "min_tokens": self.long_tokens,
                "conversations": self.long_conversations,
                "tokens": self.long_conversation_tokens,
                "rows": [row.to_dict() for row in self.long_rows],
            },
            "horizon": self.horizon.to_dict(),
            "seconds": self.seconds,
        }


def evaluate_model(
    model: Model,
    data: EvalData,
    *,
    data_dir: str,
    split: str = "val",
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    target: int = DEFAULT_TARGET,
    max_windows: int = DEFAULT_WINDOWS,
    long_tokens: int = DEFAULT_LONG_TOKENS,
    horizon_positions: int = DEFAULT_HORIZON_POSITIONS,
    horizon_chunks: int = DEFAULT_HORIZON_CHUNKS,
    warmup_chunks: int = DEFAULT_WARMUP_CHUNKS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    progress: Callable[[str], ProgressCallback] | None = None,
) -> EvalReport:
    """Run the three measurements of this module and return their numbers.

    `progress`, when given, makes a progress callback for a section from its label.
    """
    started = time.perf_counter()
    engine = model.engine
    config = model.config
    contexts = sorted(set(contexts))
    validate_window_options(contexts, target, max_windows)
    if long_tokens < 0:
        raise ValueError(f"long_tokens {long_tokens} is invalid: use 0 or more")

    def section(label: str) -> ProgressCallback | None:
        return progress(label) if progress is not None else None

    stream_rows = evaluate_contexts(
        engine, config, [data.tokens], contexts, target, max_windows, section("held-out stream")
    )
    conversations = data.long_conversations(long_tokens)
    long_rows = evaluate_contexts(
        engine,
        config,
        conversations,
        contexts,
        target,
        max_windows,
        section("long conversations"),
    )
    horizon = measure_horizon(
        engine,
        config,
        data.tokens,
        horizon_positions,
        horizon_chunks,
        warmup_chunks,
        thresholds,
        section("memory horizon"),
    )
    engine.reset()
    return EvalReport(
        model=str(engine.path),
        config=dict(engine.config),
        data_dir=data_dir,
        split=split,
        target=target,
        max_windows=max_windows,
        stream_tokens=len(data.tokens),
        stream_rows=stream_rows,
        long_tokens=long_tokens,
        long_conversations=len(conversations),
        long_conversation_tokens=sum(len(c) for c in conversations),
        long_rows=long_rows,
        horizon=horizon,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# Markdown tables


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_rate(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "-"


def format_context_table(rows: Sequence[ContextRow], show_streams: bool = False) -> str:
    """Format loss rows as a markdown table. A row without windows reads n/a and the reason.

    The change column is the paired difference against the shortest context, with its
    standard error.
    """
    shortest = min(row.context for row in rows)
    header = ["context", "windows"]
    if show_streams:
        header.append("conversations")
    header += [
        "target tokens",
        "loss (nats/token)",
        "s.e.",
        f"change vs {shortest:,} (s.e.)",
        "feed tokens/s",
        "score tokens/s",
    ]
    lines = []
    for row in rows:
        cells = [f"{row.context:,}", str(row.windows)]
        if show_streams:
            cells.append(str(row.streams))
        if row.loss is None:
            cells += [str(row.target_tokens), f"n/a: {row.note}", "-", "-", "-", "-"]
        else:
            cells += [
                f"{row.target_tokens:,}",
                f"{row.loss:.4f}",
                format_optional(row.standard_error, ".4f"),
                format_difference(row),
                format_rate(rate(row.feed_tokens, row.feed_seconds)),
                format_rate(rate(row.score_tokens, row.score_seconds)),
            ]
        lines.append(cells)
    return markdown_table(header, lines)


def format_optional(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def format_difference(row: ContextRow) -> str:
    if row.difference is None:
        return "-"
    error = format_optional(row.difference_error, ".5f")
    return f"{row.difference:+.5f} ({error})"


def format_horizons(result: HorizonResult) -> str:
    """Format the horizon at each threshold as a markdown table."""
    header = [
        "threshold",
        "horizon, chunks (mean)",
        "per run",
        "horizon, tokens (mean)",
    ]
    rows = []
    for threshold, horizons in zip(result.thresholds, result.horizons):
        # A run that never fell below the threshold counts as chunks + 1, a lower bound.
        values = [h if h is not None else result.chunks + 1 for h in horizons]
        bound = ">= " if any(h is None for h in horizons) else ""
        mean = float(np.mean(values))
        per_run = ", ".join(str(h) if h is not None else f">{result.chunks}" for h in horizons)
        rows.append(
            [
                f"{threshold:g}",
                f"{bound}{mean:.1f}",
                per_run,
                f"{bound}{mean * result.mem_len:,.0f}",
            ]
        )
    return markdown_table(header, rows)


def format_differences(result: HorizonResult) -> str:
    """Format the mean relative memory-key difference at lags 0, 1, 2, 4, 8, ... chunks."""
    means = result.mean_differences
    assert means is not None
    lags = [0] + [2**i for i in range(int(math.log2(max(result.chunks, 1))) + 1)]
    if lags[-1] != result.chunks:
        lags.append(result.chunks)
    rows = [
        [str(lag), f"{lag * result.mem_len:,}", f"{means[lag]:.3g}"]
        for lag in sorted(set(lags))
        if lag <= result.chunks
    ]
    return markdown_table(["chunks after the change", "tokens", "relative difference"], rows)


def format_report(report: EvalReport) -> str:
    """Format a whole report as markdown."""
    config = report.config
    kind = "memory model" if config["mem_len"] else "plain llama2.c model"
    title = (
        f"model: `{report.model}` ({kind}: dim {config['dim']}, n_layers {config['n_layers']}, "
        f"mem_len {config['mem_len']}, seq_len {config['seq_len']}, "
        f"vocab_size {config['vocab_size']})"
    )

    stream_heading = (
        f"### Held-out stream: all {report.split} conversations read as one stream "
        f"({report.stream_tokens:,} tokens)"
    )
    stream_method = (
        f"Loss of {report.target} target tokens after each context length. Every row scores "
        f"the same target spans (at most {report.max_windows}), each window from the "
        "initial state."
    )

    long_heading = (
        f"### Long conversations: {report.long_conversations} {report.split} conversations "
        f"longer than {report.long_tokens:,} tokens ({report.long_conversation_tokens:,} "
        "tokens), each its own stream"
    )

    if report.long_conversations:
        long_table = format_context_table(report.long_rows, show_streams=True)
    else:
        long_table = "n/a: no conversation is that long"

    parts = [
        title,
        "",
        stream_heading,
        "",
        stream_method,
        "",
        format_context_table(report.stream_rows),
        "",
        long_heading,
        "",
        long_table,
        "",
        "### Memory horizon",
        "",
    ]

    horizon = report.horizon
    if horizon.note:
        parts.append(f"n/a: {horizon.note}")
    else:
        horizon_method = (
            f"{len(horizon.changed_offsets)} runs, each from the initial state: "
            f"{horizon.warmup_chunks} chunks of {horizon.mem_len} tokens, then one chunk "
            f"replaced by other held-out tokens, then {horizon.chunks} chunks alike in both "
            "copies. The relative difference is ||K - K'|| / ||K|| over the memory key rows "
            "of all layers. The horizon is the number of chunks after the changed chunk from "
            "which on the difference stays below the threshold at every measured chunk (0: "
            "below it already right after the changed chunk)."
        )
        parts += [
            horizon_method,
            "",
            format_horizons(horizon),
            "",
            format_differences(horizon),
        ]
    return "\n".join(parts) + "\n"
