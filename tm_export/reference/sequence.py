"""The coords sequence modality: its encoder and decoder embeddings and the causal decoder pass.

Upstream (SequenceEncoderEmbedding / SequenceDecoderEmbedding) keeps a 1-D sin-cos table of 512
rows as a buffer (the intended ``[:max_length]`` slice hits the batch dim, so all rows stay) and
numbers valid tokens 0, 1, ... . At inference every token of a coords sequence is valid, so the
position of token i is simply i and the graphs slice the table with the sequence length.
"""
from __future__ import annotations

import torch
from torch import nn

from tm_runtime.coords import MASKED_BIAS

from .decoder import decode_hidden, head_logits

MAX_SINCOS_POSITIONS = 512


def sincos_1d(length: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The fixed 1-D table (1, length, dim): [sin(p w), cos(p w)] with w_i = temperature^(-i/(dim/2))."""
    half = dim // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).unsqueeze(0)


class SequenceEncoderEmbedding(nn.Module):
    """Keys ``token_emb.weight`` (V, D), ``mod_emb`` (1, 1, D), ``pos_emb`` (1, 512, D) buffer."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_emb", sincos_1d(MAX_SINCOS_POSITIONS, dim))

    def position_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """pos + modality embedding of a (B, L) sequence whose tokens are all valid, (1, L, D)."""
        return self.pos_emb[:, : ids.shape[1]] + self.mod_emb

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) -> (token + pos + modality embedding (B, L, D), pos + modality (1, L, D))."""
        emb = self.position_embedding(ids)
        return self.token_emb(ids.to(torch.int64)) + emb, emb


class SequenceDecoderEmbedding(SequenceEncoderEmbedding):
    """Adds ``to_logits.weight`` (V, D), tied to ``token_emb`` as in the checkpoint."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__(vocab_size, dim)
        self.to_logits = nn.Linear(dim, vocab_size, bias=False)
        self.to_logits.weight = self.token_emb.weight


def causal_bias(length: int | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) additive bias: 0 on and below the diagonal, MASKED_BIAS above (future tokens).

    Built from a Range and a comparison, so the exported graph takes any sequence length.
    """
    positions = torch.arange(length, device=device)
    future = positions[None, :] > positions[:, None]
    return future.to(torch.float32) * MASKED_BIAS


def sequence_logits(
    blocks: nn.ModuleList,
    norm: nn.Module,
    proj_context: nn.Linear,
    target: SequenceDecoderEmbedding,
    encoder_output: torch.Tensor,
    context_emb: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """Logits (B, L, V) of a coords sequence given its first L ids, each position seeing only
    itself and earlier ones (upstream's autoregressive step, without its early stop)."""
    queries, _ = target(ids)
    bias = causal_bias(ids.shape[1], ids.device)
    hidden = decode_hidden(blocks, norm, proj_context, queries, encoder_output, context_emb, bias)
    return head_logits(hidden, target.to_logits)
