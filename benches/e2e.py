"""End-to-end benchmark of llama2rnn against llama.cpp on random-weight models.

Two model shapes, both with vocab 32000 and M = 128 memory slots (the chunk length):

- toy20M: dim 288, hidden_dim 768, 6 layers, 6 heads, seq_len 256;
- 110M: dim 768, hidden_dim 2048, 12 layers, 12 heads, seq_len 1024.

Each shape is written once with seed 0 as a llama2rnn checkpoint (Q8_0) and, when the
``gguf`` package is installed, as a plain Llama GGUF (Q8_0, same weights minus the
memory weights, see ``gguf_export.py``). Sections (``--sections``):

compare
    For each shape and thread count, alternate one llama2rnn process and one llama.cpp
    process per round, so that machine noise cancels in the ratio. llama2rnn measures:

    - decode tokens/s, greedy and top-p 0.9 at temperature 1, over ``--decode-tokens``
      steps of ``feed([token]); token = sample()`` after a 16-token prompt. The steps
      cross several chunk ends, so memory updates are included;
    - prefill tokens/s of ``--prefill-tokens`` known tokens in one ``feed``;
    - the memory update time: the step that completes a chunk minus the step before it;
    - load time and peak RSS.

    llama.cpp runs through llama-cpp-python's low-level API, with one ``llama_decode``
    and one ``llama_sampler_sample`` call per token. It measures decode tokens/s with the
    same prompt and step count, prompt processing tokens/s, load time and peak RSS.
busy
    The same decode with a busy-loop child process keeping one core busy: 2 threads
    against 1 thread, for both engines, alternating 1 and 2 threads round by round.
roof
    Read bandwidth (numpy reductions over a 1 GiB array, 1 and 2 threads, best of
    ``--roof-repeats`` passes) and the decode roof of the 110M shape: bandwidth / bytes
    read per token.
load
    Engine construction time on the 110M checkpoint, in fresh processes (warm page cache).
long
    toy20M, 1 thread, greedy decode up to ``--long-max`` tokens; tokens/s over the last
    1,000 tokens and RSS at 10^3, 10^4, 10^5 and 10^6 tokens. ``--long`` adds it.

``--kernel`` forces llama2rnn's kernel path (default: the one detected), as
``LLAMA2RNN_KERNEL`` does for the front ends.

Every measurement runs in a fresh worker process (this script with ``--worker``), so
peak RSS values do not mix. Progress goes to stderr and the markdown tables to stdout.
llama.cpp columns are skipped with a note when ``llama_cpp`` or ``gguf`` is missing.

Usage:
    python benches/e2e.py [--shapes toy20M,110M] [--threads 1,2] [--rounds 3] [--quick]
        [--sections compare,busy,roof,load] [--long --long-max 1000000]
        [--dir FOLDER] [--json PATH]

``--sections long --long-max N`` runs only the long run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(SCRIPT.parent))

# Workers print their result as one line starting with this marker.
RESULT_MARKER = "E2E-RESULT "
SEED = 0
PROMPT_LENGTH = 16
# llama.cpp context: room for the 1024-token prompt-processing test and the decode runs.
LLAMA_CPP_CONTEXT = 2048
# Physical batch of llama.cpp prompt processing (its default n_ubatch).
LLAMA_CPP_BATCH = 512
# Decode rates are also reported per block of this many steps, to show how they change
# with the position: llama2rnn's cost per token is bounded, llama.cpp's grows with context.
DECODE_BLOCK = 128
LONG_CHECKPOINTS = (10**3, 10**4, 10**5, 10**6)
LONG_WINDOW = 1000
LONG_PROGRESS_SECONDS = 60.0
BANDWIDTH_BYTES = 1 << 30
ALL_SECTIONS = ("compare", "busy", "roof", "load", "long")
DEFAULT_SECTIONS = ("compare", "busy", "roof", "load")


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    seq_len: int
    mem_len: int
    decode_tokens: int  # default decode steps per measurement

    def config(self):
        from llama2rnn.checkpoint import Config

        return Config(
            dim=self.dim,
            hidden_dim=self.hidden_dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            mem_len=self.mem_len,
        )


SHAPES = {
    "toy20M": Shape("toy20M", 288, 768, 6, 6, 32000, 256, 128, decode_tokens=1024),
    "110M": Shape("110M", 768, 2048, 12, 12, 32000, 1024, 128, decode_tokens=512),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------
# Measurements inside a worker process


def proc_status_kib(field: str) -> int:
    """Return a /proc/self/status field in KiB (VmRSS, VmHWM), or ru_maxrss for VmHWM."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    if field == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return -1


def token_ids(count: int, vocab_size: int, salt: int = 0) -> List[int]:
    """Return deterministic token ids in [3, vocab_size), avoiding the special ids 0..2."""
    return [3 + (7919 * (i + salt) + 104729) % (vocab_size - 3) for i in range(count)]


def time_call(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def llama2rnn_decode(engine, prompt: List[int], steps: int) -> Dict[str, Any]:
    """Decode `steps` tokens after `prompt`; return tokens/s overall and per block of steps."""
    engine.reset()
    engine.feed(prompt)
    token = engine.sample()
    feed, sample = engine.feed, engine.sample
    block_rates = []
    start = time.perf_counter()
    for block_start in range(0, steps, DECODE_BLOCK):
        block_steps = min(DECODE_BLOCK, steps - block_start)
        block_begin = time.perf_counter()
        for _ in range(block_steps):
            feed([token])
            token = sample()
        block_rates.append(block_steps / (time.perf_counter() - block_begin))
    return {"rate": steps / (time.perf_counter() - start), "block_rates": block_rates}


def store_decode(result: Dict[str, Any], key: str, decode: Dict[str, Any]) -> None:
    result[key] = decode["rate"]
    result[key + "_blocks"] = decode["block_rates"]


def llama2rnn_memory_update_ms(engine, mem_len: int, vocab_size: int, repeats: int) -> Dict:
    """Time the step that completes a chunk minus the step just before it.

    Each repeat resets, prefills M-2 tokens, then times the step at chunk position M-2 (no
    update) and the one at M-1 (forward plus the memory update of every layer).
    """
    tokens = token_ids(mem_len, vocab_size, salt=3)
    plain, completing = [], []
    for _ in range(repeats):
        engine.reset()
        engine.feed(tokens[: mem_len - 2])
        plain.append(time_call(lambda: engine.feed([tokens[mem_len - 2]])))
        completing.append(time_call(lambda: engine.feed([tokens[mem_len - 1]])))
    return {
        "step_ms": median(plain) * 1000,
        "completing_step_ms": median(completing) * 1000,
        "update_ms": (median(completing) - median(plain)) * 1000,
    }


def run_llama2rnn_worker(task: Dict) -> Dict:
    from llama2rnn._llama2rnn import Engine

    rss_before_kib = proc_status_kib("VmRSS")
    start = time.perf_counter()
    engine = Engine(task["path"], threads=task["threads"], kernel=task["kernel"])
    result: Dict[str, Any] = {"load_s": time.perf_counter() - start, "kernel": engine.kernel}
    config = engine.config
    vocab_size, mem_len = config["vocab_size"], config["mem_len"]
    prompt = token_ids(PROMPT_LENGTH, vocab_size)
    measures = task["measures"]
    steps = task["decode_tokens"]

    if "decode" in measures:
        engine.set_sampling(0.0, 1.0, SEED)
        store_decode(result, "decode_greedy", llama2rnn_decode(engine, prompt, steps))
    if "topp" in measures:
        engine.set_sampling(1.0, 0.9, SEED)
        store_decode(result, "decode_top_p", llama2rnn_decode(engine, prompt, steps))
    if "prefill" in measures:
        tokens = token_ids(task["prefill_tokens"], vocab_size, salt=1)
        times = []
        for repeat in range(task["prefill_repeats"] + 1):
            engine.reset()
            elapsed = time_call(lambda: engine.feed(tokens))
            if repeat > 0:  # the first run is a warm-up
                times.append(elapsed)
        result["prefill"] = len(tokens) / median(times)
    if "update" in measures:
        result.update(
            llama2rnn_memory_update_ms(engine, mem_len, vocab_size, task["update_repeats"])
        )
    result["rss_before_mib"] = rss_before_kib / 1024
    result["peak_rss_mib"] = proc_status_kib("VmHWM") / 1024
    return result


class LlamaCpp:
    """A llama.cpp model and context driven through llama-cpp-python's C bindings."""

    def __init__(self, path: str, threads: int, context: int, extra_buffers: bool = True):
        import llama_cpp

        self.lib = llama_cpp
        # Keep a reference: llama.cpp calls this for every log line.
        self._log_callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(self._log_callback, None)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        # The extra buffer types hold weights for llama.cpp's AMX and repacked-weight kernels.
        model_params.use_extra_bufts = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp failed to load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context
        params.n_batch = LLAMA_CPP_BATCH
        params.n_ubatch = LLAMA_CPP_BATCH
        params.n_threads = threads
        params.n_threads_batch = threads
        self.flash_attn_type = int(params.flash_attn_type)
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp failed to create a context")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.single_token = (llama_cpp.llama_token * 1)()

    def sampler(self, temperature: float, top_p: float):
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if temperature == 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(SEED))
        return chain

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    def decode_tokens(self, tokens: List[int]) -> None:
        """Evaluate `tokens` in batches of at most LLAMA_CPP_BATCH."""
        lib = self.lib
        for start in range(0, len(tokens), LLAMA_CPP_BATCH):
            batch = tokens[start : start + LLAMA_CPP_BATCH]
            array = (lib.llama_token * len(batch))(*batch)
            status = lib.llama_decode(self.ctx, lib.llama_batch_get_one(array, len(batch)))
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")

    def decode(self, prompt: List[int], steps: int, sampler) -> Dict[str, Any]:
        """Decode `steps` tokens after `prompt`; return tokens/s overall and per block."""
        lib, ctx, single_token = self.lib, self.ctx, self.single_token
        self.clear()
        self.decode_tokens(prompt)
        token = lib.llama_sampler_sample(sampler, ctx, -1)
        block_rates = []
        start = time.perf_counter()
        for block_start in range(0, steps, DECODE_BLOCK):
            block_steps = min(DECODE_BLOCK, steps - block_start)
            block_begin = time.perf_counter()
            for _ in range(block_steps):
                single_token[0] = token
                batch = lib.llama_batch_get_one(single_token, 1)
                status = lib.llama_decode(ctx, batch)
                if status != 0:
                    raise RuntimeError(f"llama_decode failed with status {status}")
                token = lib.llama_sampler_sample(sampler, ctx, -1)
            block_rates.append(block_steps / (time.perf_counter() - block_begin))
        return {"rate": steps / (time.perf_counter() - start), "block_rates": block_rates}


def run_llama_cpp_worker(task: Dict) -> Dict:
    rss_before_kib = proc_status_kib("VmRSS")
    start = time.perf_counter()
    llama = LlamaCpp(task["path"], task["threads"], LLAMA_CPP_CONTEXT, task["extra_buffers"])
    result: Dict[str, Any] = {
        "load_s": time.perf_counter() - start,
        "flash_attn_type": llama.flash_attn_type,
        "system_info": llama.lib.llama_print_system_info().decode(errors="replace").strip(),
    }
    vocab_size = task["vocab_size"]
    prompt = token_ids(PROMPT_LENGTH, vocab_size)
    measures = task["measures"]
    steps = task["decode_tokens"]
    if "decode" in measures:
        store_decode(result, "decode_greedy", llama.decode(prompt, steps, llama.sampler(0.0, 1.0)))
    if "topp" in measures:
        store_decode(result, "decode_top_p", llama.decode(prompt, steps, llama.sampler(1.0, 0.9)))
    if "prefill" in measures:
        tokens = token_ids(task["prefill_tokens"], vocab_size, salt=1)
        times = []
        for repeat in range(task["prefill_repeats"] + 1):
            llama.clear()
            elapsed = time_call(lambda: llama.decode_tokens(tokens))
            if repeat > 0:  # the first run is a warm-up
                times.append(elapsed)
        result["prefill"] = len(tokens) / median(times)
    result["rss_before_mib"] = rss_before_kib / 1024
    result["peak_rss_mib"] = proc_status_kib("VmHWM") / 1024
    return result


def run_bandwidth_worker(task: Dict) -> Dict:
    """Measure read bandwidth with numpy reductions, each thread reducing its own slice.

    numpy releases the GIL inside these reductions, so the threads run in parallel. The
    result is the best rate over the reductions and repeats, in GB/s (10^9 bytes).
    """
    import threading

    import numpy as np

    threads = task["threads"]
    data = np.ones(task["bytes"], dtype=np.int8).view(np.uint64)
    slices = np.array_split(data, threads)
    reductions = {
        "uint64 sum": lambda part: part.sum(),
        "uint64 bitwise_or.reduce": lambda part: np.bitwise_or.reduce(part),
    }
    best: Dict[str, float] = {}
    for name, reduce in reductions.items():
        rates = []
        for _ in range(task["repeats"]):
            workers = [threading.Thread(target=reduce, args=(part,)) for part in slices]
            start = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            rates.append(data.nbytes / (time.perf_counter() - start) / 1e9)
        best[name] = max(rates)
    method = max(best, key=best.get)
    return {"gb_per_s": best[method], "method": method, "by_method": best}


def run_long_worker(task: Dict) -> Dict:
    """Decode greedily up to task["max_tokens"] tokens, recording rate and RSS at checkpoints."""
    from llama2rnn._llama2rnn import Engine

    engine = Engine(task["path"], threads=task["threads"], kernel=task["kernel"])
    vocab_size = engine.config["vocab_size"]
    engine.set_sampling(0.0, 1.0, SEED)
    engine.feed(token_ids(PROMPT_LENGTH, vocab_size))
    token = engine.sample()
    feed, sample = engine.feed, engine.sample
    checkpoints = [c for c in LONG_CHECKPOINTS if c <= task["max_tokens"]]
    if task["max_tokens"] not in checkpoints:
        checkpoints.append(task["max_tokens"])
    rows = []
    decoded = 0
    start = time.perf_counter()
    last_progress = start
    for checkpoint in checkpoints:
        window_start_at = checkpoint - min(LONG_WINDOW, checkpoint)
        while decoded < window_start_at:
            feed([token])
            token = sample()
            decoded += 1
            if decoded % 1000 == 0 and time.perf_counter() - last_progress > LONG_PROGRESS_SECONDS:
                last_progress = time.perf_counter()
                rate = decoded / (last_progress - start)
                log(f"long run: {decoded:,} tokens, {rate:.1f} tokens/s on average")
        window_start = time.perf_counter()
        while decoded < checkpoint:
            feed([token])
            token = sample()
            decoded += 1
        now = time.perf_counter()
        rows.append(
            {
                "tokens": checkpoint,
                "window_tokens_per_s": (checkpoint - window_start_at) / (now - window_start),
                "average_tokens_per_s": checkpoint / (now - start),
                "rss_mib": proc_status_kib("VmRSS") / 1024,
                "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
                "elapsed_s": now - start,
            }
        )
        log(f"long run: checkpoint {rows[-1]}")
    return {"rows": rows, "position": engine.position}


WORKERS = {
    "llama2rnn": run_llama2rnn_worker,
    "llama.cpp": run_llama_cpp_worker,
    "bandwidth": run_bandwidth_worker,
    "long": run_long_worker,
}


def worker_main(task_json: str) -> None:
    task = json.loads(task_json)
    result = WORKERS[task["kind"]](task)
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# Orchestration in the parent process


# Whether llama.cpp workers use its extra buffer types. The first llama.cpp worker that
# crashes (SIGSEGV, SIGILL or SIGBUS) while using them turns them off for the rest of the
# run, and the report notes it: llama.cpp's AMX kernels crash on some virtual machines that
# report AMX.
LLAMA_CPP_OPTIONS = {"extra_buffers": True}


def run_worker(task: Dict) -> Optional[Dict]:
    """Run `task` in a fresh process and return its result, or None if the process failed."""
    if task["kind"] == "llama.cpp":
        task = {**task, "extra_buffers": LLAMA_CPP_OPTIONS["extra_buffers"]}
    command = [sys.executable, str(SCRIPT), "--worker", json.dumps(task)]
    # numpy's OpenBLAS starts a thread per core that polls while idle. Neither engine uses
    # BLAS, and at 2 threads on 2 cores that thread takes time from both.
    env = {"OPENBLAS_NUM_THREADS": "1", **os.environ}
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    log(f"worker {task['kind']} failed with exit status {completed.returncode}: {task}")
    crashed = -completed.returncode in (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS)
    if task["kind"] == "llama.cpp" and task["extra_buffers"] and crashed:
        log("llama.cpp: retrying without its extra buffer types for the rest of the run")
        LLAMA_CPP_OPTIONS["extra_buffers"] = False
        return run_worker(task)
    return None


def llama_cpp_status() -> Optional[str]:
    """Return why llama.cpp cannot be benchmarked, or None when it can."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is not installed (pip install gguf)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    return None


def llama_cpp_version() -> str:
    try:
        import llama_cpp

        return llama_cpp.__version__
    except ImportError:
        return "not installed"


@dataclass
class ModelFiles:
    shape: Shape
    llama2rnn: Path
    gguf: Optional[Path]
    group_size: int


def write_models(shape: Shape, folder: Path, with_gguf: bool) -> ModelFiles:
    """Write (or reuse, when present in `folder`) the checkpoint files of `shape`."""
    from llama2rnn import checkpoint

    config = shape.config()
    rnn_path = folder / f"{shape.name}-seed{SEED}.llama2rnn.bin"
    gguf_path = folder / f"{shape.name}-seed{SEED}.q8_0.gguf"
    need_rnn = not rnn_path.exists()
    need_gguf = with_gguf and not gguf_path.exists()
    if need_rnn or need_gguf:
        log(f"{shape.name}: generating random weights")
        weights = checkpoint.random_weights(config, seed=SEED)
        if need_rnn:
            log(f"{shape.name}: writing {rnn_path}")
            checkpoint.write_llama2rnn(rnn_path, config, weights)
        if need_gguf:
            from gguf_export import write_llama_gguf

            log(f"{shape.name}: writing {gguf_path}")
            write_llama_gguf(gguf_path, config, weights, context_length=LLAMA_CPP_CONTEXT)
        del weights
    return ModelFiles(
        shape,
        rnn_path,
        gguf_path if with_gguf else None,
        checkpoint.default_group_size(config),
    )


@dataclass
class Settings:
    shapes: List[str]
    threads: List[int]
    rounds: int
    decode_tokens: Optional[int]
    prefill_tokens: int
    prefill_repeats: int
    update_repeats: int
    busy_rounds: int
    load_repeats: int
    roof_repeats: int
    long_max: int
    sections: List[str]
    kernel: str


def decode_steps(settings: Settings, shape: Shape) -> int:
    return settings.decode_tokens if settings.decode_tokens else shape.decode_tokens


def engine_task(kind: str, files: ModelFiles, threads: int, settings: Settings, measures) -> Dict:
    path = files.llama2rnn if kind == "llama2rnn" else files.gguf
    return {
        "kind": kind,
        "path": str(path),
        "threads": threads,
        "measures": list(measures),
        "decode_tokens": decode_steps(settings, files.shape),
        "prefill_tokens": settings.prefill_tokens,
        "prefill_repeats": settings.prefill_repeats,
        "update_repeats": settings.update_repeats,
        "vocab_size": files.shape.vocab_size,
        "kernel": settings.kernel,
    }


def ratio(a: Optional[Dict], b: Optional[Dict], key: str) -> Optional[float]:
    if not a or not b or key not in a or key not in b:
        return None
    return a[key] / b[key]


def compare_rounds(
    files: ModelFiles, threads: int, settings: Settings, rounds: int, measures, with_cpp: bool
) -> Dict:
    """Alternate llama2rnn and llama.cpp processes for `rounds` rounds (A, B, A, B, ...)."""
    ours, theirs = [], []
    for round_index in range(rounds):
        a = run_worker(engine_task("llama2rnn", files, threads, settings, measures))
        ours.append(a)
        b = None
        if with_cpp:
            cpp_measures = [m for m in measures if m != "update"]
            b = run_worker(engine_task("llama.cpp", files, threads, settings, cpp_measures))
            theirs.append(b)
        parts = [f"{files.shape.name} {threads}t round {round_index + 1}/{rounds}:"]
        for key in ("decode_greedy", "decode_top_p", "prefill"):
            if a and key in a:
                text = f"{key} {a[key]:.1f}"
                if b and key in b:
                    text += f" vs llama.cpp {b[key]:.1f} (x{a[key] / b[key]:.2f})"
                parts.append(text)
        if a and "update_ms" in a:
            parts.append(f"memory update {a['update_ms']:.2f} ms")
        log(" ".join(parts))
    return {"llama2rnn": ours, "llama.cpp": theirs}


def summarize(runs: List[Optional[Dict]], key: str) -> Optional[float]:
    values = [run[key] for run in runs if run and key in run]
    return median(values) if values else None


def summarize_spread(runs: List[Optional[Dict]], key: str, digits: int = 1) -> str:
    """Format the median of `key` over `runs`, followed by the min-max range when there
    are several runs."""
    values = [run[key] for run in runs if run and key in run]
    if len(values) < 2:
        return fmt(median(values) if values else None, digits)
    return f"{fmt(median(values), digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"


def summarize_ratio(record: Dict, key: str) -> Optional[float]:
    pairs = zip(record["llama2rnn"], record["llama.cpp"])
    values = [r for r in (ratio(a, b, key) for a, b in pairs) if r is not None]
    return median(values) if values else None


# ---------------------------------------------------------------------------
# Decode roof


def decode_bytes_per_token(shape: Shape, group_size: int) -> Dict[str, float]:
    """Bytes that one llama2rnn decode step reads, averaged over chunk positions.

    Weights are Q8_0: one byte per value plus a 4-byte scale per group. The key/value
    window is fp32 and a step at chunk position p reads M + p + 1 rows of keys and of
    values in every layer, M + (M + 1) / 2 rows on average. The memory update reads
    aw1, aw2, aw3, wk and wv of every layer once per chunk of M tokens.
    """
    per_value = 1 + 4 / group_size
    d, h, m = shape.dim, shape.hidden_dim, shape.mem_len
    layer_matrices = 4 * d * d + 3 * d * h
    weights = (shape.n_layers * layer_matrices + shape.vocab_size * d + d) * per_value
    norms = (2 * shape.n_layers + 1) * d * 4
    kv = shape.n_layers * 2 * (m + (m + 1) / 2) * d * 4
    update = shape.n_layers * (3 * d * h + 2 * d * d) * per_value / m
    return {
        "weights": weights + norms,
        "kv": kv,
        "memory_update": update,
        "total": weights + norms + kv + update,
    }


def matrix_macs(shape: Shape) -> Dict[str, float]:
    """Multiply-accumulates in the matrix products of llama2rnn (attention excluded).

    A memory update multiplies all M memory rows of every layer by aw1, aw3, aw2, wk and
    wv. A prefill token goes through wq, wk, wv, wo, w1, w3 and w2 of every layer, plus
    its share of one memory update per M tokens. The classifier runs once per prefill
    call, so it is left out.
    """
    d, h, m = shape.dim, shape.hidden_dim, shape.mem_len
    update = shape.n_layers * m * (3 * d * h + 2 * d * d)
    forward = shape.n_layers * (4 * d * d + 3 * d * h)
    return {"memory_update": update, "prefill_per_token": forward + update / m}


def llama_cpp_bytes_per_token(shape: Shape, context: float) -> Dict[str, float]:
    """Bytes that one llama.cpp decode step reads at an average context of `context` tokens.

    Q8_0 in GGUF is 34 bytes per 32 values; the key/value cache is fp16 (the default).
    """
    d, h = shape.dim, shape.hidden_dim
    weights = (shape.n_layers * (4 * d * d + 3 * d * h) + shape.vocab_size * d) * 34 / 32
    kv = shape.n_layers * 2 * context * d * 2
    return {"weights": weights, "kv": kv, "total": weights + kv}


# ---------------------------------------------------------------------------
# Sections


def section_compare(models: Dict[str, ModelFiles], settings: Settings, with_cpp: bool) -> Dict:
    results: Dict[str, Dict[int, Dict]] = {}
    measures = ("decode", "topp", "prefill", "update")
    for name, files in models.items():
        results[name] = {}
        for threads in settings.threads:
            log(f"compare: {name}, {threads} thread(s), {settings.rounds} round(s)")
            results[name][threads] = compare_rounds(
                files, threads, settings, settings.rounds, measures, with_cpp
            )
    return results


def section_busy(models: Dict[str, ModelFiles], settings: Settings, with_cpp: bool) -> Dict:
    """Decode at 1 and 2 threads while a busy-loop child process keeps one core busy."""
    results: Dict[str, Dict[int, Dict]] = {}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    log(f"busy: started busy-loop process {busy.pid}")
    try:
        time.sleep(0.5)
        rounds = settings.busy_rounds
        for name, files in models.items():
            results[name] = {t: {"llama2rnn": [], "llama.cpp": []} for t in (1, 2)}
            # 1 and 2 threads alternate round by round, so that a drift in what the busy
            # loop takes from the machine falls on both.
            for round_index in range(rounds):
                for threads in (1, 2):
                    log(f"busy: {name}, {threads} thread(s), round {round_index + 1}/{rounds}")
                    round_runs = compare_rounds(
                        files, threads, settings, 1, ("decode",), with_cpp
                    )
                    for engine, runs in round_runs.items():
                        results[name][threads][engine] += runs
    finally:
        busy.terminate()
        busy.wait()
        log(f"busy: stopped busy-loop process {busy.pid}")
    return results


def section_roof(settings: Settings) -> Dict:
    """Measure read bandwidth per thread count in `roof_repeats` alternating passes.

    The roof uses the best pass, since other processes on the machine can only lower a
    measurement.
    """
    passes: Dict[int, List[Dict]] = {}
    for repeat in range(settings.roof_repeats):
        for threads in sorted(set(settings.threads) | {1, 2}):
            log(f"roof: read bandwidth with {threads} thread(s), pass {repeat + 1}")
            task = {"kind": "bandwidth", "threads": threads, "bytes": BANDWIDTH_BYTES, "repeats": 5}
            result = run_worker(task)
            if result is not None:
                passes.setdefault(threads, []).append(result)
    results = {}
    for threads, results_of_passes in passes.items():
        best = dict(max(results_of_passes, key=lambda r: r["gb_per_s"]))
        best["passes_gb_per_s"] = [r["gb_per_s"] for r in results_of_passes]
        results[threads] = best
    return results


def section_load(files: ModelFiles, settings: Settings) -> Dict:
    results = {}
    for threads in settings.threads:
        log(f"load: {files.shape.name}, {threads} thread(s), {settings.load_repeats} processes")
        runs = [
            run_worker(engine_task("llama2rnn", files, threads, settings, ()))
            for _ in range(settings.load_repeats)
        ]
        results[threads] = [run["load_s"] for run in runs if run]
    return results


def section_long(files: ModelFiles, settings: Settings) -> Optional[Dict]:
    log(
        f"long run: {files.shape.name}, 1 thread, greedy, up to {settings.long_max:,} tokens "
        "(10^6 tokens take about 20 to 60 minutes)"
    )
    return run_worker(
        {
            "kind": "long",
            "path": str(files.llama2rnn),
            "threads": 1,
            "max_tokens": settings.long_max,
            "kernel": settings.kernel,
        }
    )


# ---------------------------------------------------------------------------
# Report


def fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report_compare(compare: Dict, settings: Settings) -> List[str]:
    return [
        f"### Decode (tokens/s, median (min-max) of {settings.rounds} alternating rounds; "
        "ratio = median of per-round llama2rnn / llama.cpp)",
        "",
        decode_table(compare, settings),
        "",
        f"### Greedy decode by position (tokens/s per block of {DECODE_BLOCK} steps, median "
        f"over the rounds; the context of step s is {PROMPT_LENGTH} + s tokens)",
        "",
        position_table(compare, settings),
        "",
        f"### Prefill ({settings.prefill_tokens} tokens in one call, tokens/s, median of "
        f"{settings.prefill_repeats} after a warm-up, then over the rounds)",
        "",
        prefill_table(compare),
        "",
        f"### Memory update, load time and RSS (median over {settings.update_repeats} "
        "repeats, then over the rounds)",
        "",
        update_table(compare),
        "",
    ]


def decode_table(compare: Dict, settings: Settings) -> str:
    rows = []
    for name, by_threads in compare.items():
        for threads, record in by_threads.items():
            ours, theirs = record["llama2rnn"], record["llama.cpp"]
            rows.append(
                [
                    name,
                    str(threads),
                    str(decode_steps(settings, SHAPES[name])),
                    summarize_spread(ours, "decode_greedy"),
                    summarize_spread(theirs, "decode_greedy"),
                    fmt(summarize_ratio(record, "decode_greedy"), 2, "x"),
                    summarize_spread(ours, "decode_top_p"),
                    summarize_spread(theirs, "decode_top_p"),
                    fmt(summarize_ratio(record, "decode_top_p"), 2, "x"),
                ]
            )
    header = [
        "shape",
        "threads",
        "steps",
        "llama2rnn greedy",
        "llama.cpp greedy",
        "ratio",
        "llama2rnn top-p 0.9",
        "llama.cpp top-p 0.9",
        "ratio",
    ]
    return table(header, rows)


def position_table(compare: Dict, settings: Settings) -> str:
    max_steps = max(decode_steps(settings, SHAPES[name]) for name in compare)
    blocks = -(-max_steps // DECODE_BLOCK)
    header = ["shape", "threads", "engine"]
    for block in range(blocks):
        first, last = block * DECODE_BLOCK + 1, min((block + 1) * DECODE_BLOCK, max_steps)
        header.append(f"steps {first}-{last}")
    rows = []
    for name, by_threads in compare.items():
        for threads, record in by_threads.items():
            for engine in ("llama2rnn", "llama.cpp"):
                runs = [run for run in record[engine] if run and "decode_greedy_blocks" in run]
                if not runs:
                    continue
                row = [name, str(threads), engine]
                for block in range(blocks):
                    values = [
                        run["decode_greedy_blocks"][block]
                        for run in runs
                        if block < len(run["decode_greedy_blocks"])
                    ]
                    row.append(fmt(median(values) if values else None, 0))
                rows.append(row)
    return table(header, rows)


def prefill_table(compare: Dict) -> str:
    rows = []
    for name, by_threads in compare.items():
        macs = matrix_macs(SHAPES[name])["prefill_per_token"]
        for threads, record in by_threads.items():
            ours, theirs = record["llama2rnn"], record["llama.cpp"]
            prefill = summarize(ours, "prefill")
            greedy = summarize(ours, "decode_greedy")
            rows.append(
                [
                    name,
                    str(threads),
                    summarize_spread(ours, "prefill"),
                    summarize_spread(theirs, "prefill"),
                    fmt(summarize_ratio(record, "prefill"), 2, "x"),
                    fmt(prefill / greedy if prefill and greedy else None, 1, "x"),
                    fmt(prefill * macs / 1e9 if prefill else None, 1),
                ]
            )
    header = [
        "shape",
        "threads",
        "llama2rnn prefill",
        "llama.cpp prompt processing",
        "ratio",
        "llama2rnn prefill / greedy decode",
        "llama2rnn prefill GMAC/s",
    ]
    return table(header, rows)


def update_table(compare: Dict) -> str:
    rows = []
    for name, by_threads in compare.items():
        macs = matrix_macs(SHAPES[name])["memory_update"]
        for threads, record in by_threads.items():
            ours, theirs = record["llama2rnn"], record["llama.cpp"]
            update_ms = summarize(ours, "update_ms")
            rows.append(
                [
                    name,
                    str(threads),
                    fmt(summarize(ours, "step_ms"), 2),
                    fmt(summarize(ours, "completing_step_ms"), 2),
                    fmt(update_ms, 2),
                    fmt(macs / update_ms / 1e6 if update_ms else None, 1),
                    fmt(summarize(ours, "load_s"), 3),
                    fmt(summarize(theirs, "load_s"), 3),
                    fmt(summarize(ours, "peak_rss_mib")),
                    fmt(summarize(ours, "rss_before_mib")),
                    fmt(summarize(theirs, "peak_rss_mib")),
                    fmt(summarize(theirs, "rss_before_mib")),
                ]
            )
    header = [
        "shape",
        "threads",
        "step at chunk pos M-2 (ms)",
        "step at M-1 (ms)",
        "memory update (ms)",
        "update GMAC/s",
        "llama2rnn load (s)",
        "llama.cpp load (s)",
        "llama2rnn peak RSS (MiB)",
        "before load",
        "llama.cpp peak RSS (MiB)",
        "before load",
    ]
    return table(header, rows)


def report_busy(busy: Dict) -> List[str]:
    rows = []
    for name, by_threads in busy.items():
        single, dual = by_threads.get(1), by_threads.get(2)
        for engine in ("llama2rnn", "llama.cpp"):
            if not single or not single[engine]:
                continue
            rate1 = summarize(single[engine], "decode_greedy")
            rate2 = summarize(dual[engine], "decode_greedy") if dual else None
            speedup = rate2 / rate1 if rate1 and rate2 else None
            # Rounds alternate 1 and 2 threads, so round i of each forms a pair.
            pairs = [
                ratio(dual_run, single_run, "decode_greedy")
                for single_run, dual_run in zip(single[engine], dual[engine] if dual else [])
            ]
            pairs = [r for r in pairs if r is not None]
            spread = f"{min(pairs):.2f}-{max(pairs):.2f}x" if pairs else "n/a"
            rows.append([name, engine, fmt(rate1), fmt(rate2), fmt(speedup, 2, "x"), spread])
    header = ["shape", "engine", "1 thread", "2 threads", "2 threads / 1 thread", "per round"]
    return [
        "### Decode with one core kept busy by another process (greedy, tokens/s; medians, "
        "and the ratio of each round's pair)",
        "",
        table(header, rows),
        "",
    ]


def roof_rows(roof: Dict, compare: Dict, files: ModelFiles, settings: Settings) -> List[List[str]]:
    """Return one row per thread count: roofs and measured rates of both engines."""
    shape = files.shape
    ours = decode_bytes_per_token(shape, files.group_size)
    ours_total = ours["total"]
    steps = decode_steps(settings, shape)
    cpp_total = llama_cpp_bytes_per_token(shape, PROMPT_LENGTH + steps / 2)["total"]
    rows = []
    for threads, record in compare.get(shape.name, {}).items():
        bandwidth = roof.get(threads)
        if bandwidth is None:
            continue
        roof_rate = bandwidth["gb_per_s"] * 1e9 / ours_total
        cpp_roof = bandwidth["gb_per_s"] * 1e9 / cpp_total
        rate = summarize(record["llama2rnn"], "decode_greedy")
        step_ms = summarize(record["llama2rnn"], "step_ms")
        step_rate = 1000 / step_ms if step_ms else None
        cpp_rate = summarize(record["llama.cpp"], "decode_greedy")
        update_ms = summarize(record["llama2rnn"], "update_ms")
        needed = forward_rate_needed(ours, roof_rate, update_ms, shape.mem_len)
        rows.append(
            [
                str(threads),
                fmt(roof_rate),
                fmt(rate),
                fmt(100 * rate / roof_rate if rate else None, 0, "%"),
                fmt(step_rate),
                fmt(100 * step_rate / roof_rate if step_rate else None, 0, "%"),
                fmt(update_ms / shape.mem_len if update_ms else None, 3),
                fmt(needed, 1),
                fmt(100 * needed / bandwidth["gb_per_s"] if needed else None, 0, "%"),
                fmt(cpp_roof),
                fmt(cpp_rate),
                fmt(100 * cpp_rate / cpp_roof if cpp_rate else None, 0, "%"),
            ]
        )
    return rows


def forward_rate_needed(
    bytes_per_token: Dict[str, float], roof_rate: float, update_ms: Optional[float], m: int
) -> Optional[float]:
    """Return the read rate in GB/s that the forward steps need for decode at 90% of the roof.

    The memory update's arithmetic takes `update_ms / M` of every token's time. The forward
    step gets the rest of the time that 90% of the roof allows, and must read the weights
    and the key/value window in it.
    """
    if not update_ms:
        return None
    left_s = 1 / (0.9 * roof_rate) - update_ms / 1000 / m
    if left_s <= 0:
        return float("inf")
    return (bytes_per_token["weights"] + bytes_per_token["kv"]) / left_s / 1e9


def report_roof(
    roof: Dict, compare: Dict, models: Dict[str, ModelFiles], settings: Settings
) -> List[str]:
    lines = ["### Read bandwidth and the 110M decode roof", ""]
    bandwidth_rows = [
        [
            str(threads),
            fmt(result["gb_per_s"], 2),
            ", ".join(fmt(value, 2) for value in result["passes_gb_per_s"]),
            result["method"],
        ]
        for threads, result in roof.items()
    ]
    header = ["threads", "read bandwidth (GB/s)", "all passes", "best reduction"]
    lines += [table(header, bandwidth_rows), ""]
    if "110M" not in models:
        return lines + ["The 110M shape was not selected, so no roof is computed.", ""]

    files = models["110M"]
    ours = decode_bytes_per_token(files.shape, files.group_size)
    steps = decode_steps(settings, files.shape)
    cpp = llama_cpp_bytes_per_token(files.shape, PROMPT_LENGTH + steps / 2)
    lines += [
        f"llama2rnn bytes per 110M decode token: weights {ours['weights'] / 1e6:.1f} MB, "
        f"key/value window {ours['kv'] / 1e6:.1f} MB, memory update (amortized over M) "
        f"{ours['memory_update'] / 1e6:.2f} MB, total {ours['total'] / 1e6:.1f} MB. "
        f"llama.cpp: weights {cpp['weights'] / 1e6:.1f} MB, fp16 key/value cache at the "
        f"average context of the decode run {cpp['kv'] / 1e6:.1f} MB. The forward-only rate "
        "is 1 / (the step at chunk position M-2), a step without a memory update. Each "
        "token also pays its share of a memory update's arithmetic (update per token). "
        "\"Read rate for 90%\" is the rate at which the forward steps would have to read "
        "the weights and the window in the time per token left at 90% of the roof.",
        "",
    ]
    header = [
        "threads",
        "llama2rnn roof (tokens/s)",
        "llama2rnn greedy",
        "of roof",
        "llama2rnn forward only",
        "of roof",
        "update per token (ms)",
        "read rate for 90% (GB/s)",
        "of bandwidth",
        "llama.cpp roof",
        "llama.cpp greedy",
        "of roof",
    ]
    lines += [table(header, roof_rows(roof, compare, files, settings)), ""]
    return lines


def report_load(load: Dict) -> List[str]:
    rows = [
        [str(t), str(len(times)), fmt(median(times), 3), fmt(min(times) if times else None, 3)]
        for t, times in load.items()
    ]
    return [
        "### Engine construction on the 110M checkpoint (warm page cache, fresh processes)",
        "",
        table(["threads", "processes", "median (s)", "min (s)"], rows),
        "",
    ]


def report_long(long: Optional[Dict]) -> List[str]:
    if not long:
        return ["### Long run: failed, see stderr", ""]
    rows = [
        [
            f"{row['tokens']:,}",
            fmt(row["window_tokens_per_s"]),
            fmt(row["average_tokens_per_s"]),
            fmt(row["rss_mib"]),
            fmt(row["peak_rss_mib"]),
            fmt(row["elapsed_s"], 0),
        ]
        for row in long["rows"]
    ]
    return [
        f"### Long run (toy20M, 1 thread, greedy; rate over the last {LONG_WINDOW:,} tokens)",
        "",
        table(
            [
                "tokens",
                "tokens/s (window)",
                "tokens/s (average)",
                "RSS (MiB)",
                "peak RSS (MiB)",
                "elapsed (s)",
            ],
            rows,
        ),
        "",
    ]


def verdict(met: Optional[bool]) -> str:
    if met is None:
        return "n/a"
    return "met" if met else "not met"


def report_targets(results: Dict, models: Dict[str, ModelFiles]) -> List[str]:
    rows: List[List[str]] = []
    compare = results.get("compare", {})
    for threads, record in compare.get("toy20M", {}).items():
        r = summarize_ratio(record, "decode_greedy")
        rows.append(
            [
                f"toy20M decode >= 1.5x llama.cpp, {threads}t",
                fmt(r, 2, "x"),
                verdict(None if r is None else r >= 1.5),
            ]
        )
    roof = results.get("roof", {})
    if "110M" in models:
        total = decode_bytes_per_token(models["110M"].shape, models["110M"].group_size)["total"]
        for threads, record in compare.get("110M", {}).items():
            rate = summarize(record["llama2rnn"], "decode_greedy")
            if roof.get(threads) and rate:
                share = rate / (roof[threads]["gb_per_s"] * 1e9 / total)
                rows.append(
                    [
                        f"110M decode >= 90% of roof, {threads}t",
                        fmt(100 * share, 0, "%"),
                        verdict(share >= 0.9),
                    ]
                )
    limits = {"toy20M": 5.0, "110M": 60.0}
    for name, by_threads in compare.items():
        for threads, record in by_threads.items():
            update = summarize(record["llama2rnn"], "update_ms")
            rows.append(
                [
                    f"{name} memory update <= {limits[name]:.0f} ms, {threads}t",
                    fmt(update, 2, " ms"),
                    verdict(None if update is None else update <= limits[name]),
                ]
            )
            prefill = summarize(record["llama2rnn"], "prefill")
            greedy = summarize(record["llama2rnn"], "decode_greedy")
            if prefill and greedy:
                rows.append(
                    [
                        f"{name} prefill >= 10x decode, {threads}t",
                        fmt(prefill / greedy, 1, "x"),
                        verdict(prefill / greedy >= 10),
                    ]
                )
            r = summarize_ratio(record, "prefill")
            rows.append(
                [
                    f"{name} prefill >= 1.5x llama.cpp prompt processing, {threads}t",
                    fmt(r, 2, "x"),
                    verdict(None if r is None else r >= 1.5),
                ]
            )
    for name, by_threads in results.get("busy", {}).items():
        if 1 in by_threads and 2 in by_threads:
            rate1 = summarize(by_threads[1]["llama2rnn"], "decode_greedy")
            rate2 = summarize(by_threads[2]["llama2rnn"], "decode_greedy")
            if rate1 and rate2:
                rows.append(
                    [
                        f"{name} busy core: 2t decode >= 1t decode",
                        fmt(rate2 / rate1, 2, "x"),
                        verdict(rate2 >= rate1),
                    ]
                )
    long = results.get("long")
    if long and len(long["rows"]) >= 2:
        first, last = long["rows"][0], long["rows"][-1]
        rate_change = last["window_tokens_per_s"] / first["window_tokens_per_s"] - 1
        rss_change = last["rss_mib"] / first["rss_mib"] - 1
        rows.append(
            [
                f"tokens/s at {last['tokens']:,} within 5% of {first['tokens']:,}",
                fmt(100 * rate_change, 1, "%"),
                verdict(abs(rate_change) <= 0.05),
            ]
        )
        rows.append(
            [
                f"RSS at {last['tokens']:,} within 5% of {first['tokens']:,}",
                fmt(100 * rss_change, 1, "%"),
                verdict(abs(rss_change) <= 0.05),
            ]
        )
    return ["### Targets", "", table(["target", "measured", "verdict"], rows), ""]


def first_llama_cpp_result(results: Dict) -> Optional[Dict]:
    for section in ("compare", "busy"):
        for by_threads in results.get(section, {}).values():
            for record in by_threads.values():
                for run in record["llama.cpp"]:
                    if run:
                        return run
    return None


def extension_build() -> str:
    """Describe the llama2rnn extension module being measured: file, build time, digest."""
    import hashlib

    from llama2rnn import _llama2rnn

    path = Path(_llama2rnn.__file__)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    built = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime))
    return f"{path.name} built {built}, sha256 {digest}"


def kernel_path(name: str) -> str:
    """Return the kernel path the workers run: `name`, or the detected one for "auto"."""
    from llama2rnn import _llama2rnn

    if name == "auto":
        return _llama2rnn.detected_kernel()
    if name not in _llama2rnn.supported_kernels():
        supported = ", ".join(_llama2rnn.supported_kernels())
        raise SystemExit(
            f"kernel path {name!r} is not supported on this CPU: use auto or {supported}"
        )
    return name


def git_commit() -> str:
    try:
        completed = subprocess.run(
            ["git", "-C", str(SCRIPT.parent), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return completed.stdout.strip()


def machine_summary() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in lscpu.splitlines())
        )
        cpu = (
            f"{fields.get('Model name', '?')} (family {fields.get('CPU family', '?')}, model "
            f"{fields.get('Model', '?')}), {fields.get('CPU(s)', '?')} CPUs, L3 "
            f"{fields.get('L3 cache', '?')}"
        )
    except (OSError, subprocess.CalledProcessError):
        cpu = platform.processor() or platform.machine()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {memory_gib:.0f} GiB RAM, Python {platform.python_version()}"


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shapes", default="toy20M,110M", help="comma-separated shapes: toy20M, 110M"
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per row")

    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help="decode steps per measurement (default: 1024 for toy20M, 512 for 110M)",
    )
    parser.add_argument("--prefill-tokens", type=int, default=1024, help="prefill length")
    parser.add_argument("--prefill-repeats", type=int, default=3, help="timed prefills")
    parser.add_argument("--update-repeats", type=int, default=10, help="memory update repeats")
    parser.add_argument("--busy-rounds", type=int, default=2, help="rounds in the busy section")
    parser.add_argument("--load-repeats", type=int, default=5, help="processes in load section")
    parser.add_argument(
        "--roof-repeats", type=int, default=3, help="bandwidth passes per thread count"
    )

    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections out of {','.join(ALL_SECTIONS)}",
    )
    parser.add_argument("--long", action="store_true", help="add the long run section")
    parser.add_argument(
        "--long-max", type=int, default=10**5, help="tokens decoded in the long run"
    )

    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 round, 128 decode steps, 256 prefill tokens, few repeats",
    )
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    parser.add_argument(
        "--kernel",
        default="auto",
        help="llama2rnn kernel path (see llama2rnn.supported_kernels(); default: detected)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder for the model files, reused across runs (default: a temporary folder)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    shapes = [name for name in args.shapes.split(",") if name]
    for name in shapes:
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}: use one of {', '.join(SHAPES)}")
    sections = [name for name in args.sections.split(",") if name]
    for name in sections:
        if name not in ALL_SECTIONS:
            raise SystemExit(f"unknown section {name!r}: use one of {', '.join(ALL_SECTIONS)}")
    if args.long and "long" not in sections:
        sections.append("long")
    settings = Settings(
        shapes=shapes,
        threads=[int(t) for t in args.threads.split(",") if t],
        rounds=args.rounds,
        decode_tokens=args.decode_tokens,
        prefill_tokens=args.prefill_tokens,
        prefill_repeats=args.prefill_repeats,
        update_repeats=args.update_repeats,
        busy_rounds=args.busy_rounds,
        load_repeats=args.load_repeats,
        roof_repeats=args.roof_repeats,
        long_max=args.long_max,
        sections=sections,
        kernel=args.kernel,
    )
    if args.quick:
        settings.rounds = 1
        settings.decode_tokens = settings.decode_tokens or 128
        settings.prefill_tokens = 256
        settings.prefill_repeats = 1
        settings.update_repeats = 3
        settings.busy_rounds = 1
        settings.load_repeats = 2
        settings.roof_repeats = 1
    return settings


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return
    settings = settings_from_args(args)
    missing = "--no-llama-cpp was given" if args.no_llama_cpp else llama_cpp_status()
    with_cpp = missing is None
    if not with_cpp:
        log(f"skipping llama.cpp: {missing}")

    results: Dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_summary(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "llama_cpp": llama_cpp_version() if with_cpp else f"skipped: {missing}",
        "extension": extension_build(),
        "kernel": kernel_path(settings.kernel),
        "commit": git_commit(),
        "settings": asdict(settings),
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.dir if args.dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        needed = set(settings.shapes)
        if "long" in settings.sections:
            needed.add("toy20M")
        if "load" in settings.sections:
            needed.add("110M")
        models = {
            name: write_models(SHAPES[name], folder, with_cpp) for name in SHAPES if name in needed
        }
        selected = {name: models[name] for name in settings.shapes}
        if "compare" in settings.sections:
            results["compare"] = section_compare(selected, settings, with_cpp)
        if "busy" in settings.sections:
            results["busy"] = section_busy(selected, settings, with_cpp)
        if "roof" in settings.sections:
            results["roof"] = section_roof(settings)
        if "load" in settings.sections:
            results["load"] = section_load(models["110M"], settings)
        if "long" in settings.sections:
            results["long"] = section_long(models["toy20M"], settings)

    lines = [
        f"Date: {results['date']}. Machine: {results['machine']}.",
        f"llama-cpp-python: {results['llama_cpp']}. Command: `{results['command']}`.",
        f"llama2rnn: {results['extension']}, kernel path {results['kernel']}; repository at "
        f"{results['commit']}.",
        "",
    ]
    cpp_info = first_llama_cpp_result(results)
    if cpp_info:
        lines += [
            f"llama.cpp system info: `{cpp_info['system_info']}`. Context {LLAMA_CPP_CONTEXT}, "
            f"n_batch = n_ubatch = {LLAMA_CPP_BATCH}, flash_attn_type "
            f"{cpp_info['flash_attn_type']} (the default), fp16 key/value cache.",
            "",
        ]
    if not LLAMA_CPP_OPTIONS["extra_buffers"]:
        lines += [
            "A llama.cpp worker crashed with llama.cpp's extra buffer types, so "
            "llama.cpp ran with `use_extra_bufts = false` (no AMX or repacked-weight kernels).",
            "",
        ]
    if "compare" in results:
        lines += report_compare(results["compare"], settings)
    if "busy" in results:
        lines += report_busy(results["busy"])
    if "roof" in results:
        lines += report_roof(results["roof"], results.get("compare", {}), selected, settings)
    if "load" in results:
        lines += report_load(results["load"])
    if "long" in results:
        lines += report_long(results["long"])
    lines += report_targets(results, selected)
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
