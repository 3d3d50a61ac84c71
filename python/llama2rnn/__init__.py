"""llama2rnn: run Llama2RNN recurrent language models, whose memory persists across sessions."""

from ._llama2rnn import (
    CheckpointError,
    ContextFullError,
    MemoryFileError,
    NonFiniteLogitsError,
    detected_kernel,
    supported_kernels,
)
from .checkpoint import Config
from .memory import MemoryInUseError, MemorySnapshot, MemoryWriteError
from .model import Model
from .tokenizer import SentencePieceTokenizer, Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "CheckpointError",
    "Config",
    "ContextFullError",
    "MemoryFileError",
    "MemoryInUseError",
    "MemorySnapshot",
    "MemoryWriteError",
    "Model",
    "NonFiniteLogitsError",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "detected_kernel",
    "load_tokenizer",
    "supported_kernels",
]

__version__ = "0.1.0"
