"""terratorch's SegmentationHead and RegressionHead, at inference (dropout is the identity).

Layer indices inside ``head`` are terratorch's, so ``model.head.head.<i>.*`` loads as is.
"""
from __future__ import annotations

import torch
from torch import nn


class SegmentationHead(nn.Module):
    """[3x3 conv + ReLU per ``channel_list`` entry], dropout, 1x1 conv to ``num_classes``."""

    def __init__(self, in_channels: int, num_classes: int, channel_list: list[int] | None = None,
                 dropout: float = 0) -> None:
        super().__init__()
        if channel_list is None:
            pre: nn.Module = nn.Identity()
        else:
            sizes = [in_channels, *channel_list]
            pre = nn.Sequential(*(nn.Sequential(nn.Conv2d(a, b, kernel_size=3, padding=1), nn.ReLU())
                                  for a, b in zip(sizes[:-1], sizes[1:])))
            in_channels = sizes[-1]
        self.head = nn.Sequential(pre, nn.Identity(), nn.Conv2d(in_channels, num_classes, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class PixelShuffleUpscale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 4, kernel_size=3, stride=1, padding=1)
        self.upscale = nn.PixelShuffle(2)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.upscale(self.conv(x))))


class RegressionHead(nn.Module):
    """[PixelShuffle x2 upscalers], [conv-BN-ReLU per ``channel_list`` entry], dropout, 1x1 conv,
    final activation. (terratorch ignores ``batch_norm``: its blocks always have BatchNorm.)"""

    def __init__(self, in_channels: int, num_outputs: int = 1, final_act: str | None = None,
                 learned_upscale_layers: int = 0, channel_list: list[int] | None = None, batch_norm: bool = True,
                 dropout: float = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if learned_upscale_layers:
            layers.append(nn.Sequential(*(PixelShuffleUpscale(in_channels) for _ in range(learned_upscale_layers))))
        if channel_list is not None:
            sizes = [in_channels, *channel_list]
            layers.append(nn.Sequential(*(
                nn.Sequential(nn.Conv2d(a, b, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
                for a, b in zip(sizes[:-1], sizes[1:]))))
            in_channels = sizes[-1]
        self.head = nn.Sequential(*layers, nn.Identity(), nn.Conv2d(in_channels, num_outputs, kernel_size=1))
        self.final_act = getattr(nn, final_act)() if final_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.head(x))
