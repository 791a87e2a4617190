"""Configurations of TerraMind 1.0's FSQ-VAE tokenizers.

The defaults are the official architectures (those of the ``TerraMind_Tokenizer_<MOD>.pt``
checkpoints); every width, depth and count can be shrunk for fast tests. ``image_size`` is the
size the modules are built *for*: exported graphs have static spatial shapes, so the resized
positional tables and all reshapes are fixed by it. ``train_image_size`` is the size the
checkpoints were trained at (256), which fixes the stored positional tables (16x16 grid).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from tm_runtime.fsq import IMAGE_LEVELS, LULC_LEVELS


@dataclass(frozen=True)
class UNetConfig:
    """The patched diffusion UNet of the DiVAE tokenizers (upstream ``unet_patched``)."""

    patch_size: int = 4  # pixels folded into channels before the UNet (224 px -> 56x56)
    model_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (4, 8)  # downsampling factors that get attention
    num_heads: int = 1
    norm_groups: int = 32
    time_embed_mult: int = 4  # timestep MLP width = model_channels * time_embed_mult

    def __post_init__(self) -> None:
        widths = [self.model_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"UNet widths {widths} must be divisible by the {self.norm_groups} GroupNorm groups")
        if self.model_channels % 2:
            raise ValueError("the sinusoidal timestep embedding needs an even model_channels")


@dataclass(frozen=True)
class ViTConfig:
    """A plain ViT (encoder, or the LULC decoder): pre-norm blocks, GELU MLP, biases everywhere."""

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


@dataclass(frozen=True)
class TokenizerConfig:
    modality: str
    in_channels: int
    levels: tuple[int, ...]
    decoder: Literal["unet", "vit"]
    image_size: int = 224
    train_image_size: int = 256
    patch_size: int = 16
    encoder: ViTConfig = field(default_factory=ViTConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vit_decoder: ViTConfig = field(default_factory=ViTConfig)

    def __post_init__(self) -> None:
        for name in ("image_size", "train_image_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of patch_size={self.patch_size}")
        if self.decoder == "unet" and self.image_size % self.unet.patch_size:
            raise ValueError(f"image_size must be a multiple of the UNet patch size {self.unet.patch_size}")
        if self.decoder not in ("unet", "vit"):
            raise ValueError(f"decoder must be 'unet' or 'vit', got {self.decoder!r}")

    @property
    def latent_dim(self) -> int:
        return len(self.levels)

    @property
    def grid(self) -> int:
        """Token grid side at ``image_size`` (14 at 224 px)."""
        return self.image_size // self.patch_size

    @property
    def train_grid(self) -> int:
        """Side of the stored positional tables (16 for 256 px)."""
        return self.train_image_size // self.patch_size

    def replace(self, **changes: Any) -> "TokenizerConfig":
        """A copy with some fields changed; dicts for ``encoder``/``unet``/``vit_decoder`` update
        the nested config (``cfg.replace(unet={"model_channels": 32})``)."""
        for name in ("encoder", "unet", "vit_decoder"):
            if isinstance(changes.get(name), dict):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)


# Official configurations, keyed by canonical modality name.
TOKENIZER_CONFIGS: dict[str, TokenizerConfig] = {
    "S2L2A": TokenizerConfig("S2L2A", 12, IMAGE_LEVELS, "unet"),
    "S1GRD": TokenizerConfig("S1GRD", 2, IMAGE_LEVELS, "unet"),
    "S1RTC": TokenizerConfig("S1RTC", 2, IMAGE_LEVELS, "unet"),
    "DEM": TokenizerConfig("DEM", 1, IMAGE_LEVELS, "unet"),
    "NDVI": TokenizerConfig("NDVI", 1, IMAGE_LEVELS, "unet"),
    "LULC": TokenizerConfig("LULC", 10, LULC_LEVELS, "vit"),
}


def tokenizer_config(modality: str, **changes: Any) -> TokenizerConfig:
    """The official configuration of a modality's tokenizer (case-insensitive name), optionally
    changed (see :meth:`TokenizerConfig.replace`)."""
    key = modality.upper()
    if key not in TOKENIZER_CONFIGS:
        raise ValueError(f"no tokenizer for modality {modality!r}; choose one of {', '.join(TOKENIZER_CONFIGS)}")
    cfg = TOKENIZER_CONFIGS[key]
    return cfg.replace(**changes) if changes else cfg
