"""terratorch's UNetDecoder, UperNetDecoder, FCNDecoder and IdentityDecoder, written for export.

Parameter names follow terratorch (and, for the UNet, segmentation_models_pytorch inside it), so
``model.decoder.*`` of a fine-tuned checkpoint loads as is. Feature sizes are static per export,
which lets adaptive pooling become two constant matrices (ONNX has no adaptive pooling for sizes
that do not divide the input).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import TaskConfigError

Features = list[torch.Tensor]
WHERE = "model.init_args.model_args"


# ---- UNet (terratorch.models.decoders.UNetDecoder around smp's UnetDecoder) ----
def _norm(kind: object, channels: int) -> nn.Module:
    if kind is True or kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind is False or kind == "identity":
        return nn.Identity()
    raise TaskConfigError(f"{WHERE}.decoder_use_batchnorm: {kind!r} is not supported (batchnorm, identity, "
                          "true, false)")


class ConvNormReLU(nn.Sequential):
    """smp's Conv2dReLU: 3x3 convolution (biased only without a norm), norm, ReLU."""

    def __init__(self, cin: int, cout: int, norm: object) -> None:
        layer = _norm(norm, cout)
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=isinstance(layer, nn.Identity)), layer, nn.ReLU())


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (smp's SCSEModule)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.cSE = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(),
                                 nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())
        self.sSE = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cSE(x) + x * self.sSE(x)


class Attention(nn.Module):
    def __init__(self, kind: str | None, channels: int) -> None:
        super().__init__()
        if kind is None:
            self.attention = nn.Identity()
        elif kind == "scse":
            self.attention = SCSE(channels)
        else:
            raise TaskConfigError(f"{WHERE}.decoder_attention_type: {kind!r} is not supported (None, 'scse')")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


class UnetBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int, norm: object, attention: str | None) -> None:
        super().__init__()
        self.conv1 = ConvNormReLU(cin + skip, cout, norm)
        self.attention1 = Attention(attention, cin + skip)
        self.conv2 = ConvNormReLU(cout, cout, norm)
        self.attention2 = Attention(attention, cout)

    def forward(self, x: torch.Tensor, size: tuple[int, int], skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))
        return self.attention2(self.conv2(self.conv1(x)))


class UnetCore(nn.Module):
    """smp's UnetDecoder without a center block: from the deepest map up, each block upsamples
    (nearest) to the next skip's size, concatenates it, and applies two conv-norm-ReLUs."""

    def __init__(self, encoder_channels: list[int], channels: list[int], norm: object, attention: str | None) -> None:
        super().__init__()
        deep_first = encoder_channels[1:][::-1]
        ins = [deep_first[0], *channels[:-1]]
        skips = [*deep_first[1:], 0]
        self.blocks = nn.ModuleList(UnetBlock(i, s, o, norm, attention) for i, s, o in zip(ins, skips, channels))

    def forward(self, features: Features) -> torch.Tensor:
        sizes = [tuple(f.shape[2:]) for f in features][::-1]
        deep_first = features[1:][::-1]
        x, skips = deep_first[0], deep_first[1:]
        for i, block in enumerate(self.blocks):
            x = block(x, sizes[i + 1], skips[i] if i < len(skips) else None)
        return x


class UNetDecoder(nn.Module):
    def __init__(self, embed_dim: list[int], channels: list[int], use_batchnorm: object = "batchnorm",
                 attention_type: str | None = None) -> None:
        super().__init__()
        if len(embed_dim) != len(channels):
            raise TaskConfigError(f"{WHERE}.decoder_channels: {len(channels)} channels for {len(embed_dim)} features "
                                  "(UNetDecoder needs one per feature)")
        # terratorch repeats the first feature: smp's decoder drops its first (full-size) skip.
        self.decoder = UnetCore([embed_dim[0], *embed_dim], list(channels), use_batchnorm, attention_type)
        self.out_channels = channels[-1]

    def forward(self, features: Features) -> torch.Tensor:
        return self.decoder([features[0], *features])


# ---- UperNet (terratorch.models.decoders.UperNetDecoder) ----
class ConvModule(nn.Sequential):
    """Bias-free convolution, BatchNorm, ReLU (terratorch's ConvModule, not transposed). A named
    Sequential: the checkpoint's ``conv.*``/``norm.*`` keys load as they are, and the Winograd
    rewrite (``tm_export.winograd.fold_batchnorm``) sees the norm that follows the convolution."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__(OrderedDict(conv=nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False),
                                     norm=nn.BatchNorm2d(cout), act=nn.ReLU()))


def adaptive_pool_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) averaging weights of adaptive average pooling along one axis: cell i
    averages [floor(i*in/out), ceil((i+1)*in/out))."""
    m = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, math.ceil((i + 1) * size_in / size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AdaptiveAvgPool(nn.Module):
    """Adaptive average pooling as two matmuls with constant matrices (the region is a rectangle,
    so its mean is separable); identical to ``nn.AdaptiveAvgPool2d`` for a known input size."""

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = adaptive_pool_matrix(int(x.shape[-2]), self.output_size).to(x.dtype)
        cols = adaptive_pool_matrix(int(x.shape[-1]), self.output_size).to(x.dtype)
        return rows @ x @ cols.T


class PPM(nn.ModuleList):
    def __init__(self, pool_scales: list[int], cin: int, channels: int, align_corners: bool) -> None:
        super().__init__(nn.Sequential(AdaptiveAvgPool(s), ConvModule(cin, channels, 1)) for s in pool_scales)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> Features:
        return [F.interpolate(ppm(x), size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)
                for ppm in self]


class UperNetDecoder(nn.Module):
    def __init__(self, embed_dim: list[int], pool_scales: list[int] = (1, 2, 3, 6), channels: int = 256,
                 align_corners: bool = True, scale_modules: bool = False) -> None:
        super().__init__()
        self.scale_modules = scale_modules
        if scale_modules:
            if len(embed_dim) != 4:
                raise TaskConfigError(f"{WHERE}.decoder_scale_modules: needs exactly 4 features, got {len(embed_dim)}")
            c0, c1 = embed_dim[0], embed_dim[1]
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(c0, c0 // 2, 2, 2), nn.BatchNorm2d(c0 // 2), nn.GELU(),
                                      nn.ConvTranspose2d(c0 // 2, c0 // 4, 2, 2))
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(c1, c1 // 2, 2, 2))
            self.fpn3 = nn.Sequential(nn.Identity())
            self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
            embed_dim = [c0 // 4, c1 // 2, embed_dim[2], embed_dim[3]]
        self.out_channels = channels
        self.align_corners = align_corners
        self.psp_modules = PPM(list(pool_scales), embed_dim[-1], channels, align_corners)
        self.bottleneck = ConvModule(embed_dim[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in embed_dim[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in embed_dim[:-1])
        self.fpn_bottleneck = ConvModule(len(embed_dim) * channels, channels, 3, padding=1)

    def forward(self, features: Features) -> torch.Tensor:
        if self.scale_modules:
            features = [self.fpn1(features[0]), self.fpn2(features[1]), self.fpn3(features[2]),
                        self.fpn4(features[3])]
        top = features[-1]
        laterals = [conv(features[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="bilinear", align_corners=self.align_corners)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=self.align_corners)
                            for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))


# ---- FCN (terratorch.models.decoders.FCNDecoder) ----
class Norm2d(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FCNDecoder(nn.Module):
    """``num_convs`` x (2x transposed conv, 3x3 conv, channel LayerNorm, GELU) on one feature."""

    def __init__(self, embed_dim: list[int], channels: int = 256, num_convs: int = 4, in_index: int = -1) -> None:
        super().__init__()
        if num_convs < 1:
            raise TaskConfigError(f"{WHERE}.decoder_num_convs: must be at least 1, got {num_convs}")
        self.in_index = in_index
        cin = embed_dim[in_index]
        self.convs = nn.Sequential(*(
            nn.Sequential(nn.ConvTranspose2d(cin if i == 0 else channels, channels, kernel_size=2, stride=2),
                          nn.Conv2d(channels, channels, kernel_size=3, padding=1), Norm2d(channels), nn.GELU())
            for i in range(num_convs)))
        self.out_channels = channels

    def forward(self, features: Features) -> torch.Tensor:
        return self.convs(features[self.in_index])


class IdentityDecoder(nn.Module):
    def __init__(self, embed_dim: list[int], out_index: int = -1) -> None:
        super().__init__()
        self.out_index = out_index
        self.out_channels = embed_dim[out_index]

    def forward(self, features: Features) -> torch.Tensor:
        return features[self.out_index]


DECODER_CLASSES = {"UNetDecoder": UNetDecoder, "UperNetDecoder": UperNetDecoder, "FCNDecoder": FCNDecoder,
                   "IdentityDecoder": IdentityDecoder}


def build_decoder(name: str, channels: list[int], args: dict) -> nn.Module:
    try:
        return DECODER_CLASSES[name](channels, **args)
    except TaskConfigError:
        raise
    except (TypeError, ValueError, IndexError, KeyError) as exc:  # a wrongly typed or out-of-range argument
        keys = ", ".join(f"decoder_{k}" for k in args) or "decoder"
        raise TaskConfigError(f"{WHERE}.{keys}: {name} with {args} failed on backbone features of "
                              f"{channels} channels ({type(exc).__name__}: {exc})") from exc
