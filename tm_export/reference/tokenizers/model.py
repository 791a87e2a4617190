"""Export-ready tokenizer units, each with the checkpoint's own key names.

* :class:`TokenizerEncoder` -- ``encoder.*``, ``quant_proj.*``: standardised image -> FSQ codes + ids.
* :class:`UNetStep` -- ``decoder.*`` (DiVAE tokenizers): one denoising call, x_t -> predicted x0.
* :class:`LulcDecoder` -- ``post_quant_proj.*``, ``decoder.*`` (LULC): codes -> class logits.

The key sets are disjoint and together are exactly an official ``TerraMind_Tokenizer_<MOD>.pt``;
:func:`load_tokenizer` splits such a state_dict over the units and loads each strictly. The
diffusion loop and the DDIM update are not here: they run outside the graphs (tm_runtime.scheduler).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import TokenizerConfig, tokenizer_config
from .fsq import FiniteScalarQuantizer
from .unet import PatchedUNet
from .vit import ViTDecoder, ViTEncoder


class TokenizerEncoder(nn.Module):
    """Standardised image (B, C, H, W) -> codes (B, 5, H/16, W/16) float32, ids (B, H/16, W/16) int32.

    :meth:`forward_class_map` is the separate entry point for class maps (LULC), instead of
    upstream's branch on the input shape.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config.encoder, config.in_channels, config.patch_size, config.train_grid, config.grid)
        self.quant_proj = nn.Conv2d(config.encoder.dim, config.latent_dim, 1)
        self.quantize = FiniteScalarQuantizer(config.levels)

    def latent(self, image: torch.Tensor) -> torch.Tensor:
        """The pre-quantisation latent (B, 5, h, w) (useful to diagnose rounding ties)."""
        return self.quant_proj(self.encoder(image))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(self.latent(image))

    def one_hot(self, class_map: torch.Tensor) -> torch.Tensor:
        """Class map (B, H, W) or (B, 1, H, W) of class indices -> one-hot (B, C, H, W) float32.

        Built from an Equal against 0..C-1 (every runtime has it; ONNX OneHot is less portable).
        Indices outside 0..C-1 give an all-zero pixel, where upstream's F.one_hot would raise.
        Float maps are truncated to integers first, as upstream's ``.long()`` does.
        """
        if class_map.dim() == 4:  # rank is static per graph, so this is no data-dependent branch
            class_map = class_map[:, 0]
        classes = torch.arange(self.config.in_channels, device=class_map.device).view(1, -1, 1, 1)
        return (class_map.to(torch.int64).unsqueeze(1) == classes).to(torch.float32)

    def forward_class_map(self, class_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class map (B, H, W) or (B, 1, H, W) -> codes, ids (see :meth:`one_hot`)."""
        return TokenizerEncoder.forward(self, self.one_hot(class_map).to(self.quant_proj.weight.dtype))


class ClassMapEncoder(TokenizerEncoder):
    """The class-map entry point of a :class:`TokenizerEncoder` as a module of its own, to export
    it as its own graph: class map (B, H, W) or (B, 1, H, W) -> codes, ids. It shares (does not
    copy) the encoder's submodules, so its keys are the checkpoint's too."""

    def __init__(self, encoder: TokenizerEncoder) -> None:
        nn.Module.__init__(self)
        self.config = encoder.config
        self.encoder = encoder.encoder
        self.quant_proj = encoder.quant_proj
        self.quantize = encoder.quantize

    def forward(self, class_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.forward_class_map(class_map)


class UNetStep(nn.Module):
    """One call of the DiVAE decoder: x_t (B, C, H, W), t (B,), (1,) or () int64/float, codes
    (B, 5, H/16, W/16) -> predicted (unclipped) x0 (B, C, H, W), standardised units."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        if config.decoder != "unet":
            raise ValueError(f"the {config.modality} tokenizer has no diffusion decoder")
        self.config = config
        self.decoder = PatchedUNet(config.in_channels, config.latent_dim, config.image_size, config.unet)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int | float, quant: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):  # Python number: a constant of the trace
            t = torch.tensor(t, device=x_t.device)
        return self.decoder(x_t, t, quant)


class LulcDecoder(nn.Module):
    """Codes (B, 5, h, w) -> class logits (B, 10, 16h, 16w), in one pass."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        if config.decoder != "vit":
            raise ValueError(f"the {config.modality} tokenizer has no ViT decoder")
        self.config = config
        self.post_quant_proj = nn.Conv2d(config.latent_dim, config.vit_decoder.dim, 1)
        self.decoder = ViTDecoder(config.vit_decoder, config.in_channels, config.patch_size, config.train_grid,
                                  config.grid)

    def forward(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_proj(quant))


@dataclass
class Tokenizer:
    """A loaded tokenizer: its encoder unit and its decoder unit (UNetStep or LulcDecoder)."""

    config: TokenizerConfig
    encoder: TokenizerEncoder
    decoder: UNetStep | LulcDecoder

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint key space (the two units' keys are disjoint)."""
        return {**self.encoder.state_dict(), **self.decoder.state_dict()}

    def eval(self) -> "Tokenizer":
        self.encoder.eval()
        self.decoder.eval()
        return self


class TokenizerLoadError(ValueError):
    """A state_dict does not fit the tokenizer architecture."""


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """A randomly initialised tokenizer (eval mode)."""
    decoder = UNetStep(config) if config.decoder == "unet" else LulcDecoder(config)
    return Tokenizer(config, TokenizerEncoder(config), decoder).eval()


def _describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
            problems.append(f"{len(keys)} {title}: {shown}")
    return problems


def load_tokenizer(
    modality: str, state_dict: Mapping[str, torch.Tensor], config: TokenizerConfig | None = None
) -> Tokenizer:
    """Build the ``modality`` tokenizer (official configuration unless ``config`` is given) and load
    ``state_dict`` (keys as in ``TerraMind_Tokenizer_<MOD>.pt``) strictly.

    Raises :class:`TokenizerLoadError` naming every missing or unexpected key and shape mismatch.
    """
    config = config or tokenizer_config(modality)
    if config.modality.upper() != modality.upper():
        raise TokenizerLoadError(f"config is for {config.modality}, not {modality}")
    tok = build_tokenizer(config)
    expected = tok.state_dict()
    problems = _describe_mismatch(expected, state_dict)
    if problems:
        raise TokenizerLoadError(f"{modality} tokenizer state_dict does not fit: " + "; ".join(problems))
    for unit in (tok.encoder, tok.decoder):
        own = unit.state_dict()
        unit.load_state_dict({k: state_dict[k] for k in own}, strict=True)
    return tok
