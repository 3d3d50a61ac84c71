"""The built-in model ships with the package and works with no arguments."""

from __future__ import annotations

import os
import subprocess
import sys

from llama2rnn import Model
from llama2rnn.model import DEFAULT_CHECKPOINT


def test_default_model_loads_without_arguments():
    model = Model.load(threads=1)
    assert model.format == "llama2rnn"
    assert model.config.mem_len == 32
    assert model.tokenizer.vocab_size == model.config.vocab_size == 2048


def test_default_model_chats_repeatably():
    first = Model.load(threads=1).chat("Hi! How are you doing today?", seed=3, max_tokens=40)
    second = Model.load(threads=1).chat("Hi! How are you doing today?", seed=3, max_tokens=40)
    assert isinstance(first, str)
    assert first == second


def test_chat_command_uses_default_model(tmp_path):
    env = {**os.environ, "LLAMA2RNN_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "llama2rnn", "chat", "--seed", "1", "--max-tokens", "30"],
        input="hello there\nwhat are you up to?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "memories" / "default.mem").is_file()
    assert DEFAULT_CHECKPOINT.is_file()
