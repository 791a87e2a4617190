"""Fine-tuned task models on a TiM backbone (``terramind_v1_<size>_tim``) at export time.

The backbone part of such a checkpoint (``model.encoder.*``; ``model.encoder.encoder.*`` inside
terratorch's TemporalWrapper) holds two models:

* ``sampler.model.*``: the frozen enc-dec that runs the TiM step (generation encoder, decoder);
* ``encoder_embeddings.*``, ``encoder.*``, ``encoder_norm.*``: the fine-tuned embedding encoder
  that reads the raw inputs plus the generated tokens and feeds the task head;

plus ``tokenizer.*`` (the TiM modalities' tokenizers, 184 M parameters for LULC, which the TiM
step never runs on raw inputs: not exported). Fine-tuning changes the embedding encoder and not
the frozen one, so the two are exported apart: the backbone export's TiM code
(``tm_export.tim``) builds both through ``build_models`` and writes a ``tim_<graph>`` for every
generation graph whose weights differ from the fine-tuned graph of the same name.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..export import ExportConfig, build_models
from ..graphs import GraphSpec, all_specs
from ..reference.terramind import TerraMindModel
from ..tim import DECODER_PREFIXES, EMBEDDING_PREFIXES, GENERATION_KEY, generation_specs
from .config import TaskConfigError, TaskSpec

if TYPE_CHECKING:
    from .model import TaskModel

TOKENIZER_KEY = "tokenizer."


def build_tim_backbone(spec: TaskSpec, image_size: int, prefix: str, state: Mapping[str, torch.Tensor] | None,
                       seed: int, source: str) -> tuple[TerraMindModel, TerraMindModel | None]:
    """(fine-tuned embedding encoder + the frozen decoder, frozen generation encoder or None).

    ``state``: the task state_dict; None gives seeded random weights shared by both models (as
    a TiM backbone built from an enc-dec checkpoint)."""
    config = ExportConfig(size=spec.size, modalities=list(spec.modalities), out=Path("."), image_size=image_size,
                          random_init=state is None, seed=seed, tim=spec.tim)
    backbone = None
    if state is not None:
        backbone = {k: v for k, v in state.items() if k.startswith(prefix)}
        if not any(k.startswith(prefix + GENERATION_KEY) for k in backbone):
            raise TaskConfigError(
                f"{source}: no key model.{prefix}{GENERATION_KEY}* (the frozen TiM generation model): the config's "
                f"backbone {spec.backbone} is a TiM backbone, the checkpoint's is not")
    model, generation, _ = build_models(config, log=lambda _: None, state=backbone,
                                        state_source=f"{source} (model.{prefix}*)")
    return model, generation


def tim_backbone_keys(model: "TaskModel", state: Mapping[str, torch.Tensor]) -> set[str]:
    """The keys of ``state`` that belong to the TiM backbone ``model`` (a ``TaskModel``) was built
    from: loaded ones, and the TiM tokenizers' (read past). Any other backbone key is unexpected."""
    prefix = model.encoder_prefix
    own = list(model.encoder.state_dict())
    embedding = [k for k in own if k.startswith(EMBEDDING_PREFIXES)]
    generation = list(model.generation.state_dict()) if model.generation is not None else embedding
    generation += [k for k in own if k.startswith(DECODER_PREFIXES)]
    known = {prefix + k for k in embedding} | {prefix + GENERATION_KEY + k for k in generation}
    return {k for k in state if k in known or k.startswith(prefix + TOKENIZER_KEY)}


def tim_graph_specs(model: "TaskModel") -> tuple[list[GraphSpec], dict[str, str]]:
    """Every backbone graph of a TiM task model: patch and token embeddings, the fine-tuned
    encoder and the TiM modalities' decoder graphs, then the generation model's own graphs where
    its weights differ (``tim_<name>``); and the renames that turn the one into the other."""
    own = all_specs(model.encoder)
    extra, renames = generation_specs(model.encoder, model.generation)
    return own + extra, renames
