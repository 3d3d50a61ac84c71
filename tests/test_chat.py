"""The chat template, `Model.chat`, and the `llama2rnn chat` and `llama2rnn read` commands.

The models are small random memory checkpoints (mem_len 8, so turns cross chunks) whose
vocab_size matches the 2000-piece chitchat tokenizer from conftest.py, with tokenizer.bin
next to them. Two of them are rigged so that one token wins every sampling step: EOS (every
answer is empty) or the piece "▁hello" (no answer ever ends by itself). Those two make token
counts exact. The commands run as subprocesses with LLAMA2RNN_HOME in a temporary folder,
the interactive ones in a pseudo-terminal through pexpect.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reference import checkpoint

import llama2rnn
from llama2rnn import Model
from llama2rnn import chat as chat_template
from llama2rnn import memory as memory_store

pexpect = pytest.importorskip("pexpect")

Config = checkpoint.Config

SYSTEM = "You are a patient assistant who answers in short, friendly sentences."
# The piece that the rigged "never EOS" model always samples.
HELLO_PIECE = "\u2581hello"
# Timestamped prompt of the terminal chat, for example "(2024-05-01 09:30:00) User:".
PROMPT = r"\(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\) User:"
MEMORY_LINE = r"([\d,]+) tokens consumed"
# Seconds that one CLI run or one pexpect step may take on a busy machine.
TIMEOUT = 30


# ---------------------------------------------------------------------------------------------
# Models and helpers


@pytest.fixture(autouse=True)
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data folder for every test (child processes inherit it)."""
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMA2RNN_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tokenizer(chitchat_tokenizer):
    return llama2rnn.load_tokenizer(chitchat_tokenizer.bin_path)


@pytest.fixture(scope="module")
def config(tokenizer) -> Config:
    return Config(
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=tokenizer.vocab_size,
        seq_len=16,
        mem_len=8,
    )


def write_model_dir(folder: Path, config: Config, weights, tokenizer_bin: Path) -> Path:
    """Write `model.bin` with `tokenizer.bin` next to it, and return the checkpoint path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.bin"
    if config.mem_len:
        checkpoint.write_llama2rnn(path, config, weights)
    else:
        checkpoint.write_llama2c_v2(path, config, weights)
    shutil.copy(tokenizer_bin, folder / "tokenizer.bin")
    return path


def rigged_weights(config: Config, token: int, seed: int):
    """Return random weights whose logits favour `token` by about 50 over every other token,
    whatever the input. Nucleus sampling with top_p below 1 then keeps only `token`, and at
    top_p 1 every other token together has a probability of roughly 1e-18.

    With wo and w2 zero the residual stream stays the token's embedding, whose component 0
    is 4 for every token and dominates its RMS norm. The classifier reads only that
    component, and only for `token`.
    """
    weights = checkpoint.random_weights(config, seed=seed, shared_classifier=False)
    weights["wo"][:] = 0.0
    weights["w2"][:] = 0.0
    weights["embedding"][:, 0] = 4.0
    weights["rms_final"][:] = 1.0
    weights["wcls"][:] = 0.0
    weights["wcls"][token, 0] = 10.0
    return weights


@pytest.fixture(scope="module")
def random_model(tmp_path_factory, config, chitchat_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("random_model")
    weights = checkpoint.random_weights(config, seed=1)
    return write_model_dir(folder, config, weights, chitchat_tokenizer.bin_path)


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory, config, tokenizer, chitchat_tokenizer) -> Path:
    """A memory model that answers EOS first, every time."""
    folder = tmp_path_factory.mktemp("eos_model")
    weights = rigged_weights(config, tokenizer.eos_id, seed=2)
    return write_model_dir(folder, config, weights, chitchat_tokenizer.bin_path)


@pytest.fixture(scope="module")
def hello_model(tmp_path_factory, config, tokenizer, chitchat_tokenizer) -> Path:
    """A memory model that answers "hello hello ..." and never samples EOS."""
    hello = tokenizer.piece_to_id(HELLO_PIECE)
    assert hello != tokenizer.unk_id, "the chitchat tokenizer has no piece for 'hello'"
    folder = tmp_path_factory.mktemp("hello_model")
    weights = rigged_weights(config, hello, seed=3)
    return write_model_dir(folder, config, weights, chitchat_tokenizer.bin_path)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory, config, chitchat_tokenizer) -> Path:
    """A llama2.c model without memory and a 32-token context, which a chat fills quickly."""
    plain = Config(**{**config.__dict__, "seq_len": 32, "mem_len": 0})
    folder = tmp_path_factory.mktemp("plain_model")
    weights = checkpoint.random_weights(plain, seed=4)
    return write_model_dir(folder, plain, weights, chitchat_tokenizer.bin_path)


def load(path: Path) -> Model:
    return Model.load(path, threads=1)


def turn_length(tokenizer, message: str, system: str | None = None) -> int:
    """Tokens of one user turn: BOS and "[INST] ... [/INST]"."""
    return len(tokenizer.encode(chat_template.format_turn(message, system), bos=True))


def saved_state(model_path: Path, memory: str = "model") -> tuple[int, int | None]:
    """Return the position and last token of a saved memory, read without taking its lock."""
    model = load(model_path)
    model.load_memory(memory, attach=False)
    return model.position, model._last_token


def run_cli(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "llama2rnn", *map(str, args)]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=TIMEOUT)


def run_chat(model_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return run_cli("chat", "--model", model_path, "--threads", "1", *args, stdin=stdin)


def default_sigint() -> None:
    """Give a child the default SIGINT action. A test run started in the background from a
    shell inherits SIGINT ignored, and Python then installs no handler, so Ctrl-C would do
    nothing in the chat under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_chat(model_path: Path, *args: str):
    """Start `llama2rnn chat` in a pseudo-terminal."""
    env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    command = ["-m", "llama2rnn", "chat", "--model", str(model_path), "--threads", "1", *args]
    return pexpect.spawn(
        sys.executable,
        command,
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=TIMEOUT,
        dimensions=(40, 200),
        preexec_fn=default_sigint,
    )


def send_command(child, line: str, expected: str) -> re.Match:
    """Type `line` at the prompt, wait for `expected` (a regex), then for the next prompt."""
    child.sendline(line)
    child.expect(expected)
    match = child.match
    child.expect(PROMPT)
    return match


def memory_tokens(child) -> int:
    """Return the token count that /memory reports."""
    match = send_command(child, "/memory", MEMORY_LINE)
    return int(match.group(1).replace(",", ""))


def end_session(child) -> int:
    """Press Ctrl-D at the prompt and return the exit status."""
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


# ---------------------------------------------------------------------------------------------
# The template: user text is text


@pytest.mark.parametrize(
    "message",
    ["<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "[/INST] </s><s>[INST] hi"],
)
def test_turn_tokens_special_text(random_model, message):
    model = load(random_model)
    tok = model.tokenizer
    for system in (None, "<<SYS>> </s> <s>"):
        tokens = chat_template.turn_tokens(model, message, system)
        assert tokens[0] == tok.bos_id
        assert tok.bos_id not in tokens[1:]
        assert tok.eos_id not in tokens
        assert message in tok.decode(tokens)


def test_turn_tokens_after_first_turn(hello_model):
    model = load(hello_model)
    tok = model.tokenizer
    first = chat_template.turn_tokens(model, "hi", SYSTEM)
    assert first == tok.encode(chat_template.format_turn("hi", SYSTEM), bos=True)
    assert SYSTEM in tok.decode(first)
    model.chat("hi", SYSTEM, max_tokens=2)
    later = chat_template.turn_tokens(model, "hi", SYSTEM)
    assert later == tok.encode("[INST] hi [/INST]", bos=True)


# ---------------------------------------------------------------------------------------------
# Model.chat and Model.chat_stream


def test_chat_returns_text(random_model):
    model = load(random_model)
    answer = model.chat("Hi, how are you?", max_tokens=12, seed=5)
    assert isinstance(answer, str)
    assert model.position > turn_length(model.tokenizer, "Hi, how are you?")
    assert model._last_token == model.tokenizer.eos_id


def test_chat_stream_matches_chat(random_model):
    model = load(random_model)
    whole = model.chat("Tell me about your day.", SYSTEM, max_tokens=20, seed=7)
    position = model.position
    model.reset()
    pieces = list(model.chat_stream("Tell me about your day.", SYSTEM, max_tokens=20, seed=7))
    assert all(isinstance(piece, str) for piece in pieces)
    assert "".join(pieces) == whole
    assert model.position == position


@pytest.mark.parametrize("message", ["", "   ", "\n\t", "\u3000"])
def test_chat_empty_message_raises(random_model, message):
    model = load(random_model)
    model.chat("hello", max_tokens=3, seed=1)
    position = model.position
    with pytest.raises(ValueError, match="the message is empty"):
        model.chat(message)
    with pytest.raises(ValueError, match="the message is empty"):
        model.chat_stream(message)
    assert model.position == position


def test_chat_max_tokens_zero_raises(random_model):
    model = load(random_model)
    with pytest.raises(ValueError, match="max_tokens 0 is invalid"):
        model.chat("hello", max_tokens=0)
    assert model.position == 0


def test_chat_system_prompt_first_turn_only(hello_model):
    model = load(hello_model)
    tok = model.tokenizer
    assert model.chat("hi", SYSTEM, max_tokens=3) == "hello hello hello"
    # An answer cut off by max_tokens is closed with EOS.
    first = turn_length(tok, "hi", SYSTEM) + 3 + 1
    assert model.position == first
    assert model._last_token == tok.eos_id
    model.chat("and now?", SYSTEM, max_tokens=3)
    assert model.position == first + turn_length(tok, "and now?") + 4


def test_chat_system_prompt_after_load_memory(hello_model):
    model = load(hello_model)
    tok = model.tokenizer
    model.save_memory("empty")
    model.chat("hi", SYSTEM, max_tokens=3)
    model.save_memory("talked")

    resumed = load(hello_model)
    resumed.load_memory("talked")
    start = resumed.position
    resumed.chat("again", SYSTEM, max_tokens=3)
    assert resumed.position == start + turn_length(tok, "again") + 4

    fresh = load(hello_model)
    fresh.load_memory("empty")
    fresh.chat("again", SYSTEM, max_tokens=3)
    assert fresh.position == turn_length(tok, "again", SYSTEM) + 4


def test_chat_answer_starting_with_eos(eos_model):
    model = load(eos_model)
    tok = model.tokenizer
    assert model.chat("hi", max_tokens=5) == ""
    assert model.position == turn_length(tok, "hi") + 1
    assert model._last_token == tok.eos_id
    assert list(model.chat_stream("still there?", max_tokens=5)) == []
    assert model.position == turn_length(tok, "hi") + turn_length(tok, "still there?") + 2


# ---------------------------------------------------------------------------------------------
# The terminal loop, in process


def chat_namespace(**overrides) -> argparse.Namespace:
    values = dict(system=None, max_tokens=4, temperature=0.8, top_p=0.9, seed=1)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_ctrl_c_while_turn_is_fed(hello_model, monkeypatch, capsys):
    from llama2rnn import chat_terminal
    from llama2rnn.chat_cli import Chat

    model = load(hello_model)
    model.open_memory("model")
    chat = Chat(model, chat_namespace())
    feed = model.feed
    interrupted = []

    def feed_then_interrupt(tokens):
        feed(tokens)
        if not interrupted:
            interrupted.append(tokens)
            raise KeyboardInterrupt

    monkeypatch.setattr(model, "feed", feed_then_interrupt)
    try:
        chat_terminal.answer(chat, "a long pasted message")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while the turn was fed escaped from answer()")
    finally:
        model.close_memory()

    assert "[answer stopped]" in capsys.readouterr().out
    tok = model.tokenizer
    # The user's turn went in, the answer was stopped before its first token, and the
    # turn was closed with EOS and saved.
    expected = turn_length(tok, "a long pasted message") + 1
    assert model.position == expected
    assert saved_state(hello_model) == (expected, tok.eos_id)


# ---------------------------------------------------------------------------------------------
# The terminal chat, in a pseudo-terminal


def test_terminal_session_commands(random_model, tmp_path, data_home):
    tok = llama2rnn.load_tokenizer(random_model.parent / "tokenizer.bin")
    document = tmp_path / "notes.txt"
    document.write_text("We met at the station and talked about trains. " * 30)
    child = spawn_chat(random_model, "--system", SYSTEM, "--max-tokens", "4", "--seed", "1")
    child.expect(r"llama2rnn chat: 0 tokens consumed")
    child.expect(PROMPT)

    child.sendline("hello there")
    child.expect("Assistant: ")
    child.expect(PROMPT)
    after_turn = memory_tokens(child)
    assert turn_length(tok, "hello there", SYSTEM) < after_turn
    assert after_turn <= turn_length(tok, "hello there", SYSTEM) + 5

    # Blank lines re-prompt without a model call.
    for blank in ("", "   "):
        child.sendline(blank)
        assert memory_tokens(child) == after_turn

    # Ctrl-C at the prompt asks again instead of quitting.
    child.sendintr()
    child.expect(r"\(Ctrl-D or /exit saves and quits\)")
    child.expect(PROMPT)
    assert memory_tokens(child) == after_turn

    send_command(child, "/help", r"/reset +forget everything")
    send_command(child, "/save", rf"saved: {after_turn:,} tokens consumed")
    assert saved_state(random_model)[0] == after_turn
    send_command(child, "/bogus", r"unknown command /bogus")

    send_command(child, f"/read {document}", r"tokens in [\d.]+ s")
    after_read = after_turn + len(tok.encode(document.read_text(), bos=True, eos=True))
    assert memory_tokens(child) == after_read
    assert saved_state(random_model)[0] == after_read
    send_command(child, f"/read {tmp_path / 'missing.txt'}", r"error: .*missing\.txt")
    assert memory_tokens(child) == after_read

    child.sendline("/reset")
    child.expect(r"Forget the whole conversation in this memory\? \[y/N\]")
    child.sendline("n")
    child.expect(PROMPT)
    assert memory_tokens(child) == after_read
    child.sendline("/reset")
    child.expect(r"\[y/N\]")
    send_command(child, "y", r"the memory is back to the model's initial state")
    assert memory_tokens(child) == 0
    assert saved_state(random_model)[0] == 0

    assert end_session(child) == 0
    history = data_home / "chat_history"
    assert "hello there" in history.read_text()
    assert stat.S_IMODE(history.stat().st_mode) == 0o600


def test_terminal_ctrl_c_and_restart(hello_model):
    # A model that never samples EOS: a random one could end its answer before Ctrl-C lands.
    tok = llama2rnn.load_tokenizer(hello_model.parent / "tokenizer.bin")
    child = spawn_chat(hello_model, "--system", SYSTEM, "--max-tokens", "1000000")
    child.expect(PROMPT)
    child.sendline("tell me a very long story")
    child.expect("Assistant: ")
    child.expect(r"[^\r\n]{40}")  # the answer is streaming
    child.sendintr()
    child.expect(r"\[answer stopped\]")
    child.expect(PROMPT)
    stopped = memory_tokens(child)
    assert stopped > turn_length(tok, "tell me a very long story", SYSTEM) + 1
    assert saved_state(hello_model) == (stopped, tok.eos_id)
    send_command(child, "/save", rf"saved: {stopped:,} tokens consumed")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert saved_state(hello_model) == (stopped, tok.eos_id)

    # The next session continues the memory, and the system prompt is not sent again.
    child = spawn_chat(hello_model, "--system", SYSTEM, "--max-tokens", "1")
    child.expect(rf"llama2rnn chat: {stopped:,} tokens consumed")
    child.expect(PROMPT)
    child.sendline("are you still there?")
    child.expect("Assistant: ")
    child.expect(PROMPT)
    grown = memory_tokens(child) - stopped
    turn = turn_length(tok, "are you still there?")
    # One sampled token, then EOS unless the token was EOS.
    assert turn + 1 <= grown <= turn + 2
    assert end_session(child) == 0
    assert saved_state(hello_model) == (stopped + grown, tok.eos_id)


def test_terminal_eof_at_first_prompt(random_model):
    child = spawn_chat(random_model)
    child.expect(PROMPT)
    assert end_session(child) == 0
    assert saved_state(random_model) == (0, None)


def test_terminal_context_full_continues(plain_model):
    child = spawn_chat(plain_model, "--max-tokens", "8")
    child.expect(PROMPT)
    # About 20 tokens and an answer of at most 9 leave no room for a second such turn.
    message = "this message is long enough to fill a small context quickly"
    child.sendline(message)
    child.expect("Assistant: ")
    child.expect(PROMPT)
    child.sendline(message)
    child.expect(r"error: the prompt is \d+ tokens but this plain llama2\.c model has room")
    child.expect(r"/reset starts a new conversation")
    child.expect(PROMPT)
    child.sendline("/reset")
    child.expect(r"\[y/N\]")
    send_command(child, "y", r"back to the model's initial state")
    child.sendline("one more")
    child.expect("Assistant: ")
    child.expect(PROMPT)
    assert end_session(child) == 0


def test_locked_memory_names_holder(random_model, data_home):
    holder = subprocess.Popen(
        [sys.executable, "-m", "llama2rnn", "chat", "--model", str(random_model), "--threads", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        location = memory_store.locate("model")
        deadline = time.monotonic() + TIMEOUT
        while memory_store.lock_holder(location) is None:
            assert holder.poll() is None, holder.stderr.read().decode()
            assert time.monotonic() < deadline, "the first chat never took the lock"
            time.sleep(0.05)

        second = run_chat(random_model, stdin=b"hello\n")
        assert second.returncode == 1
        assert second.stdout == b""
        error = second.stderr.decode()
        assert "memory 'model' is in use by" in error
        assert f"process {holder.pid} (python -m llama2rnn chat --model" in error
    finally:
        holder.stdin.close()
        holder.wait(timeout=TIMEOUT)
    assert holder.returncode == 0


# ---------------------------------------------------------------------------------------------
# Piped chat: one turn per line


def test_piped_turns_and_blank_lines(hello_model):
    tok = llama2rnn.load_tokenizer(hello_model.parent / "tokenizer.bin")
    stdin = b"hi there\n\n   \n\t\r\n\r\nhow are you?\r\n"
    result = run_chat(hello_model, "--system", SYSTEM, "--max-tokens", "3", stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "hello hello hello\nhello hello hello\n"
    assert result.stderr == b""
    expected = turn_length(tok, "hi there", SYSTEM) + turn_length(tok, "how are you?") + 2 * 4
    assert saved_state(hello_model) == (expected, tok.eos_id)

    # Only blank lines: no model call, and the memory is unchanged.
    result = run_chat(hello_model, "--max-tokens", "3", stdin="\n \n\t\n\r\n\u3000\n".encode())
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    assert saved_state(hello_model) == (expected, tok.eos_id)

    # The next session continues without the system prompt.
    result = run_chat(hello_model, "--system", SYSTEM, "--max-tokens", "3", stdin=b"again\n")
    assert result.returncode == 0, result.stderr.decode()
    expected += turn_length(tok, "again") + 4
    assert saved_state(hello_model) == (expected, tok.eos_id)


def test_piped_eof_at_start(hello_model):
    tok = llama2rnn.load_tokenizer(hello_model.parent / "tokenizer.bin")
    result = run_chat(hello_model, "--system", SYSTEM, stdin=b"")
    assert result.returncode == 0
    assert result.stdout == b""
    assert result.stderr == b""
    assert saved_state(hello_model) == (0, None)
    # The saved memory is still fresh, so the next first turn carries the system prompt.
    result = run_chat(hello_model, "--system", SYSTEM, "--max-tokens", "2", stdin=b"hi\n")
    assert result.returncode == 0, result.stderr.decode()
    assert saved_state(hello_model) == (turn_length(tok, "hi", SYSTEM) + 3, tok.eos_id)


def test_piped_answer_starting_with_eos(eos_model):
    tok = llama2rnn.load_tokenizer(eos_model.parent / "tokenizer.bin")
    result = run_chat(eos_model, "--max-tokens", "50", stdin=b"hi\nhow are you?\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"\n\n"
    expected = turn_length(tok, "hi") + turn_length(tok, "how are you?") + 2
    assert saved_state(eos_model) == (expected, tok.eos_id)


def test_piped_long_lines(hello_model):
    tok = llama2rnn.load_tokenizer(hello_model.parent / "tokenizer.bin")
    # 1 MB in one line. The phrase is a single piece, so the line is about 24,000 tokens and
    # the prefill stays fast.
    phrase = "\u660e\u65e5\u306f\u96e8\u304c\u964d\u308b\u304b\u3082\u3057\u308c\u307e\u305b\u3093"
    paste = phrase * (1_000_000 // len(phrase.encode()) + 1)
    assert len(paste.encode()) > 1_000_000
    # A character outside the vocabulary takes three byte tokens, so the line is 33,000 tokens,
    # past the largest signed 16-bit count.
    rare = "\u9f98" * 11_000
    rare_tokens = turn_length(tok, rare)
    assert rare_tokens > 33_000
    stdin = (paste + "\n" + rare + "\n").encode()
    result = run_chat(hello_model, "--max-tokens", "2", stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "hello hello\nhello hello\n"
    expected = turn_length(tok, paste) + rare_tokens + 2 * 3
    assert saved_state(hello_model) == (expected, tok.eos_id)


def test_piped_invalid_utf8(hello_model):
    tok = llama2rnn.load_tokenizer(hello_model.parent / "tokenizer.bin")
    stdin = b"caf\xe9 \xff\xfe ok\nmore \xc3\n"
    result = run_chat(hello_model, "--max-tokens", "2", stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    error = result.stderr.decode()
    assert error.count("warning: invalid UTF-8 in the input was replaced by U+FFFD") == 1
    assert result.stdout.decode() == "hello hello\nhello hello\n"
    expected = turn_length(tok, "caf\ufffd \ufffd\ufffd ok") + turn_length(tok, "more \ufffd") + 6
    assert saved_state(hello_model) == (expected, tok.eos_id)


def test_piped_control_characters(hello_model):
    tok = llama2rnn.load_tokenizer(hello_model.parent / "tokenizer.bin")
    message = "a\x00b\x07c\x1b[31mred\x1b[0m\x7f\x08d\x0be\x0cf\x04g\x03h\rend"
    result = run_chat(hello_model, "--max-tokens", "2", stdin=(message + "\n").encode())
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "hello hello\n"
    assert saved_state(hello_model) == (turn_length(tok, message) + 3, tok.eos_id)


def test_piped_max_tokens_closes_turn(hello_model):
    tok = llama2rnn.load_tokenizer(hello_model.parent / "tokenizer.bin")
    result = run_chat(hello_model, "--max-tokens", "7", stdin=b"hi\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == " ".join(["hello"] * 7) + "\n"
    # Seven answer tokens, then the EOS that closes the turn.
    assert saved_state(hello_model) == (turn_length(tok, "hi") + 8, tok.eos_id)


def test_piped_interrupt_closes_turn(hello_model):
    tok = llama2rnn.load_tokenizer(hello_model.parent / "tokenizer.bin")
    chat = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama2rnn",
            "chat",
            "--model",
            str(hello_model),
            "--threads",
            "1",
            "--max-tokens",
            "1000000",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
    )
    try:
        chat.stdin.write(b"tell me a very long story\n")
        chat.stdin.flush()
        assert len(chat.stdout.read(40)) == 40  # the answer is streaming
        chat.send_signal(signal.SIGINT)
        chat.communicate(timeout=TIMEOUT)
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait()
    assert chat.returncode == 130
    position, last_token = saved_state(hello_model)
    assert position > turn_length(tok, "tell me a very long story") + 1
    assert last_token == tok.eos_id


def test_chat_max_tokens_zero_rejected(random_model):
    result = run_chat(random_model, "--max-tokens", "0", stdin=b"hi\n")
    assert result.returncode == 1
    assert "--max-tokens 0 is invalid: use 1 or more" in result.stderr.decode()


# ---------------------------------------------------------------------------------------------
# llama2rnn read


PROGRESS = r"notes\.txt: [\d,]+/[\d,]+ tokens, [\d,]+ tokens/s, \d+ s left"


def test_read_shows_progress(random_model, tmp_path):
    tok = llama2rnn.load_tokenizer(random_model.parent / "tokenizer.bin")
    notes = tmp_path / "notes.txt"
    notes.write_text("The train to the coast leaves at nine every morning. " * 120)
    more = tmp_path / "more.txt"
    more.write_text("Bring an umbrella, it may rain.\n")
    result = run_cli(
        "read", notes, more, "--model", random_model, "--threads", "1", "--memory", "docs"
    )
    assert result.returncode == 0, result.stderr.decode()
    error = result.stderr.decode()
    notes_tokens = len(tok.encode(notes.read_text(), bos=True, eos=True))
    more_tokens = len(tok.encode(more.read_text(), bos=True, eos=True))
    assert notes_tokens > 1024  # several progress updates
    assert len(re.findall(PROGRESS, error)) >= 2
    assert re.search(rf"notes\.txt: {notes_tokens:,} tokens in [\d.]+ s", error)
    assert f"now contains {notes_tokens + more_tokens:,} tokens" in error
    assert saved_state(random_model, "docs") == (notes_tokens + more_tokens, tok.eos_id)

    # Reading again continues the memory.
    result = run_cli("read", more, "--model", random_model, "--memory", "docs", "--quiet")
    assert result.returncode == 0, result.stderr.decode()
    assert saved_state(random_model, "docs")[0] == notes_tokens + 2 * more_tokens


def test_read_invalid_utf8(random_model, tmp_path, data_home):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Caf\u00e9 cr\u00e8me, s'il vous pla\u00eet.\n".encode("latin-1"))
    result = run_cli("read", latin, "--model", random_model, "--memory", "docs")
    assert result.returncode == 1
    error = result.stderr.decode()
    assert f"{latin} is not valid utf-8: byte 0xe9 at offset 3" in error
    assert "pass --encoding" in error
    assert not (data_home / "memories" / "docs.mem").exists()

    result = run_cli(
        "read", latin, "--model", random_model, "--memory", "docs", "--encoding", "latin-1"
    )
    assert result.returncode == 0, result.stderr.decode()
    tok = llama2rnn.load_tokenizer(random_model.parent / "tokenizer.bin")
    text = latin.read_bytes().decode("latin-1")
    assert saved_state(random_model, "docs")[0] == len(tok.encode(text, bos=True, eos=True))


def test_read_unknown_encoding(random_model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    result = run_cli("read", notes, "--model", random_model, "--encoding", "klingon")
    assert result.returncode == 1
    assert "unknown encoding 'klingon'" in result.stderr.decode()
