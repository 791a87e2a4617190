"""3x3 convolutions as Winograd F(m x m, 3 x 3), for ONNX Runtime on CPUs (``tm-export --winograd``).

A direct 3x3 convolution spends 9 multiply-adds per output pixel, input and output channel; Winograd's
minimal filtering spends (m+2)^2 / m^2 of them per output pixel on (m+2)^2 independent channel
GEMMs, plus cheap per-channel transforms: 4 for m=2 (2.25x fewer), 2.25 for m=4 (4x fewer).
MLAS has no Winograd kernel, so the graph spells it out with ops it runs well:

    pad -> grouped stride-m conv with the fixed (m+2)x(m+2) input transform B^T d B (per channel)
        -> (m+2)^2 batched MatMuls with the pre-transformed weights G g G^T
        -> one MatMul with the fixed output transform A^T M A, then tiles back in place (+ bias)

The transforms are exact linear maps; only rounding differs from the direct convolution (m=4's
larger transform coefficients cost about one more decimal digit in fp32: ~1e-5 relative per conv).
GPU runtimes pick Winograd or not themselves (cuDNN, TensorRT): do not use this for GPU exports.
"""
from __future__ import annotations

import copy
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

# (B^T, G, A^T) of Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).
_TRANSFORMS: dict[int, tuple[list, list, list]] = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
TILE_SIZES = tuple(_TRANSFORMS)


class _DepthToSpaceDCR(torch.autograd.Function):
    """(B, r*r*C, H, W) -> (B, C, H*r, W*r), channels ordered (row offset, column offset, channel).

    Exported as ONNX DepthToSpace(mode=DCR): ONNX Runtime runs it ~10x faster than the equivalent
    6-D Transpose, which is what tracing the reshape/permute would give."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int) -> torch.Tensor:  # noqa: ARG004 - autograd signature
        b, c, h, w = x.shape
        y = x.reshape(b, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(b, c // (block * block), h * block, w * block)

    @staticmethod
    def symbolic(g, x, block: int):
        return g.op("DepthToSpace", x, blocksize_i=block, mode_s="DCR")


class _BroadcastMatMul(torch.autograd.Function):
    """``torch.matmul(u, v)`` for u (P, 1, K, C) and v (P, B, C, T), exported as the one ONNX
    MatMul it is. torch's own matmul copies u once per batch row to broadcast it, and the ONNX
    tracer keeps every such copy alive until the trace ends (B x the transformed weights: 3.4 GB
    for an official UNet at the trace's batch of 2); this runs one matmul per row instead."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd signature
        return torch.stack([torch.matmul(u[:, 0], v[:, b]) for b in range(v.shape[1])], dim=1)

    @staticmethod
    def symbolic(g, u, v):
        return g.op("MatMul", u, v)


class WinogradConv2d(nn.Module):
    """Drop-in for a 3x3, stride 1, padding 1, ungrouped ``nn.Conv2d`` (weights taken at
    construction: build it after loading the checkpoint). Spatial sizes are read as constants at
    trace time (exports are static per image size); batch stays symbolic. Measured on ONNX Runtime
    CPU (2 threads), m=4 against the direct convolution: 2x at 28x28 with 512 channels, 1.5x at
    56x56, 1.05x at 14x14, 0.4x at 7x7 (hence ``min_size``)."""

    def __init__(self, conv: nn.Conv2d, tile: int = 4, min_size: int = 14) -> None:
        super().__init__()
        if not is_winograd_eligible(conv):
            raise ValueError(f"Winograd needs a 3x3, stride 1, padding 1, ungrouped convolution, got {conv}")
        if tile not in _TRANSFORMS:
            raise ValueError(f"Winograd tile must be one of {TILE_SIZES}, got {tile}")
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in _TRANSFORMS[tile])
        n = tile + 2
        weight = conv.weight.detach().to(torch.float64)
        out_channels, in_channels = weight.shape[:2]
        # U[a, b] = G g G^T per (out, in) channel pair, laid out for one batched MatMul per (a, b).
        u = torch.einsum("au,kcuv,bv->abkc", g, weight, g).reshape(n * n, 1, out_channels, in_channels)
        del weight
        # Buffers, and persistent ones: the ONNX exporter takes these as initializers (which
        # tm_export.streaming saves without a copy), non-persistent ones as Constant nodes inside
        # the graph's protobuf.
        self.register_buffer("u", u.to(torch.float32))
        del u
        input_kernel = torch.einsum("au,bv->abuv", bt, bt).reshape(n * n, 1, n, n)
        self.register_buffer("input_kernel", input_kernel.repeat(in_channels, 1, 1, 1).float())
        # Y (m*m outputs) = (A^T kron A^T) M (n*n values) per tile and output channel: one small GEMM.
        self.register_buffer("output_matrix", torch.einsum("pa,qb->pqab", at, at).reshape(tile * tile, n * n).float())
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(out_channels)
        self.register_buffer("bias", bias.float().reshape(1, -1, 1, 1))
        self.tile, self.in_channels, self.out_channels = tile, in_channels, out_channels
        # Below min_size x min_size pixels the (m+2)^2/9 times larger weights cost more to stream
        # than the saved multiplications: such maps keep the direct convolution (decided at trace time).
        self.min_size = min_size
        self.register_buffer("weight", conv.weight.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, n = self.tile, self.tile + 2
        batch = x.shape[0]
        height, width = int(x.shape[-2]), int(x.shape[-1])  # static per export
        if min(height, width) < self.min_size:
            return F.conv2d(x, self.weight, self.bias.flatten(), padding=1)
        rows, cols = (height + m - 1) // m, (width + m - 1) // m
        exact = height == m * rows and width == m * cols
        # (B, C*n*n, rows, cols): channel c's n*n transformed values of every tile. Where m divides
        # the map, the convolution's own symmetric padding is the tiles' padding (no Pad node, no
        # final Slice: ~5% of a UNetDecoder head's time on ONNX Runtime).
        if exact:
            v = F.conv2d(x, self.input_kernel, stride=m, padding=1, groups=self.in_channels)
        else:
            padded = F.pad(x, (1, 1 + m * cols - width, 1, 1 + m * rows - height))
            v = F.conv2d(padded, self.input_kernel, stride=m, groups=self.in_channels)
        v = v.reshape(batch, self.in_channels, n * n, rows * cols).permute(2, 0, 1, 3)
        prod = _BroadcastMatMul.apply(self.u, v)  # (n*n, B, K, tiles)
        y = torch.matmul(self.output_matrix, prod.reshape(n * n, -1))  # (m*m, B*K*tiles)
        # batch first (contiguous K*tiles blocks move), then the tiles' m x m outputs into place
        y = y.reshape(m * m, batch, self.out_channels * rows * cols).transpose(0, 1)
        y = _DepthToSpaceDCR.apply(y.reshape(batch, m * m * self.out_channels, rows, cols), m)
        return (y if exact else y[:, :, :height, :width]) + self.bias


def is_winograd_eligible(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1)


def use_winograd(module: nn.Module, tile: int = 4, min_channels: int = 64,
                 input_sizes: dict[str, int] | None = None, min_size: int = 14, _prefix: str = "") -> int:
    """Replace, in place, every eligible 3x3 convolution with at least ``min_channels`` input and
    output channels (the thin stem/output convolutions gain nothing) by ``WinogradConv2d``.
    With ``input_sizes`` (qualified name -> smaller side of its input, see ``conv_input_sizes``),
    convolutions on maps under ``min_size`` stay as they are (``WinogradConv2d`` would run them
    directly anyway, after computing transformed weights it never uses). Returns how many were
    replaced."""
    count = 0
    for name, child in list(module.named_children()):
        qualified = _prefix + name
        if is_winograd_eligible(child) and min(child.in_channels, child.out_channels) >= min_channels:
            if input_sizes is None or input_sizes.get(qualified, min_size) >= min_size:
                setattr(module, name, WinogradConv2d(child, tile, min_size))
                count += 1
        else:
            count += use_winograd(child, tile, min_channels, input_sizes, min_size, qualified + ".")
    return count


def _tensors(module: nn.Module):
    return chain(module.parameters(), module.buffers())


def conv_input_sizes(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int] | None:
    """The smaller spatial side of every Conv2d's input when ``module`` runs on ``inputs``, found
    by running a copy of it on the meta device (shapes only: no weights, no arithmetic); None
    where that copy cannot run."""
    memo = {}
    for t in _tensors(module):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    try:
        shadow = copy.deepcopy(module, memo)
        sizes: dict[str, int] = {}
        def record(name: str):
            def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                sizes[name] = min(args[0].shape[-2:])
            return hook

        for name, child in shadow.named_modules():
            if isinstance(child, nn.Conv2d):
                child.register_forward_hook(record(name))
        with torch.no_grad():
            shadow(*(x.to("meta") for x in inputs))
    except Exception:  # an op without a meta kernel: the caller replaces every eligible convolution
        return None
    return sizes


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential``
    into that convolution (new tensors: the originals, possibly shared with another module, are not
    touched); the norm becomes ``nn.Identity``. ONNX Runtime fuses Conv + BatchNormalization
    itself, but not once the convolution is a Winograd subgraph. Returns how many were folded."""
    count = 0
    # Only plain modules: a Sequential subclass may not run its children in order, and a Conv2d or
    # BatchNorm2d subclass may compute something else than the module rebuilt here.
    for seq in [m for m in module.modules() if type(m).forward is nn.Sequential.forward]:
        children = list(seq.children())
        for i, (conv, norm) in enumerate(zip(children, children[1:])):
            if not (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d
                    and not norm.training and norm.running_mean is not None):
                continue
            with torch.no_grad():  # in float64, then back to the convolution's dtype
                var, mean = norm.running_var.double(), norm.running_mean.double()
                scale = (norm.weight.double() if norm.affine else 1.0) / torch.sqrt(var + norm.eps)
                shift = norm.bias.double() if norm.affine else 0.0
                bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
                folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                   conv.dilation, conv.groups, padding_mode=conv.padding_mode, device="meta")
                dtype = conv.weight.dtype
                folded.weight = nn.Parameter((conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(dtype),
                                             requires_grad=False)
                folded.bias = nn.Parameter(((bias - mean) * scale + shift).to(dtype), requires_grad=False)
            seq[i], seq[i + 1] = folded, nn.Identity()
            children[i + 1] = seq[i + 1]
            count += 1
    return count


def winograd_copy(module: nn.Module, tile: int, inputs: tuple[torch.Tensor, ...],
                  min_channels: int = 64) -> tuple[nn.Module, int]:
    """A copy of ``module`` whose eligible 3x3 convolutions (on maps the size of ``inputs``') are
    ``WinogradConv2d``, each with the BatchNorm after it folded in; it shares every other tensor
    with ``module`` (no copy of the weights), so only the folded and transformed convolution weights
    are new. Returns it and how many convolutions were replaced."""
    sizes = conv_input_sizes(module, inputs)
    rewrite = copy.deepcopy(module, {id(t): t for t in _tensors(module)})
    fold_batchnorm(rewrite)
    return rewrite, use_winograd(rewrite, tile, min_channels, input_sizes=sizes)
