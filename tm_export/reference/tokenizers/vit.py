"""The tokenizers' ViTs: the encoder shared by all modalities and the LULC decoder.

Keys as in the checkpoints: ``proj`` (encoder patch Conv2d), ``pos_emb`` (1, D, 16, 16),
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm_mlp``,
``post_mlp.{fc1,fc2}``, and ``out_proj`` (decoder).

The stored positional table belongs to the 256 px training grid (16x16); upstream resizes it
bicubically on every call. Here it is resized once for the export image size into the
non-persistent ``pos_table`` (re-baked whenever a state_dict is loaded; call ``bake_positions()``
after changing ``pos_emb`` in place), so an exported graph holds a constant instead of a Resize.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..embeddings import sincos_2d
from ..layers import Attention, Mlp
from .config import ViTConfig

LAYER_NORM_EPS = 1e-6


class TanhMlp(nn.Module):
    """fc1 -> tanh -> fc2: the point-wise ``post_mlp`` after the blocks (ViT-VQGAN style)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block. Unlike the TerraMind backbone, the tokenizers use plain nn.LayerNorm
    (learnable bias) and biases on every projection."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(cfg.dim, cfg.num_heads, bias=True)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(cfg.dim, cfg.mlp_hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ViTBody(nn.Module):
    """Positional table, blocks and post-MLP shared by encoder and decoder."""

    def __init__(self, cfg: ViTConfig, train_grid: int, grid: int) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.grid = grid
        # Initialised to the sincos table upstream starts from; a checkpoint overwrites it.
        table = sincos_2d(train_grid, train_grid, cfg.dim).reshape(1, train_grid, train_grid, cfg.dim)
        self.pos_emb = nn.Parameter(table.permute(0, 3, 1, 2).contiguous(), requires_grad=False)
        self.register_buffer("pos_table", torch.empty(1, grid * grid, cfg.dim), persistent=False)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm_mlp = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.post_mlp = TanhMlp(cfg.dim, cfg.mlp_hidden)
        self.bake_positions()
        # Loading a checkpoint replaces pos_emb, so the derived table must follow.
        self.register_load_state_dict_post_hook(lambda module, _keys: module.bake_positions())

    @torch.no_grad()
    def bake_positions(self) -> None:
        """Resize ``pos_emb`` to the export grid, with the very call upstream makes per forward
        (bicubic, align_corners=False; identity when the grids match), so results are bit-equal."""
        table = F.interpolate(self.pos_emb.float(), size=(self.grid, self.grid), mode="bicubic", align_corners=False)
        self.pos_table.copy_(table.flatten(2).transpose(1, 2))

    def _to_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h*w, D) -> (B, D, h, w)."""
        # The batch is read from the tensor (symbolic in the graph), every other size is a constant:
        # the legacy exporter then infers the static dims, which it loses for a -1.
        return x.transpose(1, 2).reshape(x.shape[0], self.dim, self.grid, self.grid)


class ViTEncoder(_ViTBody):
    """Image (B, C, H, W) -> features (B, D, H/16, W/16)."""

    def __init__(self, cfg: ViTConfig, in_channels: int, patch_size: int, train_grid: int, grid: int) -> None:
        super().__init__(cfg, train_grid, grid)
        self.proj = nn.Conv2d(in_channels, cfg.dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.proj(image).flatten(2).transpose(1, 2) + self.pos_table
        x = self.blocks(x)
        # Upstream runs this residual MLP in float32 even under autocast; the reference graphs are fp32.
        x = x + self.post_mlp(self.norm_mlp(x))
        return self._to_image(x)


class ViTDecoder(_ViTBody):
    """Features (B, D, h, w) -> per-pixel outputs (B, C, 16h, 16w) (the LULC logits)."""

    def __init__(self, cfg: ViTConfig, out_channels: int, patch_size: int, train_grid: int, grid: int) -> None:
        super().__init__(cfg, train_grid, grid)
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.out_proj = nn.Linear(cfg.dim, out_channels * patch_size * patch_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(2).transpose(1, 2) + self.pos_table
        x = self.blocks(x)
        x = x + self.post_mlp(self.norm_mlp(x))
        x = self.out_proj(x)
        # Each token's outputs are laid out (c, ph, pw): unfold them into a (C, H, W) image.
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.out_channels
        x = x.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)
