"""One declarative spec per exported graph: names, dtypes, symbolic dims, tolerance, and how to
build the module and sample inputs from the reference. Export, validation and the manifest are
all driven from these specs (the idea of Optimum's OnnxConfig)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tm_runtime.modalities import COORDS

from .reference.terramind import TerraMindModel

BATCH = "batch"
NUM_TOKENS = "num_tokens"
SEQ_LEN = "seq_len"


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass
class GraphSpec:
    name: str
    module: nn.Module  # takes the inputs positionally, returns a tensor or a tuple of tensors
    inputs: list[TensorDecl]
    outputs: list[TensorDecl]
    # Called with (batch, generator) -> example inputs; symbolic dims are filled in by it.
    sample: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    max_rel_error: float = 1e-4  # fp32: max |ort - torch| / max |torch| per output
    # Outputs produced by rounding (FSQ codes and ids): compared by the fraction of differing
    # elements, which may be non-zero only at rounding ties.
    quantised_outputs: tuple[str, ...] = ()
    max_mismatch: float = 1e-3
    # False keeps the graph fp32 in an fp16 export (the tokenizer encoders: FSQ rounding needs fp32
    # to give the same ids).
    allow_reduced_precision: bool = True
    extra: dict = field(default_factory=dict)  # goes into the manifest entry as is
    # What validation compares against when the traced module is a rewrite of the reference
    # (the Winograd UNet): None means ``module`` itself.
    reference: nn.Module | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


class PatchEmbedGraph(nn.Module):
    """image -> (tokens = patches + pos + modality embedding, emb = pos + modality embedding).

    ``emb`` is batch-independent (1, N, D); the decoder adds it to the projected context.
    """

    def __init__(self, model: TerraMindModel, name: str) -> None:
        super().__init__()
        self.embedding = model.embedding(name)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embedding.position_embedding(image)
        return self.embedding.patch_tokens(image) + emb, emb


class DecoderGraph(nn.Module):
    """(normed last encoder layer, inputs' pos + modality embeddings) -> one target's logits.

    The context projection lives here (not in the encoder graph) so that an embedding-only
    user never pays for it; it is a single D x D Linear per decoder graph.
    """

    def __init__(self, model: TerraMindModel, target: str) -> None:
        super().__init__()
        self.model = model
        self.target = target

    def forward(self, encoder_output: torch.Tensor, context_emb: torch.Tensor) -> torch.Tensor:
        return self.model.target_logits(encoder_output, context_emb, self.target)


class EncoderGraph(nn.Module):
    def __init__(self, model: TerraMindModel) -> None:
        super().__init__()
        self.body = model.body

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.body(tokens))


def embed_graph_name(modality: str) -> str:
    return f"embed_{modality}"


def embedding_specs(model: TerraMindModel) -> list[GraphSpec]:
    size, dim = model.image_size, model.variant.dim
    tokens = (size // 16) ** 2
    specs = []
    for name in model.names:
        channels = model.embedding(name).num_channels

        def sample(batch: int, gen: torch.Generator, c: int = channels) -> tuple[torch.Tensor, ...]:
            return (torch.randn(batch, c, size, size, generator=gen),)

        specs.append(GraphSpec(
            name=embed_graph_name(name),
            module=PatchEmbedGraph(model, name),
            inputs=[TensorDecl("image", "float32", (BATCH, channels, size, size))],
            outputs=[TensorDecl("tokens", "float32", (BATCH, tokens, dim)),
                     TensorDecl("emb", "float32", (1, tokens, dim))],
            sample=sample,
            extra={"modality": name},
        ))
    return specs


def encoder_spec(model: TerraMindModel) -> GraphSpec:
    dim, depth = model.variant.dim, model.variant.encoder_depth
    tokens = (model.image_size // 16) ** 2
    num_modalities = len(model.names)

    def sample(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, tokens * num_modalities, dim, generator=gen),)

    return GraphSpec(
        name="encoder",
        module=EncoderGraph(model),
        inputs=[TensorDecl("tokens", "float32", (BATCH, NUM_TOKENS, dim))],
        outputs=[TensorDecl(f"layer_{i}", "float32", (BATCH, NUM_TOKENS, dim)) for i in range(depth)],
        sample=sample,
        extra={"last_output_normed": True},
    )


class TokenEmbedGraph(nn.Module):
    def __init__(self, model: TerraMindModel, name: str) -> None:
        super().__init__()
        self.embedding = model.token_embedding(name)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding(ids)


def token_embedding_specs(model: TerraMindModel) -> list[GraphSpec]:
    """ids (B, h, w) of a generated (or tokenised) modality -> encoder tokens and their emb."""
    dim, grid = model.variant.dim, model.grid
    specs = []
    for name in model.conditioning:
        vocab = model.token_embedding(name).vocab_size

        def sample(batch: int, gen: torch.Generator, v: int = vocab) -> tuple[torch.Tensor, ...]:
            return (torch.randint(0, v, (batch, grid, grid), generator=gen),)

        specs.append(GraphSpec(
            name=f"embed_tok_{name}", module=TokenEmbedGraph(model, name),
            inputs=[TensorDecl("ids", "int64", (BATCH, grid, grid))],
            outputs=[TensorDecl("tokens", "float32", (BATCH, grid * grid, dim)),
                     TensorDecl("emb", "float32", (1, grid * grid, dim))],
            sample=sample, extra={"modality": name, "role": "token_embedding", "vocab_size": vocab},
        ))
    return specs


def decoder_graph_name(target: str) -> str:
    return f"decoder_{target}"


def decoder_specs(model: TerraMindModel) -> list[GraphSpec]:
    dim = model.variant.dim
    tokens = model.grid ** 2
    num_modalities = len(model.names)
    specs = []
    for target in model.targets:
        vocab = model.decoder_embedding(target).vocab_size

        def sample(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            n = tokens * num_modalities
            return torch.randn(batch, n, dim, generator=gen), torch.randn(1, n, dim, generator=gen)

        specs.append(GraphSpec(
            name=decoder_graph_name(target),
            module=DecoderGraph(model, target),
            inputs=[TensorDecl("encoder_output", "float32", (BATCH, NUM_TOKENS, dim)),
                    TensorDecl("context_emb", "float32", (1, NUM_TOKENS, dim))],
            outputs=[TensorDecl("logits", "float32", (BATCH, tokens, vocab))],
            sample=sample,
            extra={"target": target, "vocab_size": vocab, "argmax_axis": -1},
        ))
    return specs


class CoordsEmbedGraph(nn.Module):
    def __init__(self, model: TerraMindModel) -> None:
        super().__init__()
        self.embedding = model.coords_embedding

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding(ids)


class CoordsDecoderGraph(nn.Module):
    """(encoder output, context emb, ids so far) -> causal logits of every position; the runtime's
    autoregressive loop calls it once per generated token (at most three times)."""

    def __init__(self, model: TerraMindModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, encoder_output: torch.Tensor, context_emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.model.coords_logits(encoder_output, context_emb, ids)


def _coords_ids(batch: int, gen: torch.Generator, length: int = 3) -> torch.Tensor:
    return torch.randint(0, COORDS.vocab_size, (batch, length), generator=gen)


def coords_specs(model: TerraMindModel) -> list[GraphSpec]:
    """``embed_coords`` (ids -> encoder tokens: a coords input, or a generated coords output that
    conditions later outputs) and ``decoder_coords``; the sequence length is symbolic."""
    dim, tokens = model.variant.dim, model.grid ** 2
    specs = []
    if model.coords_conditioning:
        specs.append(GraphSpec(
            name="embed_coords", module=CoordsEmbedGraph(model),
            inputs=[TensorDecl("ids", "int64", (BATCH, SEQ_LEN))],
            outputs=[TensorDecl("tokens", "float32", (BATCH, SEQ_LEN, dim)),
                     TensorDecl("emb", "float32", (1, SEQ_LEN, dim))],
            sample=lambda batch, gen: (_coords_ids(batch, gen),),
            extra={"modality": COORDS.name, "role": "sequence_embedding", "vocab_size": COORDS.vocab_size},
        ))
    if model.coords_target:
        num_modalities = max(len(model.names), 1)

        def sample(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            n = tokens * num_modalities + 3  # image tokens and a coords input's three
            return (torch.randn(batch, n, dim, generator=gen), torch.randn(1, n, dim, generator=gen),
                    _coords_ids(batch, gen))

        specs.append(GraphSpec(
            name=decoder_graph_name(COORDS.name), module=CoordsDecoderGraph(model),
            inputs=[TensorDecl("encoder_output", "float32", (BATCH, NUM_TOKENS, dim)),
                    TensorDecl("context_emb", "float32", (1, NUM_TOKENS, dim)),
                    TensorDecl("ids", "int64", (BATCH, SEQ_LEN))],
            outputs=[TensorDecl("logits", "float32", (BATCH, SEQ_LEN, COORDS.vocab_size))],
            sample=sample,
            extra={"target": COORDS.name, "vocab_size": COORDS.vocab_size, "argmax_axis": -1, "causal": True},
        ))
    return specs


def all_specs(model: TerraMindModel) -> list[GraphSpec]:
    return (embedding_specs(model) + token_embedding_specs(model) + coords_specs(model) + [encoder_spec(model)]
            + decoder_specs(model))
