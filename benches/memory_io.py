"""Time saving and loading memory files of a toy20M-shaped model, and report their sizes.

The model has random weights (dim 288, hidden_dim 768, 6 layers, 6 heads, vocab 32000,
M 128, seq_len 256), written in the llama2rnn format to a temporary folder. For a few
chunk positions the script measures the median of `--repeats` runs of:

- encode: `engine.save_state()`, the state as memory-file bytes;
- save: `Model.save_memory`, encoding plus the durable write (temporary file, fsync,
  rename, fsync of the folder) and the writer lock;
- load: `Model.load_memory(attach=False)`, reading the file and restoring the state.

Usage: python benches/memory_io.py [--dir FOLDER] [--repeats N]

Save times depend on the file system of `--dir` (default: a temporary folder), since fsync
costs little on tmpfs and much more on a disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from llama2rnn import Model, checkpoint

CONFIG = checkpoint.Config(
    dim=288,
    hidden_dim=768,
    n_layers=6,
    n_heads=6,
    n_kv_heads=6,
    vocab_size=32000,
    seq_len=256,
    mem_len=128,
)
# Positions to measure: the start, then chunk positions 1, M/2 and M-1 after one chunk.
POSITIONS = (0, CONFIG.mem_len + 1, CONFIG.mem_len + CONFIG.mem_len // 2, 2 * CONFIG.mem_len - 1)


def median_ms(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def file_system(folder: Path) -> str:
    try:
        result = subprocess.run(
            ["df", "--output=fstype", str(folder)], capture_output=True, text=True, check=True
        )
        return result.stdout.split()[-1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="folder for the memory files")
    parser.add_argument("--repeats", type=int, default=20, help="runs per measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.dir if args.dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        model_path = Path(scratch) / "toy20m.bin"
        checkpoint.write_llama2rnn(model_path, CONFIG, checkpoint.random_weights(CONFIG, seed=0))
        model = Model.load(model_path, threads=1)
        reader = Model.load(model_path, threads=1)
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{folder} on {file_system(folder)}, median of {args.repeats} runs, 1 thread"
        )
        columns = ("position", "chunk pos", "size", "encode", "save", "load")
        widths = (8, 9, 10, 9, 9, 9)
        print("  ".join(f"{name:>{width}}" for name, width in zip(columns, widths)))
        tokens = [(7 * i) % CONFIG.vocab_size for i in range(max(POSITIONS))]
        for position in POSITIONS:
            model.feed(tokens[model.position : position])
            memory_path = folder / f"bench-{position}.mem"
            memory = str(memory_path)
            encode = median_ms(model.engine.save_state, args.repeats)
            save = median_ms(lambda: model.save_memory(memory, overwrite=True), args.repeats)
            load = median_ms(lambda: reader.load_memory(memory, attach=False), args.repeats)
            size = memory_path.stat().st_size
            assert reader.position == position
            print(
                f"{position:>8}  {position % CONFIG.mem_len:>9}  {size / 2**20:>6.2f} MiB  "
                f"{encode:>6.2f} ms  {save:>6.2f} ms  {load:>6.2f} ms"
            )
            memory_path.unlink()


if __name__ == "__main__":
    main()
