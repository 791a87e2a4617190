"""Decoder side of the enc-dec model: target embeddings and the one-pass logits computation.

At generation time an image target is decoded in one pass: every one of its positions is a
mask token plus that position's (pos + modality) embedding, so the decoder input is a constant
per target; no decoder masks are active (upstream's are all-False there).
"""
from __future__ import annotations

import torch
from torch import nn

from .embeddings import resize_positions, sincos_2d
from .layers import DecoderBlock, LayerNorm


class ImageTokenDecoderEmbedding(nn.Module):
    """Keys ``token_emb.weight`` (V, D), ``to_logits.weight`` (V, D, tied to token_emb), ``mod_emb``,
    ``pos_emb`` (a buffer)."""

    def __init__(self, vocab_size: int, dim: int, image_size: int = 224) -> None:
        super().__init__()
        grid = image_size // 16
        self.vocab_size = vocab_size
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.to_logits = nn.Linear(dim, vocab_size, bias=False)
        self.to_logits.weight = self.token_emb.weight  # tied, as in the checkpoint
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_emb", sincos_2d(grid, grid, dim))

    def query_embedding(self, grid: int) -> torch.Tensor:
        """pos + modality embedding of every target position, (1, grid*grid, D)."""
        return resize_positions(self.pos_emb, grid, grid) + self.mod_emb


def image_queries(mask_token: torch.Tensor, target: ImageTokenDecoderEmbedding, grid: int) -> torch.Tensor:
    """The decoder input of an image target, (1, grid*grid, D): a mask token plus each position's
    pos + modality embedding (a constant per target; see the module docstring)."""
    return mask_token + target.query_embedding(grid)


def decode_hidden(
    blocks: nn.ModuleList,
    norm: nn.Module,
    proj_context: nn.Linear,
    queries: torch.Tensor,
    encoder_output: torch.Tensor,
    context_emb: torch.Tensor,
    self_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder transformer, shared by every target: normed hidden states (B, L, D) of the
    ``queries`` (B or 1, L, D) attending to the projected context.

    ``encoder_output`` is the normed last encoder layer (B, N, D); ``context_emb`` the inputs'
    pos + modality embeddings (1 or B, N, D), which upstream adds again after the projection.
    ``self_bias`` (L, L) is added to the self-attention scores: None (image targets: no mask) or
    the causal bias of a coords sequence.
    """
    context = proj_context(encoder_output) + context_emb
    y = queries.expand(encoder_output.shape[0], -1, -1)
    for block in blocks:
        y = block(y, context, self_bias)
    return norm(y)


def head_logits(hidden: torch.Tensor, to_logits: nn.Linear) -> torch.Tensor:
    """A target's output head on the normed hidden states: (B, L, D) -> logits (B, L, V)."""
    return torch.matmul(hidden, to_logits.weight.t())


def decode_logits(
    blocks: nn.ModuleList,
    norm: nn.Module,
    proj_context: nn.Linear,
    mask_token: torch.Tensor,
    target: ImageTokenDecoderEmbedding,
    encoder_output: torch.Tensor,
    context_emb: torch.Tensor,
    grid: int,
) -> torch.Tensor:
    """Logits (B, grid*grid, V) of one image target, in position order: its queries, the shared
    decoder, its head."""
    queries = image_queries(mask_token, target, grid)
    hidden = decode_hidden(blocks, norm, proj_context, queries, encoder_output, context_emb)
    return head_logits(hidden, target.to_logits)


def build_decoder_blocks(variant) -> nn.ModuleList:
    return nn.ModuleList(
        DecoderBlock(variant.dim, variant.num_heads, variant.mlp_hidden, variant.gated_mlp, variant.bias)
        for _ in range(variant.decoder_depth)
    )


def build_decoder_norm(variant) -> LayerNorm:
    return LayerNorm(variant.dim)
