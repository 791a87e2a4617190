"""TerraMind v1 variants and the encoder side of the enc-dec model, in the checkpoint key space.

Only the modules an export needs are built (the embeddings of the chosen modalities, the
encoder, its norm); their ``state_dict`` keys are the official checkpoint's keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tm_runtime.modalities import COORDS, get_modality, get_target, is_coords

from .decoder import (ImageTokenDecoderEmbedding, build_decoder_blocks, build_decoder_norm, decode_hidden, decode_logits,
                      head_logits, image_queries)
from .embeddings import ImageEncoderEmbedding, ImageTokenEncoderEmbedding
from .layers import Block, LayerNorm
from .sequence import SequenceDecoderEmbedding, SequenceEncoderEmbedding, sequence_logits


@dataclass(frozen=True)
class Variant:
    name: str
    dim: int
    num_heads: int
    encoder_depth: int
    decoder_depth: int
    gated_mlp: bool  # SwiGLU (base, large) or GELU MLP (tiny, small)
    bias: bool  # qkv / proj / mlp biases

    @property
    def mlp_hidden(self) -> int:
        # SwiGLU spends 2/3 of the 4*D hidden width, since it has a third projection.
        return int(2 * 4 * self.dim / 3) if self.gated_mlp else 4 * self.dim


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("tiny", 192, 3, 12, 4, gated_mlp=False, bias=True),
        Variant("small", 384, 6, 12, 6, gated_mlp=False, bias=True),
        Variant("base", 768, 12, 12, 12, gated_mlp=True, bias=False),
        Variant("large", 1024, 16, 24, 24, gated_mlp=True, bias=False),
    )
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(VARIANTS)}") from None


class Encoder(nn.Module):
    """The transformer encoder: returns every block's output, the last one passed through
    ``encoder_norm`` (as TerraMindViT does; the others are not normed)."""

    def __init__(self, variant: Variant) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(
            Block(variant.dim, variant.num_heads, variant.mlp_hidden, variant.gated_mlp, variant.bias)
            for _ in range(variant.encoder_depth)
        )
        self.encoder_norm = LayerNorm(variant.dim)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        x = tokens
        for block in self.encoder:
            x = block(x)
            outputs.append(x)
        outputs[-1] = self.encoder_norm(x)
        return outputs


class TerraMindModel(nn.Module):
    """The parts of the enc-dec model an export needs, in the checkpoint key space.

    Encoder embeddings for the raw input ``modalities``, the encoder and its norm; with
    ``targets``, also ``decoder_proj_context``, ``decoder``, ``decoder_norm``, ``mask_token`` and
    the targets' ``decoder_embeddings``. ``channels`` overrides a modality's channel count (band
    subsets); ``image_size`` is the size the exported graphs take (positions are resized
    bicubically from the 224 tables, as upstream does for other sizes). ``coords`` may appear in
    ``modalities`` (a sequence input), ``targets`` (generated autoregressively) and
    ``conditioning``; it is kept apart from the image modalities (``names``, ``targets``).
    """

    def __init__(
        self,
        variant: Variant,
        modalities: list[str],
        targets: list[str] | None = None,
        channels: dict[str, int] | None = None,
        image_size: int = 224,
        conditioning: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.image_size = image_size
        self.grid = image_size // 16
        channels = channels or {}
        self.encoder_embeddings = nn.ModuleDict()
        self.names: dict[str, str] = {}  # user name -> checkpoint key (image modalities)
        self.coords_input = any(is_coords(m) for m in modalities)
        self.coords_target = any(is_coords(t) for t in targets or [])
        for name in modalities:
            if is_coords(name):
                continue
            mod = get_modality(name)
            num_channels = channels.get(mod.name, mod.num_channels)
            # The table is built at 224 (the checkpoint's) and resized at trace time if needed.
            self.encoder_embeddings[mod.key] = ImageEncoderEmbedding(num_channels, variant.dim, 224)
            self.names[mod.name] = mod.key
        body = Encoder(variant)
        self.encoder = body.encoder
        self.encoder_norm = body.encoder_norm
        self._body = [body]  # not a submodule: keeps the key space flat
        self.targets: dict[str, str] = {}  # user name -> checkpoint key
        if targets:
            self.decoder_proj_context = nn.Linear(variant.dim, variant.dim, bias=True)
            self.decoder = build_decoder_blocks(variant)
            self.decoder_norm = build_decoder_norm(variant)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, variant.dim))
            self.decoder_embeddings = nn.ModuleDict()
            for name in targets:
                if is_coords(name):
                    self.decoder_embeddings[COORDS.key] = SequenceDecoderEmbedding(COORDS.vocab_size, variant.dim)
                    continue
                target = get_target(name)
                self.decoder_embeddings[target.key] = ImageTokenDecoderEmbedding(target.vocab_size, variant.dim, 224)
                self.targets[target.name] = target.key
        # Token embeddings of generated outputs, for chained generation (see ImageTokenEncoderEmbedding).
        self.conditioning: dict[str, str] = {}
        if self.coords_input or any(is_coords(c) for c in conditioning or []):
            self.encoder_embeddings[COORDS.key] = SequenceEncoderEmbedding(COORDS.vocab_size, variant.dim)
        for name in conditioning or []:
            if is_coords(name):
                continue
            target = get_target(name)
            self.encoder_embeddings[target.key] = ImageTokenEncoderEmbedding(target.vocab_size, variant.dim, 224)
            self.conditioning[target.name] = target.key

    @property
    def body(self) -> Encoder:
        return self._body[0]

    def embedding(self, name: str) -> ImageEncoderEmbedding:
        return self.encoder_embeddings[self.names[name]]

    def token_embedding(self, name: str) -> ImageTokenEncoderEmbedding:
        return self.encoder_embeddings[self.conditioning[name]]

    def decoder_embedding(self, name: str) -> ImageTokenDecoderEmbedding:
        return self.decoder_embeddings[self.targets[name]]

    @property
    def coords_embedding(self) -> SequenceEncoderEmbedding:
        return self.encoder_embeddings[COORDS.key]

    @property
    def coords_conditioning(self) -> bool:
        """Whether the model has an encoder embedding for coords (as input or to chain an output)."""
        return COORDS.key in self.encoder_embeddings

    def encode(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return self.body(tokens)

    def forward(self, images: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Eager reference of the whole embedding path (concatenation in dict order)."""
        tokens = torch.cat([self.embedding(name)(img) for name, img in images.items()], dim=1)
        return self.encode(tokens)

    def logits(self, images: dict[str, torch.Tensor], target: str) -> torch.Tensor:
        """Eager reference of one target's decoder logits (B, grid*grid, V)."""
        encoded = self.forward(images)[-1]
        emb = torch.cat([self.embedding(n).position_embedding(img) for n, img in images.items()], dim=1)
        return self.target_logits(encoded, emb, target)

    def coords_logits(self, encoder_output: torch.Tensor, context_emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Causal decoder logits (B, L, V) of the coords sequence ``ids`` (B, L)."""
        return sequence_logits(self.decoder, self.decoder_norm, self.decoder_proj_context,
                               self.decoder_embeddings[COORDS.key], encoder_output, context_emb, ids)

    def target_logits(self, encoder_output: torch.Tensor, context_emb: torch.Tensor, target: str) -> torch.Tensor:
        return decode_logits(self.decoder, self.decoder_norm, self.decoder_proj_context, self.mask_token,
                             self.decoder_embedding(target), encoder_output, context_emb, self.grid)

    # The pieces the exported decoder graphs are made of (see graphs.py): one shared transformer,
    # and per target its queries (the decoder input) and its head (the logits).
    def decoder_hidden(self, encoder_output: torch.Tensor, context_emb: torch.Tensor, queries: torch.Tensor,
                       self_bias: torch.Tensor | None = None) -> torch.Tensor:
        return decode_hidden(self.decoder, self.decoder_norm, self.decoder_proj_context, queries, encoder_output,
                             context_emb, self_bias)

    def target_queries(self, target: str) -> torch.Tensor:
        """(1, grid*grid, D): the constant decoder input of an image target."""
        return image_queries(self.mask_token, self.decoder_embedding(target), self.grid)

    def target_head(self, hidden: torch.Tensor, target: str) -> torch.Tensor:
        return head_logits(hidden, self.decoder_embedding(target).to_logits)

    def coords_queries(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D): the decoder input of a coords sequence (token + pos + modality embedding)."""
        return self.decoder_embeddings[COORDS.key](ids)[0]

    def coords_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden, self.decoder_embeddings[COORDS.key].to_logits)
