"""The Llama 2 chat template, shared by `Model.chat` and the `llama2rnn chat` command.

A turn is encoded as BOS + "[INST] {user} [/INST]" (with a system block in the first turn of
a fresh memory), the answer is sampled until EOS, and the answer's tokens, EOS included,
stay in the model's memory. BOS and EOS are the turn boundaries: the tokenizer never
produces them from text, so a user who types "<s>", "</s>" or "[/INST]" writes ordinary text
inside their own turn and cannot open or close one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .model import Model


def format_turn(message: str, system: str | None = None) -> str:
    """Return the text of one user turn in the Llama 2 chat template (without BOS)."""
    if system:
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{message} [/INST]"
    return f"[INST] {message} [/INST]"


def turn_tokens(model: Model, message: str, system: str | None = None) -> list[int]:
    """Encode a user turn with BOS. The system prompt only goes into the first turn of a
    fresh memory: once the model has seen anything, the memory already contains it."""
    if not message.strip():
        raise ValueError("the message is empty: type some text")
    first_turn = model.position == 0
    return model.tokenizer.encode(format_turn(message, system if first_turn else None), bos=True)


def chat_stream(
    model: Model,
    message: str,
    system: str | None = None,
    max_tokens: int = 512,
    temperature: float = 0.8,
    top_p: float = 0.9,
    seed: int | None = None,
) -> Iterator[str]:
    """Feed one user turn and yield the answer's text as it is decoded.

    The answer ends at EOS or after `max_tokens`; a cut-off answer is closed with EOS so the
    next turn starts on a clean boundary. Stopping the iteration early (for example on
    Ctrl-C) leaves a consistent state: call `Model.close_turn` to end the answer.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} is invalid: an answer needs at least 1 token")
    tokens = turn_tokens(model, message, system)
    model._set_sampling(temperature, top_p, seed)
    model.feed(tokens)
    return model._decode_loop(max_tokens, close_turn=True)
