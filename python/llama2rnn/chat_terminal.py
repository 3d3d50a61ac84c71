"""The interactive chat loop on a terminal, with prompt_toolkit."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings

from ._llama2rnn import ContextFullError
from .chat_cli import HELP, Chat, describe_memory, feed_document, read_text, timestamp
from .memory import data_home


def key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _(event) -> None:  # type: ignore[no-untyped-def]
        event.current_buffer.insert_text("\n")

    return bindings


def ask(session: PromptSession, question: str) -> bool:
    try:
        return session.prompt(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except (KeyboardInterrupt, EOFError):
        return False


def run_command(chat: Chat, session: PromptSession, line: str) -> bool:
    """Run a slash command; return False when the chat should end."""
    name, _, rest = line.partition(" ")
    model = chat.model
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        print(HELP)
    elif name == "/save":
        chat.save()
        print(f"saved: {describe_memory(model)}")
    elif name == "/memory":
        print(describe_memory(model))
    elif name == "/reset":
        if ask(session, "Forget the whole conversation in this memory?"):
            model.reset_memory()
            chat.save()
            print("the memory is back to the model's initial state")
    elif name == "/read":
        paths = shlex.split(rest)
        if not paths:
            print("usage: /read FILE")
        for path in paths:
            try:
                text = read_text(Path(path), "utf-8")
            except (OSError, ValueError) as error:
                print(f"error: {error}")
                continue
            try:
                feed_document(model, text, path, sys.stdout)
            except KeyboardInterrupt:
                print("\nreading stopped; what was read so far stays in the memory")
            chat.save()
    else:
        print(f"unknown command {name}; /help lists the commands")
    return True


# Control characters the model emits (through byte tokens) are dropped before printing, so
# that an answer cannot move the cursor, clear the screen or retitle the terminal.
# Newlines and tabs stay.
_TERMINAL_CONTROLS = {c: None for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}


def answer(chat: Chat, message: str) -> None:
    print("Assistant: ", end="", flush=True)
    stream = None
    try:
        # Ctrl-C while the user's turn is fed (a long paste) also stops the answer.
        stream = chat.answer(message)
        for piece in stream:
            print(piece.translate(_TERMINAL_CONTROLS), end="", flush=True)
        print()
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()
        chat.model.close_turn()
        print("\n[answer stopped]")
    chat.save()


def run_terminal(chat: Chat) -> int:
    # The history file contains every message typed, so a new one is readable by the user
    # only, like the memory files. An existing file keeps its mode.
    history = data_home() / "chat_history"
    history.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    history.touch(mode=0o600, exist_ok=True)
    session: PromptSession = PromptSession(
        history=FileHistory(str(history)), key_bindings=key_bindings()
    )
    print(f"llama2rnn chat: {describe_memory(chat.model)}. /help lists the commands.")
    while True:
        try:
            line = session.prompt(lambda: f"({timestamp()}) User: ")
        except KeyboardInterrupt:
            print("(Ctrl-D or /exit saves and quits)")
            continue
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            if not run_command(chat, session, line.strip()):
                return 0
            continue
        try:
            answer(chat, line)
        except ContextFullError as error:
            # Only a plain llama2.c model fills up. The chat goes on so that /reset can free it.
            print(f"\nerror: {error}\nThe context is full: /reset starts a new conversation.")
