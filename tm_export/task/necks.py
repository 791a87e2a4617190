"""terratorch's tensor-only necks, written for export: static shapes, no Python branching on data.

Each neck maps a list of features to a list of features and knows how it changes the channel
list (``channels``), as terratorch's ``Neck.process_channel_list`` does. Module and parameter
names are terratorch's, so a fine-tuned ``model.neck.<i>.*`` state_dict loads as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NeckSpec, TaskConfigError, int_list, is_positive_int

Features = list[torch.Tensor]


class SelectIndices(nn.Module):
    def __init__(self, channels: list[int], indices: list[int]) -> None:
        super().__init__()
        n = len(channels)
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise TaskConfigError(f"SelectIndices.indices: {bad} out of range for {n} backbone layers")
        self.indices = [i % n for i in indices]
        self.channels = [channels[i] for i in self.indices]

    def forward(self, features: Features) -> Features:
        return [features[i] for i in self.indices]


class ReshapeTokensToImage(nn.Module):
    """(B, h*w, C) tokens -> (B, C, h, w) maps; image features pass through.

    TerraMind has no CLS token: with ``remove_cls_token`` upstream finds that h*w - 1 tokens do not
    form a grid and keeps them all (with a warning), which is what this does.
    """

    def __init__(self, channels: list[int], grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.channels = list(channels)

    def forward(self, features: Features) -> Features:
        h, w = self.grid
        return [x if x.dim() >= 4 else x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w) for x in features]


class LearnedInterpolateToPyramidal(nn.Module):
    """Four maps at one scale -> x4, x2, x1, x0.5 with transposed convolutions and a max-pool."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        if len(channels) != 4:
            raise TaskConfigError(f"LearnedInterpolateToPyramidal needs exactly 4 features, got {len(channels)} "
                                  "(select four layers with SelectIndices first)")
        c0, c1 = channels[0], channels[1]
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(c0, c0 // 2, 2, 2), nn.BatchNorm2d(c0 // 2), nn.GELU(),
                                  nn.ConvTranspose2d(c0 // 2, c0 // 4, 2, 2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(c1, c1 // 2, 2, 2))
        self.fpn3 = nn.Sequential(nn.Identity())
        self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
        self.channels = [c0 // 4, c1 // 2, channels[2], channels[3]]

    def forward(self, features: Features) -> Features:
        return [self.fpn1(features[0]), self.fpn2(features[1]), self.fpn3(features[2]), self.fpn4(features[3])]


class InterpolateToPyramidal(nn.Module):
    def __init__(self, channels: list[int], scale_factor: int = 2, mode: str = "nearest") -> None:
        super().__init__()
        self.scale_factor, self.mode = scale_factor, mode
        self.channels = list(channels)

    def forward(self, features: Features) -> Features:
        n = len(features)
        return [F.interpolate(x, scale_factor=self.scale_factor ** (n - i), mode=self.mode)
                for i, x in enumerate(features)]


class MaxpoolToPyramidal(nn.Module):
    def __init__(self, channels: list[int], kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.channels = list(channels)

    def forward(self, features: Features) -> Features:
        return [x if i == 0 else F.max_pool2d(x, kernel_size=self.kernel_size ** i) for i, x in enumerate(features)]


class AddBottleneckLayer(nn.Module):
    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.bottleneck = nn.Conv2d(channels[-1], channels[-1] // 2, kernel_size=1)
        self.channels = [*channels, channels[-1] // 2]

    def forward(self, features: Features) -> Features:
        return [*features, self.bottleneck(features[-1])]


class PermuteDims(nn.Module):
    def __init__(self, channels: list[int], new_order: list[int]) -> None:
        super().__init__()
        self.new_order = list(new_order)
        self.channels = list(channels)

    def forward(self, features: Features) -> Features:
        return [x.permute(*self.new_order) for x in features]


def build_neck(spec: NeckSpec, channels: list[int], grid: tuple[int, int], position: int) -> nn.Module:
    """One neck from its config entry; every error names ``necks[position]`` and, where it can,
    the argument (a wrongly typed value too, not only the checks below)."""
    where = f"model.init_args.model_args.necks[{position}]"
    try:
        return _build_neck(spec, dict(spec.args), channels, grid, where)
    except TaskConfigError as exc:
        message = str(exc)
        if message.startswith("model."):
            raise
        own = f"{spec.name}."  # the neck classes' own messages: "SelectIndices.indices: ..."
        raise TaskConfigError(f"{where}.{message[len(own):]}" if message.startswith(own) else f"{where}: {message}") \
            from exc
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise TaskConfigError(f"{where}: {spec.name} with {dict(spec.args)} failed ({type(exc).__name__}: {exc})") \
            from exc


def _int_arg(args: dict, key: str, default: int, where: str) -> int:
    value = args.get(key, default)
    if not is_positive_int(value):
        raise TaskConfigError(f"{where}.{key}: expected a positive integer, got {value!r}")
    return value


def _index_list(args: dict, key: str, name: str, where: str) -> list[int]:
    if key not in args:
        raise TaskConfigError(f"{where}.{key}: {name} needs {key}")
    return int_list(args[key], f"{where}.{key}")


def _build_neck(spec: NeckSpec, args: dict, channels: list[int], grid: tuple[int, int], where: str) -> nn.Module:
    if spec.name == "SelectIndices":
        return SelectIndices(channels, _index_list(args, "indices", spec.name, where))
    if spec.name == "ReshapeTokensToImage":
        if args.get("effective_time_dim", 1) != 1:
            raise TaskConfigError(f"{where}.effective_time_dim: only 1 is supported (TerraMind's tokens are one grid)")
        if args.get("temporal_inputs", False):
            raise TaskConfigError(f"{where}.temporal_inputs: not supported (use backbone_use_temporal)")
        h = args.get("h")
        if h is not None and h != grid[0]:
            raise TaskConfigError(f"{where}.h: {h} does not match the {grid[0]}x{grid[1]} token grid")
        return ReshapeTokensToImage(channels, grid)
    if spec.name == "LearnedInterpolateToPyramidal":
        return LearnedInterpolateToPyramidal(channels)
    if spec.name == "InterpolateToPyramidal":
        mode = args.get("mode", "nearest")
        if mode not in ("nearest", "bilinear"):
            raise TaskConfigError(f"{where}.mode: {mode!r} is not supported (nearest, bilinear)")
        return InterpolateToPyramidal(channels, _int_arg(args, "scale_factor", 2, where), mode)
    if spec.name == "MaxpoolToPyramidal":
        return MaxpoolToPyramidal(channels, _int_arg(args, "kernel_size", 2, where))
    if spec.name == "AddBottleneckLayer":
        return AddBottleneckLayer(channels)
    if spec.name == "PermuteDims":
        return PermuteDims(channels, _index_list(args, "new_order", spec.name, where))
    raise TaskConfigError(f"{where}.name: {spec.name!r} is not supported")
