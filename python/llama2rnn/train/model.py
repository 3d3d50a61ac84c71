"""PyTorch Llama2RNN model (memory attention) and the plain Llama baseline.

The computation matches the Rust engine. With ``mem_len = M > 0`` a sequence is cut
into chunks of ``M`` tokens. In each layer, the chunk's queries attend over ``M``
memory rows plus the chunk's tokens up to and including their own position. The
memory rows for chunk ``i + 1`` are the layer's attention outputs of chunk ``i``
(concatenated heads, before ``wo``), and the first chunk uses the learned
``ori_mem``. A memory update turns memory rows into keys and values:

    m = mem + aw2(silu(aw1 g) * aw3 g),  g = rmsnorm(mem, rms_mff)
    n = rmsnorm(m, rms_mem)
    k_mem, v_mem = wk n, wv n  (RoPE on k_mem at positions 0..M-1)

Chunk queries and keys get RoPE at positions M..2M-1, for every chunk. RoPE rotates
interleaved pairs (2j, 2j+1) inside a head, as llama2.c does. With ``mem_len = 0``
the model is ordinary llama2.c Llama: causal attention over the whole sequence with
RoPE at absolute positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

Memory = list[torch.Tensor]


@dataclass
class ModelArgs:
    """Model hyperparameters (``mem_len = 0`` selects the plain-attention baseline)."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    vocab_size: int = 2048
    hidden_dim: int = 384
    seq_len: int = 256
    mem_len: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_size % 2 != 0:
            raise ValueError(f"head size {self.head_size} must be even for RoPE")
        if self.mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {self.mem_len}")
        if self.mem_len > 0 and self.seq_len % self.mem_len != 0:
            raise ValueError(f"seq_len {self.seq_len} is not a multiple of mem_len {self.mem_len}")

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_tables(
    head_size: int, n_positions: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float32 (cos, sin), each (n_positions, head_size / 2), as llama2.c computes them."""
    j = torch.arange(0, head_size, 2, dtype=torch.float32)
    freq = 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float32), j / head_size)
    angle = torch.arange(n_positions, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (..., T, heads, head_size) by (T, head_size / 2) tables."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Attend with q (B, Tq, H, hs) over k, v (B, Tk, KV, hs) and return (B, Tq, H * hs).

    Query head ``h`` reads kv head ``h // (H / KV)``. ``mask`` (Tq, Tk) is True where
    attention is allowed, and ``None`` means causal over the full sequence.
    """
    n_rep = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def memory_mask(n_queries: int, mem_len: int, device: torch.device) -> torch.Tensor:
    """Mask (n_queries, mem_len + n_queries): every memory row, then causal in the chunk."""
    chunk = torch.ones(n_queries, n_queries, dtype=torch.bool, device=device).tril()
    memory = torch.ones(n_queries, mem_len, dtype=torch.bool, device=device)
    return torch.cat((memory, chunk), dim=1)


class Layer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        dim, kv_dim = args.dim, args.kv_dim
        self.attention_norm = RMSNorm(dim, args.norm_eps)  # rms_att
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_dim, bias=False)
        self.wv = nn.Linear(dim, kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = RMSNorm(dim, args.norm_eps)  # rms_ffn
        self.feed_forward = FeedForward(dim, args.hidden_dim)  # w1, w2, w3
        if args.mem_len > 0:
            self.memory_ffn_norm = RMSNorm(dim, args.norm_eps)  # rms_mff
            self.memory_ffn = FeedForward(dim, args.hidden_dim)  # aw1, aw2, aw3
            self.memory_norm = RMSNorm(dim, args.norm_eps)  # rms_mem
            self.ori_mem = nn.Parameter(torch.zeros(args.mem_len, dim))

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.unflatten(-1, (n_heads, self.args.head_size))

    def memory_kv(
        self, mem: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn memory rows (B, M, dim) into keys and values (B, M, KV, hs)."""
        m = mem + self.memory_ffn(self.memory_ffn_norm(mem))
        n = self.memory_norm(m)
        k = self.split_heads(self.wk(n), self.args.n_kv_heads)
        v = self.split_heads(self.wv(n), self.args.n_kv_heads)
        return apply_rope(k, cos, sin), v

    def attention_plain(
        self, xb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        T = xb.shape[1]
        cos, sin = rope[0][:T], rope[1][:T]
        q = apply_rope(self.split_heads(self.wq(xb), self.args.n_heads), cos, sin)
        k = apply_rope(self.split_heads(self.wk(xb), self.args.n_kv_heads), cos, sin)
        v = self.split_heads(self.wv(xb), self.args.n_kv_heads)
        return attend(q, k, v, None)

    def attention_memory(
        self,
        xb: torch.Tensor,
        mem: Optional[torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend chunk by chunk over xb (B, T, dim) and return (att, memory after the last full chunk)."""
        B, T, _ = xb.shape
        M = self.args.mem_len
        cos, sin = rope
        # Every chunk puts its tokens at positions M..2M-1, so the tables repeat per chunk.
        offsets = torch.arange(T, device=xb.device) % M + M
        q = apply_rope(self.split_heads(self.wq(xb), self.args.n_heads), cos[offsets], sin[offsets])
        k = apply_rope(
            self.split_heads(self.wk(xb), self.args.n_kv_heads), cos[offsets], sin[offsets]
        )
        v = self.split_heads(self.wv(xb), self.args.n_kv_heads)

        if mem is None:
            # The initial memory is the same for every sequence: update it once.
            k_mem, v_mem = self.memory_kv(self.ori_mem[None], cos[:M], sin[:M])
            k_mem, v_mem = k_mem.expand(B, -1, -1, -1), v_mem.expand(B, -1, -1, -1)
        else:
            k_mem, v_mem = self.memory_kv(mem, cos[:M], sin[:M])

        outputs = []
        full_mask = memory_mask(M, M, xb.device)
        for start in range(0, T, M):
            end = min(start + M, T)
            mask = full_mask if end - start == M else memory_mask(end - start, M, xb.device)
            keys = torch.cat((k_mem, k[:, start:end]), dim=1)
            values = torch.cat((v_mem, v[:, start:end]), dim=1)
            att = attend(q[:, start:end], keys, values, mask)
            outputs.append(att)
            if end - start == M:
                mem = att
                if end < T:
                    k_mem, v_mem = self.memory_kv(mem, cos[:M], sin[:M])
        if mem is None:
            mem = self.ori_mem[None].expand(B, -1, -1)
        return torch.cat(outputs, dim=1), mem

    def forward(
        self,
        x: torch.Tensor,
        mem: Optional[torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        xb = self.attention_norm(x)
        if self.args.mem_len > 0:
            att, mem = self.attention_memory(xb, mem, rope)
        else:
            att = self.attention_plain(xb, rope)
        x = x + self.wo(att)
        x = x + self.feed_forward(self.ffn_norm(x))
        return x, mem


class Transformer(nn.Module):
    """Llama2RNN (``mem_len > 0``) or plain Llama (``mem_len == 0``) with a tied classifier."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Layer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight

        # The memory model needs positions 0..2M-1; the baseline needs 0..seq_len-1.
        n_positions = 2 * args.mem_len if args.mem_len > 0 else args.seq_len
        cos, sin = rope_tables(args.head_size, n_positions, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialize as llama2.c's trainer does: N(0, std), residual projections std / sqrt(2L)."""
        residual_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, residual_std)
            elif name.endswith("ori_mem"):
                nn.init.normal_(p, 0.0, std)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        memory: Optional[Memory] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[Memory]]:
        """Run tokens (B, T) and return (logits, loss or None, memory).

        For the memory model, ``memory`` carries per-layer memory rows (B, M, dim)
        across calls: a call continues the stream when every earlier call had a
        multiple of ``mem_len`` tokens. ``None`` starts from ``ori_mem``. The returned
        memory is that after the last full chunk. The baseline returns ``None``
        memory and requires ``T <= seq_len``.
        """
        T = tokens.shape[1]
        if self.args.mem_len == 0 and T > self.args.seq_len:
            raise ValueError(
                f"sequence of {T} tokens exceeds the baseline seq_len {self.args.seq_len}"
            )
        rope = (self.rope_cos, self.rope_sin)
        x = self.tok_embeddings(tokens)
        new_memory: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            mem = memory[i] if memory is not None else None
            x, mem = layer(x, mem, rope)
            if mem is not None:
                new_memory.append(mem)
        logits = self.output(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss, (new_memory if self.args.mem_len > 0 else None)

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
