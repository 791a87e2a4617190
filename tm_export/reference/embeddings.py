"""Encoder embeddings: raw-image patch embeddings with fixed sin-cos positions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PATCH_SIZE = 16


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The fixed 2-D sin-cos table, (1, grid_h*grid_w, dim), tokens row-major.

    Per token at (row r, col c): [sin(r w), cos(r w), sin(c w), cos(c w)] with
    w_i = temperature^(-i / (dim/4)). Upstream builds it with a transposed meshgrid, whose effect
    is exactly this row-first layout (for the square grids TerraMind uses).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a dimension divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float32).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32).repeat(grid_h)
    r, c = rows[:, None] * omega[None], cols[:, None] * omega[None]
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).unsqueeze(0)


def resize_positions(pos_emb: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Bicubically resize a square (1, n*n, D) table to (1, grid_h*grid_w, D), as upstream does
    for inputs whose size differs from the one the model was built for."""
    side = math.isqrt(int(pos_emb.shape[1]))
    if (side, side) == (grid_h, grid_w):
        return pos_emb
    dim = pos_emb.shape[-1]
    grid = pos_emb.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)


class ImageEncoderEmbedding(nn.Module):
    """Patch embedding of a raw image modality (keys ``proj.weight``, ``mod_emb``, ``pos_emb``).

    ``proj`` is a bias-free Linear over 16x16 patches whose columns are ordered
    (pixel row, pixel column, channel) with the channel fastest.
    """

    def __init__(self, num_channels: int, dim: int, image_size: int = 224) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.dim = dim
        grid = image_size // PATCH_SIZE
        self.proj = nn.Linear(num_channels * PATCH_SIZE * PATCH_SIZE, dim, bias=False)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_emb", sincos_2d(grid, grid, dim))

    def conv_weight(self) -> torch.Tensor:
        """The Linear weight viewed as an equivalent stride-16 Conv2d kernel (D, C, 16, 16)."""
        w = self.proj.weight.reshape(self.dim, PATCH_SIZE, PATCH_SIZE, self.num_channels)
        return w.permute(0, 3, 1, 2)

    def position_embedding(self, image: torch.Tensor) -> torch.Tensor:
        """pos + modality embedding for an image of this size, (1, H/16*W/16, D).

        Spatial size is static per export, so the table becomes a constant in the graph.
        """
        grid_h, grid_w = int(image.shape[-2]) // PATCH_SIZE, int(image.shape[-1]) // PATCH_SIZE
        return resize_positions(self.pos_emb, grid_h, grid_w) + self.mod_emb

    def patch_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, C, H, W) -> patch projections (B, H/16*W/16, D)."""
        # A stride-16 convolution is the patchify+Linear in one op that every runtime fuses well.
        return F.conv2d(image, self.conv_weight(), stride=PATCH_SIZE).flatten(2).transpose(1, 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, C, H, W) -> tokens + positional + modality embedding (B, H/16*W/16, D)."""
        return self.patch_tokens(image) + self.position_embedding(image)


class ImageTokenEncoderEmbedding(nn.Module):
    """Encoder embedding of a tokenised image modality (``tok_<mod>@224``): keys
    ``token_emb.weight`` (V, D), ``mod_emb``, ``pos_emb`` (a buffer).

    Upstream's generation feeds every generated output except the last back through this
    embedding, so that it conditions the outputs after it; tokenised inputs (LULC, NDVI) use it too.
    """

    def __init__(self, vocab_size: int, dim: int, image_size: int = 224) -> None:
        super().__init__()
        grid = image_size // PATCH_SIZE
        self.vocab_size = vocab_size
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_emb", sincos_2d(grid, grid, dim))

    def position_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """pos + modality embedding for a (B, h, w) id grid, (1, h*w, D); static per export."""
        grid_h, grid_w = int(ids.shape[-2]), int(ids.shape[-1])
        return resize_positions(self.pos_emb, grid_h, grid_w) + self.mod_emb

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, h, w) int -> (token + pos + modality embedding (B, h*w, D), pos + modality (1, h*w, D))."""
        emb = self.position_embedding(ids)
        x = self.token_emb(ids.flatten(1).to(torch.int64))
        return x + emb, emb
