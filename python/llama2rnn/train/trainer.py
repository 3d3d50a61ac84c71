"""Training loop: AdamW, warmup + cosine schedule, accumulation, checkpoints, DDP.

Launch with ``python -m llama2rnn.train train ...`` for one process, or under
``torchrun --nproc_per_node N -m llama2rnn.train train ...`` for DistributedDataParallel
(gloo on CPU, NCCL on CUDA). Only rank 0 logs, evaluates into the log and saves.

Batches are random windows of ``seq_len + 1`` tokens from the training stream. The
window starts for a step are drawn from a generator seeded by (seed, rank, step), so
a resumed run reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .data import read_index, read_meta, read_tokens
from .model import ModelArgs, Transformer

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "ckpt.pt"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Training run settings; model sizes are copied into ``ModelArgs``."""

    data_dir: str = "runs/data"
    out_dir: str = "runs/default"
    # Model (vocab_size comes from the data directory).
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    hidden_dim: int = 384
    seq_len: int = 256
    mem_len: int = 32
    # Optimization. One step uses batch_size * grad_accum * world_size sequences.
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # Length: max_steps, else max_tokens, else a wall-clock budget of max_minutes.
    max_steps: int = 0
    max_tokens: int = 0
    max_minutes: float = 0.0
    calibrate_seconds: float = 60.0
    # Evaluation, logging and checkpoints (intervals in optimizer steps).
    eval_interval: int = 200
    eval_tokens: int = 65536
    log_interval: int = 10
    checkpoint_interval: int = 200
    resume: bool = True
    seed: int = 1337
    threads: int = 1
    device: str = "auto"

    def model_args(self, vocab_size: int) -> ModelArgs:
        return ModelArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            vocab_size=vocab_size,
            hidden_dim=self.hidden_dim,
            seq_len=self.seq_len,
            mem_len=self.mem_len,
        )


def cosine_phase(
    step: int,
    config: TrainConfig,
    total_steps: int,
    anchor_step: Optional[int] = None,
    anchor_phase: float = 0.0,
) -> float:
    """Position in the cosine decay, from 0 (peak rate) to 1 (``min_lr``).

    The phase grows linearly from ``anchor_phase`` at ``anchor_step`` (default: the end
    of warmup) to 1 at ``total_steps``. Moving the anchor when the plan changes keeps
    the learning rate continuous.
    """
    start = config.warmup_steps if anchor_step is None else anchor_step
    phase = anchor_phase + (1.0 - anchor_phase) * (step - start) / max(1, total_steps - start)
    return min(1.0, max(0.0, phase))


def lr_at(
    step: int,
    config: TrainConfig,
    total_steps: Optional[int],
    anchor_step: Optional[int] = None,
    anchor_phase: float = 0.0,
) -> float:
    """Learning rate for ``step``: linear warmup, then cosine decay to ``min_lr`` at ``total_steps``.

    Before ``total_steps`` is known (wall-clock calibration), the rate stays at ``lr``
    after warmup. See ``cosine_phase`` for the anchor.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if total_steps is None:
        return config.lr
    if step >= total_steps:
        return config.min_lr
    phase = cosine_phase(step, config, total_steps, anchor_step, anchor_phase)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * phase)) * (config.lr - config.min_lr)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ----------------------------------------------------------------------------
# Data


def sample_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int, step: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` random windows of ``seq_len + 1`` tokens as (inputs, targets)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the token stream ({len(tokens)} tokens) is shorter than seq_len + 1 = {seq_len + 1}"
        )
    rng = np.random.default_rng([seed, rank, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(windows)
    return batch[:, :-1], batch[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, eval_tokens: int) -> np.ndarray:
    """Evenly spaced, fixed window starts covering about ``eval_tokens`` validation tokens."""
    if len(tokens) < seq_len + 1:
        return np.zeros(0, dtype=np.int64)
    n = max(1, min(eval_tokens // seq_len, (len(tokens) - 1) // seq_len))
    return np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)


@torch.no_grad()
def evaluate(
    model: Transformer,
    tokens: np.ndarray,
    starts: np.ndarray,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean next-token loss over validation windows, each started from the initial memory."""
    seq_len = model.args.seq_len
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = starts[rank::world_size]
    for i in range(0, len(mine), batch_size):
        windows = np.stack(
            [
                np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64)
                for s in mine[i : i + batch_size]
            ]
        )
        batch = torch.from_numpy(windows).to(device)
        _, loss, _ = model(batch[:, :-1], batch[:, 1:])
        assert loss is not None
        total[0] += loss.double() * len(windows)
        total[1] += len(windows)
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


@torch.no_grad()
def stream_loss(model: Transformer, tokens: np.ndarray, device: torch.device) -> tuple[float, int]:
    """Sum of next-token losses over one token stream and the number of predicted tokens.

    The stream is read in blocks of ``seq_len`` tokens. A memory model carries its memory
    from block to block, so it reads the whole stream. The baseline restarts its
    context at every block, because it cannot attend beyond ``seq_len``.
    """
    block = model.args.seq_len
    memory = None
    total = 0.0
    count = 0
    for start in range(0, len(tokens) - 1, block):
        window = torch.from_numpy(np.asarray(tokens[start : start + block + 1], dtype=np.int64)).to(
            device
        )
        inputs, targets = window[None, :-1], window[None, 1:]
        _, loss, new_memory = model(inputs, targets, memory)
        assert loss is not None
        total += float(loss) * targets.numel()
        count += targets.numel()
        memory = new_memory
    return total, count


def evaluate_split(
    model: Transformer,
    data_dir: str | os.PathLike[str],
    split: str,
    long_tokens: int,
    device: torch.device,
) -> dict[str, Any]:
    """Loss of a split read as one stream, and of its conversations longer than ``long_tokens``.

    Each long conversation is its own stream, started from the initial memory.
    """
    model.eval()
    tokens = read_tokens(data_dir, split)
    index = read_index(data_dir, split)
    total, count = stream_loss(model, tokens, device)
    result: dict[str, Any] = {
        "split": split,
        "stream_tokens": count,
        "stream_loss": total / max(count, 1),
    }
    long_total, long_count, n_long = 0.0, 0, 0
    for start, end in zip(index[:-1], index[1:]):
        if end - start > long_tokens:
            conversation_total, conversation_count = stream_loss(model, tokens[start:end], device)
            long_total += conversation_total
            long_count += conversation_count
            n_long += 1
    result.update(
        long_threshold=long_tokens,
        long_conversations=n_long,
        long_tokens=long_count,
        long_loss=long_total / long_count if long_count else float("nan"),
    )
    return result


# ----------------------------------------------------------------------------
# Setup


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def all_max(runtime: Runtime, values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over all ranks (the values themselves in one process)."""
    if runtime.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def setup_runtime(config: TrainConfig) -> Runtime:
    """Set thread counts, start the process group under torchrun and pick the device."""
    torch.set_num_threads(config.threads)
    with contextlib.suppress(RuntimeError):
        # Raises when inter-op work has already started in this process.
        torch.set_num_interop_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank, local_rank, world_size, device)


def build_optimizer(model: Transformer, config: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices except the learned initial memory."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not name.endswith("ori_mem"):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **kwargs)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temporary file, then rename)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training checkpoint written by ``train``."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {state.get('version')!r}")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> Transformer:
    """Build the model stored in a training checkpoint (on the CPU, in eval mode)."""
    model = Transformer(ModelArgs(**state["model_args"]))
    model.load_state_dict(state["model"])
    return model.eval()


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------
# Loop


class Planner:
    """Schedule length: from max_steps, max_tokens, or a wall-clock budget.

    With a budget, the first ``calibrate_seconds`` of training measure the time per
    step. The plan then fits the remaining steps and their evaluations into 97% of the
    remaining budget. On a shared machine the speed changes, so after every evaluation
    the plan is refitted to the speed since the previous fit, with the cosine continuing
    from its current phase. The loop also stops at the budget as a last resort.
    """

    def __init__(self, config: TrainConfig, tokens_per_step: int, eval_seconds: float) -> None:
        self.config = config
        self.tokens_per_step = tokens_per_step
        self.eval_seconds = eval_seconds
        self.budget = config.max_minutes * 60.0
        # Short budgets (tests) calibrate over a fifth of the budget instead.
        self.calibrate_seconds = min(config.calibrate_seconds, 0.2 * self.budget)
        self.total_steps: Optional[int] = None
        self.anchor_step: Optional[int] = None
        self.anchor_phase = 0.0
        self.tokens_per_second: Optional[float] = None
        self.adaptive = config.max_steps <= 0 and config.max_tokens <= 0
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        elif config.max_tokens > 0:
            self.total_steps = math.ceil(config.max_tokens / tokens_per_step)
        elif self.budget <= 0:
            raise ValueError("set one of max_steps, max_tokens or max_minutes")

    def calibrate(
        self,
        step: int,
        elapsed: float,
        timed_steps: int,
        timed_seconds: float,
        announce: bool = True,
    ) -> None:
        """Fix ``total_steps`` from the steps timed so far and log the plan when ``announce`` is set."""
        seconds_per_step = timed_seconds / max(1, timed_steps)
        self.tokens_per_second = self.tokens_per_step / seconds_per_step
        per_step = seconds_per_step + self.eval_seconds / max(1, self.config.eval_interval)
        # Reserve time for the final evaluation and checkpoint, plus a 3% margin for slowdowns.
        remaining = 0.97 * (self.budget - elapsed) - 2 * self.eval_seconds
        self.total_steps = max(step + 1, step + int(remaining / per_step))
        if not announce:
            return
        logger.info(
            "calibrated: %.0f tokens/s over %d steps, planning %d steps (%s tokens) for %.1f minutes",
            self.tokens_per_second,
            timed_steps,
            self.total_steps,
            f"{self.total_steps * self.tokens_per_step:,}",
            self.config.max_minutes,
        )

    def lr(self, step: int) -> float:
        return lr_at(step, self.config, self.total_steps, self.anchor_step, self.anchor_phase)

    def replan(
        self, step: int, elapsed: float, seconds_per_step: float, announce: bool = True
    ) -> None:
        """Refit ``total_steps`` to the budget, given the recent wall time per step (evaluations included)."""
        assert self.total_steps is not None
        remaining = 0.97 * (self.budget - elapsed) - 2 * self.eval_seconds
        new_total = max(
            step + 1, self.config.warmup_steps + 1, step + int(remaining / seconds_per_step)
        )
        # Changes under 3% of the remaining steps are noise.
        if abs(new_total - self.total_steps) <= 0.03 * max(1, self.total_steps - step):
            return
        old_total = self.total_steps
        if step >= self.config.warmup_steps:
            self.anchor_phase = cosine_phase(
                step, self.config, self.total_steps, self.anchor_step, self.anchor_phase
            )
            self.anchor_step = step
        self.total_steps = new_total
        self.tokens_per_second = self.tokens_per_step / seconds_per_step
        if announce:
            logger.info(
                "replanned at step %d: %.0f tokens/s (evaluations included), %d steps instead of %d",
                step,
                self.tokens_per_second,
                new_total,
                old_total,
            )


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a model and return a summary of the run, also written to ``summary.json``."""
    runtime = setup_runtime(config)
    device = runtime.device
    out_dir = Path(config.out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    meta = read_meta(config.data_dir)
    train_tokens = read_tokens(config.data_dir, "train")
    val_tokens = read_tokens(config.data_dir, "val")
    args = config.model_args(meta["vocab_size"])

    torch.manual_seed(config.seed)
    model = Transformer(args).to(device)
    use_cuda = device.type == "cuda"
    optimizer = build_optimizer(model, config, fused=use_cuda)
    tokens_per_step = config.batch_size * config.grad_accum * runtime.world_size * config.seq_len

    step = 0
    elapsed_before = 0.0
    schedule: Optional[dict[str, Any]] = None
    if config.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state["model_args"] != args.to_dict():
            raise ValueError(
                f"{ckpt_path} contains a model with {state['model_args']}, but the settings give "
                f"{args.to_dict()}; use another --out-dir or pass --no-resume"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        elapsed_before = state["elapsed_seconds"]
        schedule = {
            "total_steps": state["total_steps"],
            "anchor_step": state.get("anchor_step"),
            "anchor_phase": state.get("anchor_phase", 0.0),
            "tokens_per_second": state.get("tokens_per_second"),
        }
        set_rng_state(state["rng"])
        if runtime.is_main:
            logger.info(
                "resumed %s at step %d (%.1f minutes trained)", ckpt_path, step, elapsed_before / 60
            )

    raw_model = model
    if runtime.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.local_rank] if use_cuda else None
        )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if use_cuda and torch.cuda.is_bf16_supported()
        else contextlib.nullcontext()
    )

    if runtime.is_main:
        logger.info(
            "model %s: %s parameters; %s tokens per step; %d train tokens, %d validation tokens",
            args.to_dict(),
            f"{raw_model.count_parameters():,}",
            f"{tokens_per_step:,}",
            len(train_tokens),
            len(val_tokens),
        )

    starts = eval_windows(val_tokens, config.seq_len, config.eval_tokens)
    start_time = time.monotonic()

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - start_time

    def run_eval() -> float:
        with autocast:
            return evaluate(
                raw_model,
                val_tokens,
                starts,
                config.batch_size,
                device,
                runtime.rank,
                runtime.world_size,
            )

    t0 = time.monotonic()
    val_loss = run_eval()
    eval_seconds = time.monotonic() - t0
    if runtime.is_main:
        logger.info(
            "step %d: validation loss %.4f (%d windows, %.1fs)",
            step,
            val_loss,
            len(starts),
            eval_seconds,
        )

    planner = Planner(config, tokens_per_step, eval_seconds)
    if schedule is not None and planner.adaptive:
        planner.total_steps = schedule["total_steps"]
        planner.anchor_step = schedule["anchor_step"]
        planner.anchor_phase = schedule["anchor_phase"]
        planner.tokens_per_second = schedule["tokens_per_second"]

    metrics_path = out_dir / "metrics.jsonl"

    def write_metrics(record: dict[str, Any]) -> None:
        if runtime.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        if not runtime.is_main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "version": CHECKPOINT_VERSION,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "model_args": args.to_dict(),
                "train_config": asdict(config),
                "step": step,
                "tokens": step * tokens_per_step,
                "total_steps": planner.total_steps,
                "anchor_step": planner.anchor_step,
                "anchor_phase": planner.anchor_phase,
                "tokens_per_second": planner.tokens_per_second,
                "elapsed_seconds": elapsed(),
                "val_loss": val_loss,
                "rng": rng_state(),
                "data": {"data_dir": config.data_dir, "vocab_size": meta["vocab_size"]},
            },
        )

    model.train()
    first_step = step
    # The first steps are slower (allocator warm-up), so calibration timing starts after them.
    calibration_skip = 2
    timed_start: Optional[float] = None
    timed_from = step
    # Start of the timing window for replanning.
    mark_time, mark_step = time.monotonic(), step
    window_start = time.monotonic()
    window_tokens = 0
    stopped_by_budget = False
    train_loss = float("nan")
    while planner.total_steps is None or step < planner.total_steps:
        if planner.budget > 0:
            (over_budget,) = all_max(runtime, [float(elapsed() >= planner.budget)])
            if over_budget:
                stopped_by_budget = True
                break
        lr = planner.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum = 0.0
        for micro in range(config.grad_accum):
            inputs, targets = sample_batch(
                train_tokens,
                config.batch_size,
                config.seq_len,
                config.seed,
                runtime.rank,
                step,
                micro,
            )
            inputs, targets = (
                inputs.to(device, non_blocking=True),
                targets.to(device, non_blocking=True),
            )
            sync = micro == config.grad_accum - 1 or runtime.world_size == 1
            no_sync = contextlib.nullcontext() if sync else model.no_sync()  # type: ignore[operator]
            with no_sync, autocast:
                _, loss, _ = model(inputs, targets)
                assert loss is not None
            (loss / config.grad_accum).backward()
            loss_sum += loss.item()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = loss_sum / config.grad_accum
        window_tokens += tokens_per_step

        if planner.total_steps is None:
            if step - timed_from == calibration_skip:
                timed_start = time.monotonic()
            elif timed_start is not None:
                # Ranks agree on the timings so that they all plan the same number of steps.
                timed, now_elapsed = all_max(runtime, [time.monotonic() - timed_start, elapsed()])
                if timed >= planner.calibrate_seconds:
                    planner.calibrate(
                        step,
                        now_elapsed,
                        step - timed_from - calibration_skip,
                        timed,
                        runtime.is_main,
                    )
                    mark_time, mark_step = time.monotonic(), step

        if runtime.is_main and (step % config.log_interval == 0 or step == planner.total_steps):
            now = time.monotonic()
            rate = window_tokens / max(now - window_start, 1e-9)
            window_start, window_tokens = now, 0
            total = planner.total_steps
            if total is not None:
                # The average over this process's steps is steadier than the current rate.
                seconds_per_step = (now - start_time) / max(1, step - first_step)
                left = (total - step) * seconds_per_step
                left_text = format_seconds(left)
                if planner.budget > 0:
                    left_text = format_seconds(min(left, planner.budget - elapsed()))
                progress = f"{step}/{total}"
            else:
                left_text, progress = "calibrating", f"{step}/?"
            logger.info(
                "step %s | loss %.4f | lr %.2e | %s tok/s | elapsed %s | left %s",
                progress,
                train_loss,
                lr,
                f"{rate:,.0f}",
                format_seconds(elapsed()),
                left_text,
            )
            write_metrics(
                {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "train_loss": train_loss,
                    "lr": lr,
                    "elapsed": elapsed(),
                }
            )

        if step % config.eval_interval == 0 and step != planner.total_steps:
            val_loss = run_eval()
            if runtime.is_main:
                logger.info("step %d: validation loss %.4f", step, val_loss)
                write_metrics(
                    {
                        "step": step,
                        "tokens": step * tokens_per_step,
                        "val_loss": val_loss,
                        "elapsed": elapsed(),
                    }
                )
            if planner.adaptive and planner.total_steps is not None and step > mark_step:
                now = time.monotonic()
                per_step, now_elapsed = all_max(
                    runtime, [(now - mark_time) / (step - mark_step), elapsed()]
                )
                planner.replan(step, now_elapsed, per_step, runtime.is_main)
                mark_time, mark_step = now, step
        if step % config.checkpoint_interval == 0:
            checkpoint()

    if stopped_by_budget and runtime.is_main:
        logger.warning(
            "stopped at step %d of %s because the %.1f-minute budget ran out before the schedule ended",
            step,
            planner.total_steps,
            config.max_minutes,
        )
    val_loss = run_eval()
    checkpoint()
    summary = {
        "model_args": args.to_dict(),
        "steps": step,
        "tokens": step * tokens_per_step,
        "train_seconds": elapsed(),
        "tokens_per_second": planner.tokens_per_second,
        "final_train_loss": train_loss,
        "val_loss": val_loss,
        "val_windows": len(starts),
        "stopped_by_budget": stopped_by_budget,
        "train_config": asdict(config),
    }
    if runtime.is_main:
        logger.info(
            "finished: step %d, %s tokens, %s, validation loss %.4f",
            step,
            f"{step * tokens_per_step:,}",
            format_seconds(elapsed()),
            val_loss,
        )
        write_metrics(
            {
                "step": step,
                "tokens": step * tokens_per_step,
                "val_loss": val_loss,
                "elapsed": elapsed(),
                "final": True,
            }
        )
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if runtime.world_size > 1:
        dist.barrier()
    return summary
