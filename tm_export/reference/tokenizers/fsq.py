"""Finite scalar quantisation in torch, written for export.

Per latent channel i: n_i = round(sigmoid(z_i) * (L_i - 1)), code_i = n_i / (L_i - 1), and the
token id is the mixed-radix number sum_i n_i * basis_i with basis = cumprod([1] + L[:-1]) (channel
0 is the least significant digit). No parameters: the official checkpoints hold no FSQ entries, so
the constants here are non-persistent buffers.

Everything stays channel-first (B, D, h, w): levels broadcast as (1, D, 1, 1), so the graph has
no transposes and no data-dependent ops (Sigmoid, Mul, Round, Div, ReduceSum, Cast).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FiniteScalarQuantizer(nn.Module):
    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if any(level < 2 for level in levels):
            raise ValueError(f"every FSQ level must be >= 2, got {levels}")
        self.levels = tuple(levels)
        basis = [1]
        for level in levels[:-1]:
            basis.append(basis[-1] * level)
        self.vocab_size = basis[-1] * levels[-1]
        shape = (1, len(levels), 1, 1)
        # float32 steps: upstream multiplies/divides a float tensor by the int (L - 1), i.e. in float32.
        self.register_buffer("steps", torch.tensor([lv - 1 for lv in levels], dtype=torch.float32).view(shape),
                             persistent=False)
        self.register_buffer("basis_f", torch.tensor(basis, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("levels_i", torch.tensor(levels, dtype=torch.int64).view(shape), persistent=False)
        self.register_buffer("basis_i", torch.tensor(basis, dtype=torch.int64).view(shape), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, D, h, w) -> codes (B, D, h, w) float32 in [0, 1], ids (B, h, w) int32."""
        # Quantise in float32 whatever the model dtype: the rounding decides the token ids.
        digits = torch.round(torch.sigmoid(latent.float()) * self.steps)  # half-to-even, like ONNX Round
        codes = digits / self.steps
        # Digits and basis are small integers held exactly in float32 (max id 15359), so the sum is exact.
        ids = (digits * self.basis_f).sum(dim=1).to(torch.int32)
        return codes, ids

    def indices_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) integer -> codes (B, D, h, w) float32 (the inverse of ``forward``'s ids)."""
        digits = torch.remainder(torch.div(ids.to(torch.int64).unsqueeze(1), self.basis_i, rounding_mode="floor"),
                                 self.levels_i)
        return digits.to(torch.float32) / self.steps
