"""Write a llama2rnn weight dict as a plain Llama GGUF file with Q8_0 matrices.

The benchmarks run llama.cpp on the same random weights as llama2rnn. The memory weights
(``ori_mem``, ``rms_mem``, ``rms_mff``, ``aw1``, ``aw2``, ``aw3``) have no place in a
plain Llama model and are left out. The classifier stays tied to the embedding: the file
has no ``output.weight``, so llama.cpp multiplies by ``token_embd.weight``.

The vocabulary is a synthetic sentencepiece (SPM) vocabulary of ``vocab_size`` pieces:
``<unk>``, ``<s>``, ``</s>``, the 256 byte pieces ``<0x00>``..``<0xFF>``, then unique
lowercase pieces. Nothing here tokenizes text, so the pieces only have to load.

Key names and tensor names follow the ``gguf`` package (``GGUFWriter`` and
``MODEL_TENSOR`` names, checked against gguf 0.19.0) and the keys that llama.cpp's
vocabulary loader reads for ``tokenizer.ggml.model = "llama"``.
"""

from __future__ import annotations

import itertools
import string
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
from llama2rnn.checkpoint import Config

RMS_NORM_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
BYTE_PIECES = 256


def _word_pieces() -> Iterator[str]:
    """Yield distinct lowercase pieces: "▁a", "a", ..., "▁zz", "zz", "▁aaa", ..."""
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            word = "".join(letters)
            yield "\u2581" + word
            yield word


def synthetic_vocab(vocab_size: int) -> tuple[List[str], List[float], List[int]]:
    """Return (pieces, scores, token types) of a synthetic SPM vocabulary."""
    import gguf

    first_word = len(SPECIAL_PIECES) + BYTE_PIECES
    if vocab_size < first_word + 1:
        raise ValueError(f"vocab_size must be at least {first_word + 1}, got {vocab_size}")
    pieces = list(SPECIAL_PIECES)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    pieces += [f"<0x{value:02X}>" for value in range(BYTE_PIECES)]
    types += [gguf.TokenType.BYTE] * BYTE_PIECES
    pieces += list(itertools.islice(_word_pieces(), vocab_size - first_word))
    types += [gguf.TokenType.NORMAL] * (vocab_size - first_word)
    scores = [0.0] * first_word + [-float(i) for i in range(vocab_size - first_word)]
    return pieces, scores, [int(t) for t in types]


def write_llama_gguf(
    path: Path, config: Config, weights: Dict[str, np.ndarray], *, context_length: int
) -> None:
    """Write ``weights`` (a llama2rnn weight dict with a shared classifier) as a Q8_0 GGUF.

    ``context_length`` is stored as ``llama.context_length``, the training context that
    llama.cpp uses when the caller passes ``n_ctx=0``.
    """
    import gguf

    if "wcls" in weights:
        raise ValueError("write_llama_gguf expects a shared classifier (no 'wcls' entry)")
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llama2rnn benchmark (random weights)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(context_length)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_vocab_size(config.vocab_size)

    pieces, scores, types = synthetic_vocab(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def add_q8(name: str, matrix: np.ndarray) -> None:
        writer.add_tensor(name, gguf.quants.quantize(matrix, q8), raw_dtype=q8)

    # numpy (out, in) arrays become GGUF ne = [in, out], the layout llama.cpp expects.
    add_q8("token_embd.weight", weights["embedding"])
    writer.add_tensor("output_norm.weight", weights["rms_final"])
    layer_tensors = (
        ("attn_norm", "rms_att"),
        ("attn_q", "wq"),
        ("attn_k", "wk"),
        ("attn_v", "wv"),
        ("attn_output", "wo"),
        ("ffn_norm", "rms_ffn"),
        ("ffn_gate", "w1"),
        ("ffn_down", "w2"),
        ("ffn_up", "w3"),
    )
    for layer in range(config.n_layers):
        for gguf_name, name in layer_tensors:
            tensor = weights[name][layer]
            full_name = f"blk.{layer}.{gguf_name}.weight"
            if tensor.ndim == 1:
                writer.add_tensor(full_name, tensor)
            else:
                add_q8(full_name, tensor)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
