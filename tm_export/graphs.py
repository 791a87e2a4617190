"""One declarative spec per exported graph: names, dtypes, symbolic dims, tolerance, and how to
build the module and sample inputs from the reference. Export, validation and the manifest are
all driven from these specs (the idea of Optimum's OnnxConfig)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .reference.terramind import TerraMindEncoderModel

BATCH = "batch"
NUM_TOKENS = "num_tokens"


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
    extra: dict = field(default_factory=dict)  # goes into the manifest entry as is

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


class PatchEmbedGraph(nn.Module):
    def __init__(self, model: TerraMindEncoderModel, name: str) -> None:
        super().__init__()
        self.embedding = model.embedding(name)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.embedding(image)


class EncoderGraph(nn.Module):
    def __init__(self, model: TerraMindEncoderModel) -> None:
        super().__init__()
        self.body = model.body

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.body(tokens))


def embed_graph_name(modality: str) -> str:
    return f"embed_{modality}"


def embedding_specs(model: TerraMindEncoderModel) -> list[GraphSpec]:
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
            outputs=[TensorDecl("tokens", "float32", (BATCH, tokens, dim))],
            sample=sample,
            extra={"modality": name},
        ))
    return specs


def encoder_spec(model: TerraMindEncoderModel) -> GraphSpec:
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


def all_specs(model: TerraMindEncoderModel) -> list[GraphSpec]:
    return embedding_specs(model) + [encoder_spec(model)]
