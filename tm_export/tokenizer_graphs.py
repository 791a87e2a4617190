"""Graph specs of the FSQ-VAE tokenizers: encoder (image -> codes, ids), one UNet denoising call,
and the LULC ViT decoder. The DDIM loop and FSQ ids -> codes run in numpy in the runtime."""
from __future__ import annotations

import torch

from .graphs import BATCH, GraphSpec, TensorDecl
from .reference.tokenizers import LulcDecoder, Tokenizer, TokenizerEncoder, UNetStep
from .winograd import winograd_copy


def tokenize_graph_name(modality: str) -> str:
    return f"tokenize_{modality}"


def unet_graph_name(modality: str) -> str:
    return f"unet_{modality}"


def detokenize_graph_name(modality: str) -> str:
    return f"detokenize_{modality}"


class DDIMUNetStep(torch.nn.Module):
    """One UNet call plus the DDIM update fused behind it: outputs the unclipped x0 prediction and
    x_prev. ``ddim`` = [sqrt(a_prev), sqrt(1-a_prev), sqrt(a_t), sqrt(1-a_t)] from the numpy
    scheduler; the update is elementwise, and fusing it lets a GPU runtime keep x on the device
    for the whole loop (only these 4 numbers and t cross from the host per step)."""

    def __init__(self, step: UNetStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, quant: torch.Tensor,
                ddim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.step(x_t, t, quant)
        eps = (x_t - ddim[2] * x0) / ddim[3]  # from the unclipped x0, as the scheduler does
        return x0, ddim[0] * x0.clamp(-1.0, 1.0) + ddim[1] * eps


def _codes(batch: int, latent: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    # FSQ codes live in [0, 1]
    return torch.rand(batch, latent, grid, grid, generator=gen)


def tokenizer_specs(name: str, tok: Tokenizer, decoder: bool = True, winograd: int = 0) -> list[GraphSpec]:
    """The encoder graph always (tokenised inputs need only it); the decoder graph with ``decoder``.
    ``winograd`` (2 or 4) traces the UNet's 3x3 convolutions as Winograd F(m x m, 3 x 3) (see
    ``tm_export.winograd``); validation still compares against the direct convolutions."""
    cfg = tok.config
    size, grid, channels, latent = cfg.image_size, cfg.grid, cfg.in_channels, cfg.latent_dim
    specs = []
    encoder: TokenizerEncoder = tok.encoder

    def image_sample(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, channels, size, size, generator=gen),)

    specs.append(GraphSpec(
        name=tokenize_graph_name(name), module=encoder,
        inputs=[TensorDecl("image", "float32", (BATCH, channels, size, size))],
        outputs=[TensorDecl("quant", "float32", (BATCH, latent, grid, grid)),
                 TensorDecl("ids", "int32", (BATCH, grid, grid))],
        sample=image_sample, quantised_outputs=("quant", "ids"), allow_reduced_precision=False,
        extra={"modality": name, "role": "tokenizer_encoder"},
    ))
    if not decoder:
        return specs
    if isinstance(tok.decoder, UNetStep):
        def unet_sample(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            sqrt_a = torch.rand(2, generator=gen) * 0.9 + 0.05  # sqrt(a_prev), sqrt(a_t) in (0, 1)
            ddim = torch.stack([sqrt_a[0], (1 - sqrt_a[0] ** 2).sqrt(), sqrt_a[1], (1 - sqrt_a[1] ** 2).sqrt()])
            return (torch.randn(batch, channels, size, size, generator=gen),
                    torch.randint(0, 1000, (batch,), generator=gen),
                    _codes(batch, latent, grid, gen), ddim)

        reference = DDIMUNetStep(tok.decoder)
        module, extra = reference, {}
        if winograd:
            module, count = winograd_copy(reference, winograd, unet_sample(1, torch.Generator().manual_seed(0)))
            extra = {"winograd": {"tile": winograd, "convolutions": count}}
        specs.append(GraphSpec(
            name=unet_graph_name(name), module=module, reference=reference if winograd else None,
            inputs=[TensorDecl("x_t", "float32", (BATCH, channels, size, size)),
                    TensorDecl("t", "int64", (BATCH,)),
                    TensorDecl("quant", "float32", (BATCH, latent, grid, grid)),
                    TensorDecl("ddim", "float32", (4,))],
            outputs=[TensorDecl("x0", "float32", (BATCH, channels, size, size)),
                     TensorDecl("x_prev", "float32", (BATCH, channels, size, size))],
            sample=unet_sample, extra={"modality": name, "role": "diffusion_step", "prediction": "sample", **extra},
        ))
    else:
        decoder: LulcDecoder = tok.decoder

        def quant_sample(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            return (_codes(batch, latent, grid, gen),)

        specs.append(GraphSpec(
            name=detokenize_graph_name(name), module=decoder,
            inputs=[TensorDecl("quant", "float32", (BATCH, latent, grid, grid))],
            outputs=[TensorDecl("logits", "float32", (BATCH, channels, size, size))],
            sample=quant_sample, extra={"modality": name, "role": "tokenizer_decoder", "argmax_axis": 1},
        ))
    return specs
