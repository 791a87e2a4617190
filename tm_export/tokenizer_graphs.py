"""Graph specs of the FSQ-VAE tokenizers: encoder (image -> codes, ids), one UNet denoising call,
and the LULC ViT decoder. The DDIM loop and FSQ ids -> codes run in numpy in the runtime."""
from __future__ import annotations

import torch

from .graphs import BATCH, GraphSpec, TensorDecl
from .reference.tokenizers import LulcDecoder, Tokenizer, TokenizerEncoder, UNetStep


def tokenize_graph_name(modality: str) -> str:
    return f"tokenize_{modality}"


def unet_graph_name(modality: str) -> str:
    return f"unet_{modality}"


def detokenize_graph_name(modality: str) -> str:
    return f"detokenize_{modality}"


def _codes(batch: int, latent: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    # FSQ codes live in [0, 1]
    return torch.rand(batch, latent, grid, grid, generator=gen)


def tokenizer_specs(name: str, tok: Tokenizer, decoder: bool = True) -> list[GraphSpec]:
    """The encoder graph always (tokenised inputs need only it); the decoder graph with ``decoder``."""
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
            return (torch.randn(batch, channels, size, size, generator=gen),
                    torch.randint(0, 1000, (batch,), generator=gen),
                    _codes(batch, latent, grid, gen))

        specs.append(GraphSpec(
            name=unet_graph_name(name), module=tok.decoder,
            inputs=[TensorDecl("x_t", "float32", (BATCH, channels, size, size)),
                    TensorDecl("t", "int64", (BATCH,)),
                    TensorDecl("quant", "float32", (BATCH, latent, grid, grid))],
            outputs=[TensorDecl("x0", "float32", (BATCH, channels, size, size))],
            sample=unet_sample, extra={"modality": name, "role": "diffusion_step", "prediction": "sample"},
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
