"""The DiVAE diffusion decoder: a guided-diffusion style UNet run on 4x4-patchified images.

Module layout and names follow the checkpoints (``time_embed.{0,2}``, ``input_blocks.k.j``,
``middle_block.j``, ``output_blocks.k.j``, ``out.{0,2}``; inside a ResBlock ``in_layers.{0,2}``,
``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``; inside attention ``norm``, ``qkv``,
``proj_out``). Sequential slots without weights (activations, the p=0 dropout) are kept so the
indices match.

Export choices: attention as two MatMuls (no Einsum), GroupNorm and softmax in float32 (as
upstream), no checkpointing/asserts/type switches. Reshapes take the batch from the tensor (a
symbolic dim in the graph) and every other size as a constant, so the exporter keeps static dims.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back: fp16 variance over 8-16 channels x 3136
    pixels loses too much precision (upstream does the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps t (any shape with N elements), laid out
    [cos(t f), sin(t f)] (cos first) with f_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    # Same expression as upstream so the frequencies are bit-identical (they are folded into a constant).
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1, 1).to(torch.float32) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected timestep embedding, GN-SiLU-conv, plus a (1x1 conv) skip."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Slot 2 is upstream's Dropout(p=0): an identity at inference.
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over all pixels with the legacy head split (heads taken *before* q/k/v:
    qkv channels are laid out [head][q|k|v][ch]). q and k are each scaled by ch^-1/4."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.head_channels = channels // num_heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # (B, C, T)
        qkv = self.qkv(self.norm(flat))
        tokens = qkv.shape[-1]
        ch = self.head_channels
        q, k, v = qkv.reshape(-1, 3 * ch, tokens).split(ch, dim=1)  # each (B*heads, ch, T); -1 = B*heads
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        weights = torch.matmul((q * scale).transpose(1, 2), k * scale)  # (B*heads, T_query, T_key)
        weights = weights.float().softmax(dim=-1).to(weights.dtype)
        out = torch.matmul(v, weights.transpose(1, 2))  # (B*heads, ch, T_query)
        out = self.proj_out(out.reshape(flat.shape[0], self.num_heads * ch, tokens))
        return (flat + out).reshape(x.shape)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """UNet on (B, in_channels, h, w) conditioned on timesteps; widths model_channels*mult per level."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * cfg.time_embed_mult
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def stage(ch_in: int, ch_out: int, ds: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(ch_in, ch_out, emb_dim, groups)]
            if ds in cfg.attention_resolutions:
                layers.append(AttentionBlock(ch_out, cfg.num_heads, groups))
            return layers

        ch = mc * cfg.channel_mult[0]
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]  # width of every input-block output, consumed LIFO by the output blocks
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(EmbedSequential(*stage(ch, mc * mult, ds)))
                ch = mc * mult
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(
            ResBlock(ch, ch, emb_dim, groups), AttentionBlock(ch, cfg.num_heads, groups),
            ResBlock(ch, ch, emb_dim, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = stage(ch + skip_channels.pop(), mc * mult, ds)
                ch = mc * mult
                if level and i == cfg.num_res_blocks:  # last block of every level but the top one
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        # Slot 1 is the activation; upstream zero-initialises the final conv (a checkpoint overwrites it).
        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, h, w), t (B,) / (1,) / () -> (B, out_channels, h, w)."""
        emb_in = timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb_in)  # (B or 1, emb_dim): a single timestep broadcasts over the batch
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class PatchedUNet(UNet):
    """The DiVAE decoder: x_t (B, C, H, W) is folded into (B, C*p*p, H/p, W/p) pixels-to-channels
    (channel-major, then row, then column within the patch), the FSQ codes (B, D, h, w) are
    nearest-upsampled to H/p x W/p and concatenated, and the UNet output is unfolded back."""

    def __init__(self, channels: int, cond_channels: int, image_size: int, cfg: UNetConfig) -> None:
        p = cfg.patch_size
        super().__init__(channels * p * p + cond_channels, channels * p * p, cfg)
        self.channels = channels
        self.patch_size = p
        self.side = image_size // p  # static: one graph per image size

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, c, p, n = x_t.shape[0], self.channels, self.patch_size, self.side
        x = x_t.reshape(b, c, n, p, n, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, n, n)
        cond = F.interpolate(cond.to(x.dtype), size=(n, n), mode="nearest")
        x = super().forward(torch.cat([x, cond], dim=1), t)
        return x.reshape(b, c, p, p, n, n).permute(0, 1, 4, 2, 5, 3).reshape(b, c, n * p, n * p)
