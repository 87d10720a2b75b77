"""Building blocks: attention, MLP, the pre-norm self- and cross-attention blocks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

# torch.utils.flop_counter does not count the fused CPU attention kernel, so FLOP
# profiling switches attention to plain matmuls, which it does count.
_explicit_attention = False


@contextlib.contextmanager
def explicit_attention() -> Iterator[None]:
    """Within this block attention runs as QK^T / softmax / AV matmuls (same result)."""
    global _explicit_attention
    previous, _explicit_attention = _explicit_attention, True
    try:
        yield
    finally:
        _explicit_attention = previous


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B, H, n, dh)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)  # (B, n, D)


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention over heads; key_mask (B, M) is True for real keys."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
    if not _explicit_attention:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, n, M)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head attention; `context` defaults to the queries (self-attention)."""

    def __init__(self, dim: int, *, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        return self.to_out(merge_heads(attend(q, k, v, key_mask)))


class MLP(nn.Module):
    def __init__(self, dim: int, *, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer layer over the latents (or, with a key mask, over padded text tokens)."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ratio=mlp_ratio)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask=key_mask)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Queries attend to a context that is normalised separately (perceiver-style pre-norm).

    Used by the encoder (latents onto inputs) and by the decoder (task queries onto latents).
    """

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ratio=mlp_ratio)

    def forward(self, queries: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = queries + self.attn(self.norm_query(queries), self.norm_context(context), key_mask)
        return x + self.mlp(self.norm_mlp(x))
