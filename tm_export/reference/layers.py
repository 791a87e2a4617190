"""Transformer building blocks of TerraMind v1, named as the checkpoint keys name them.

Written for export: explicit matmuls (no einsum, no SDPA), reshape/transpose with shapes taken
from the tensor so batch and token count stay symbolic. TerraMind's inference masks are
all-False except the causal mask of the autoregressive coords decoder, which enters as an
additive bias (see ``sequence.causal_bias``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


class LayerNorm(nn.Module):
    """LayerNorm without a learnable bias.

    The checkpoints still carry a ``bias`` entry (a zero buffer), so we register one too: that
    keeps ``load_state_dict(strict=True)`` working in both directions.
    """

    def __init__(self, dim: int, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2 (tiny and small)."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUMlp(nn.Module):
    """fc2(SiLU(fc1 x) * fc3 x) (base and large): fc1 is the gated branch, fc3 the linear one."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.fc3 = nn.Linear(dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    batch, tokens, dim = x.shape
    return x.reshape(batch, tokens, num_heads, dim // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v on (B, H, N, d) tensors, as upstream computes it (no fp32
    upcast). ``bias`` (N, N) is 0 where attention is allowed and very negative where it is not."""
    weights = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        weights = weights + bias
    return torch.matmul(weights.softmax(dim=-1), v)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection, rows laid out [q | k | v] (timm layout)."""

    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.num_heads
        out = attend(_split_heads(q, h), _split_heads(k, h), _split_heads(v, h), self.scale, bias)
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Queries from x, keys/values from the context; kv rows laid out [k | v]."""

    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, dim * 2, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        k, v = self.kv(context).chunk(2, dim=-1)
        out = attend(_split_heads(self.q(x), h), _split_heads(k, h), _split_heads(v, h), self.scale)
        return self.proj(_merge_heads(out))


def make_mlp(dim: int, hidden: int, gated: bool, bias: bool) -> nn.Module:
    return SwiGLUMlp(dim, hidden, bias) if gated else Mlp(dim, hidden, bias)


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm1 x), then x + mlp(norm2 x)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, gated: bool, bias: bool) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = make_mlp(dim, mlp_hidden, gated, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Decoder block: self-attention, cross-attention on a per-block normed context, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, gated: bool, bias: bool) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, bias)
        self.query_norm = LayerNorm(dim)
        self.context_norm = LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = make_mlp(dim, mlp_hidden, gated, bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, self_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), self_bias)
        x = x + self.cross_attn(self.query_norm(x), self.context_norm(context))
        return x + self.mlp(self.norm2(x))
