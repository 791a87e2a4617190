"""One declarative spec per exported graph: names, dtypes, symbolic dims, tolerance, and how to
build the module and sample inputs from the reference. Export, validation and the manifest are
all driven from these specs (the idea of Optimum's OnnxConfig)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tm_runtime.coords import causal_bias
from tm_runtime.modalities import COORDS

from .reference.terramind import TerraMindModel

BATCH = "batch"
NUM_TOKENS = "num_tokens"
SEQ_LEN = "seq_len"
NUM_QUERIES = "num_queries"


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
    """The decoder transformer, shared by every output modality: (normed last encoder layer, the
    inputs' pos + modality embeddings, a target's queries, a self-attention bias) -> normed hidden
    states. The context projection lives here (not in the encoder graph) so that an embedding-only
    user never pays for it."""

    def __init__(self, model: TerraMindModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, encoder_output: torch.Tensor, context_emb: torch.Tensor, queries: torch.Tensor,
                self_bias: torch.Tensor) -> torch.Tensor:
        return self.model.decoder_hidden(encoder_output, context_emb, queries, self_bias)


class TargetQueryGraph(nn.Module):
    """positions (L,) -> an image target's decoder queries (1, L, D): mask token + pos + modality
    embedding, one constant row per position (a table lookup)."""

    def __init__(self, model: TerraMindModel, target: str) -> None:
        super().__init__()
        self.model = model
        self.target = target

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        table = self.model.target_queries(self.target)[0]
        return table.index_select(0, positions).unsqueeze(0)


class TargetHeadGraph(nn.Module):
    """Normed decoder hidden states (B, L, D) -> an image target's logits (B, L, V)."""

    def __init__(self, model: TerraMindModel, target: str) -> None:
        super().__init__()
        self.model = model
        self.target = target

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.target_head(hidden, self.target)


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


DECODER_GRAPH = "decoder"


def query_graph_name(target: str) -> str:
    return f"decoder_query_{target}"


def head_graph_name(target: str) -> str:
    return f"decoder_head_{target}"


def decoder_spec(model: TerraMindModel) -> GraphSpec:
    """The one decoder graph of an export with outputs; its length ``num_queries`` is symbolic
    (an image target's tokens, or a coords sequence so far)."""
    dim = model.variant.dim
    tokens = model.grid ** 2
    num_modalities = max(len(model.names), 1)

    def sample(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        n = tokens * num_modalities + 3  # image tokens and a coords input's three
        length = 5 + batch  # a length of its own per batch, none equal to another dim
        return (torch.randn(batch, n, dim, generator=gen), torch.randn(1, n, dim, generator=gen),
                torch.randn(batch, length, dim, generator=gen), torch.from_numpy(causal_bias(length)))

    return GraphSpec(
        name=DECODER_GRAPH, module=DecoderGraph(model),
        inputs=[TensorDecl("encoder_output", "float32", (BATCH, NUM_TOKENS, dim)),
                TensorDecl("context_emb", "float32", (1, NUM_TOKENS, dim)),
                TensorDecl("queries", "float32", (BATCH, NUM_QUERIES, dim)),
                TensorDecl("self_bias", "float32", (NUM_QUERIES, NUM_QUERIES))],
        outputs=[TensorDecl("hidden", "float32", (BATCH, NUM_QUERIES, dim))],
        sample=sample,
        extra={"role": "decoder", "targets": list(model.targets) + ([COORDS.name] if model.coords_target else [])},
    )


def decoder_specs(model: TerraMindModel) -> list[GraphSpec]:
    """The shared decoder, then per image target its query and head graphs."""
    if not (model.targets or model.coords_target):
        return []
    dim = model.variant.dim
    tokens = model.grid ** 2
    specs = [decoder_spec(model)]
    for target in model.targets:
        vocab = model.decoder_embedding(target).vocab_size

        def positions(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            return (torch.randperm(tokens, generator=gen)[: tokens - batch],)

        def hidden(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            return (torch.randn(batch, tokens, dim, generator=gen),)

        specs.append(GraphSpec(
            name=query_graph_name(target), module=TargetQueryGraph(model, target),
            inputs=[TensorDecl("positions", "int64", (NUM_QUERIES,))],
            outputs=[TensorDecl("queries", "float32", (1, NUM_QUERIES, dim))],
            sample=positions, extra={"target": target, "role": "decoder_queries", "num_positions": tokens},
        ))
        specs.append(GraphSpec(
            name=head_graph_name(target), module=TargetHeadGraph(model, target),
            inputs=[TensorDecl("hidden", "float32", (BATCH, NUM_QUERIES, dim))],
            outputs=[TensorDecl("logits", "float32", (BATCH, NUM_QUERIES, vocab))],
            sample=hidden, extra={"target": target, "role": "decoder_head", "vocab_size": vocab, "argmax_axis": -1},
        ))
    return specs


class CoordsEmbedGraph(nn.Module):
    def __init__(self, model: TerraMindModel) -> None:
        super().__init__()
        self.embedding = model.coords_embedding

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding(ids)


class CoordsQueryGraph(nn.Module):
    """ids so far (B, L) -> the coords decoder queries (B, L, D): token + pos + modality embedding."""

    def __init__(self, model: TerraMindModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.coords_queries(ids)


class CoordsHeadGraph(nn.Module):
    """Normed decoder hidden states (B, L, D) -> coords logits (B, L, V); with the causal bias in
    the shared decoder, position i scores the token after ids[:, i]. The runtime's autoregressive
    loop runs query -> decoder -> head once per generated token (at most three times)."""

    def __init__(self, model: TerraMindModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.coords_head(hidden)


def _coords_ids(batch: int, gen: torch.Generator, length: int = 3) -> torch.Tensor:
    return torch.randint(0, COORDS.vocab_size, (batch, length), generator=gen)


def coords_specs(model: TerraMindModel) -> list[GraphSpec]:
    """``embed_coords`` (ids -> encoder tokens: a coords input, or a generated coords output that
    conditions later outputs) and the coords output's query and head graphs around the shared
    decoder; the sequence length is symbolic."""
    dim = model.variant.dim
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
        # The token table (V x D) sits in both graphs (tied in the checkpoint): the queries look
        # ids up in it, the head multiplies by it.
        specs.append(GraphSpec(
            name=query_graph_name(COORDS.name), module=CoordsQueryGraph(model),
            inputs=[TensorDecl("ids", "int64", (BATCH, SEQ_LEN))],
            outputs=[TensorDecl("queries", "float32", (BATCH, SEQ_LEN, dim))],
            sample=lambda batch, gen: (_coords_ids(batch, gen),),
            extra={"target": COORDS.name, "role": "decoder_queries", "vocab_size": COORDS.vocab_size},
        ))
        specs.append(GraphSpec(
            name=head_graph_name(COORDS.name), module=CoordsHeadGraph(model),
            inputs=[TensorDecl("hidden", "float32", (BATCH, SEQ_LEN, dim))],
            outputs=[TensorDecl("logits", "float32", (BATCH, SEQ_LEN, COORDS.vocab_size))],
            sample=lambda batch, gen: (torch.randn(batch, 3, dim, generator=gen),),
            extra={"target": COORDS.name, "role": "decoder_head", "vocab_size": COORDS.vocab_size,
                   "argmax_axis": -1, "causal": True},
        ))
    return specs


def all_specs(model: TerraMindModel) -> list[GraphSpec]:
    return (embedding_specs(model) + token_embedding_specs(model) + [encoder_spec(model)] + decoder_specs(model)
            + coords_specs(model))
