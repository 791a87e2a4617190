"""Thinking-in-Modalities (TiM) backbones at export time (terratorch's ``terramind_v1_<size>_tim``).

A TiM backbone holds two models. The frozen *generation* model (terratorch: ``sampler.model``, a
whole enc-dec) writes the tokens of the TiM modalities from the raw inputs; the *embedding*
encoder (terratorch: ``encoder_embeddings``, ``encoder``, ``encoder_norm``) then reads the raw
inputs and those tokens. Upstream initialises both from one checkpoint, so a backbone exported
from an enc-dec checkpoint shares every graph; after ``terratorch fit`` the embedding encoder is
fine-tuned and the two differ. The export keeps them apart without assuming either:

* ``model`` (the usual reference, ``all_specs``) is the embedding side plus the generation
  model's decoder (only the generation model has one);
* ``generation`` is the generation model's encoder side (patch embeddings, token embeddings,
  encoder). Each of its graphs whose weights equal the embedding side's graph of the same name is
  not written again; the others are written as ``tim_<name>``, and the manifest's
  ``tim.generation_graphs`` maps the one to the other, so the runtime runs the generation model as
  the embedding side with those graphs swapped in.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tm_runtime.modalities import COORDS, TARGETS, get_modality, get_target, is_coords
from tm_runtime.sampling import check_sampling_args

from .graphs import GraphSpec, all_specs
from .reference.terramind import TerraMindModel

TIM_GRAPH_PREFIX = "tim_"
# Where terratorch's TerraMindTiM keeps its frozen enc-dec (the TiM generation model).
GENERATION_KEY = "sampler.model."
# The TiM backbone's embedding encoder, in the enc-dec key space (its keys without a prefix).
EMBEDDING_PREFIXES = ("encoder_embeddings.", "encoder.", "encoder_norm.")
# The decoder side of the enc-dec key space: only the generation model has it.
DECODER_PREFIXES = ("decoder_embeddings.", "decoder.", "decoder_norm.", "decoder_proj_context.", "mask_token")


@dataclass(frozen=True)
class TimSettings:
    """What ``terramind_v1_<size>_tim`` takes besides the ViT arguments; the sampling values are
    the export's defaults (``embed``/``predict`` can override them per call)."""

    modalities: tuple[str, ...]  # canonical target names, in generation order
    chained: bool = True  # upstream's tim_chained_generations
    temperature: float = 1.0  # upstream's tim_temps
    top_p: float = 0.8
    top_k: int = 0
    decoding_steps: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.modalities, str) or not self.modalities:
            raise ValueError("TiM needs at least one modality (tim_modalities), e.g. ['LULC']")
        names = []
        for name in self.modalities:
            if is_coords(name):
                raise ValueError(f"TiM modality {name!r}: only image modalities ({', '.join(TARGETS)}) are "
                                 "supported; coords (a sequence) is not")
            names.append(get_target(name).name)
        if len(set(names)) != len(names):
            raise ValueError(f"a TiM modality is listed twice: {list(self.modalities)}")
        object.__setattr__(self, "modalities", tuple(names))
        if isinstance(self.decoding_steps, bool) or not isinstance(self.decoding_steps, numbers.Integral) \
                or self.decoding_steps < 1:
            raise ValueError(f"tim_decoding_steps must be an int >= 1, got {self.decoding_steps!r}")
        try:
            check_sampling_args(self.temperature, self.top_k, self.top_p)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"TiM sampling defaults (tim_temps, tim_top_k, tim_top_p): {exc}") from None
        if self.decoding_steps > 1 and not self.chained:
            raise ValueError("tim_decoding_steps > 1 feeds decoded tokens back to the generation encoder, "
                             "which needs tim_chained_generations=True")

    @classmethod
    def from_backbone_kwargs(cls, kwargs: Mapping[str, object]) -> "TimSettings":
        """From terratorch's argument names (``tim_modalities``, ``tim_temps``, ``tim_top_p``,
        ``tim_top_k``, ``tim_decoding_steps``, ``tim_chained_generations``; a task config spells
        them with a ``backbone_`` prefix, which is accepted too). Upstream's ``tim_top_p=0``
        (no nucleus filter) becomes 1.0, our spelling of the same."""
        args = {k.removeprefix("backbone_"): v for k, v in kwargs.items()}
        top_p = float(args.get("tim_top_p", 0.8))
        return cls(modalities=tuple(args.get("tim_modalities") or ("LULC",)),
                   chained=bool(args.get("tim_chained_generations", True)),
                   temperature=float(args.get("tim_temps", 1.0)), top_p=top_p if top_p > 0 else 1.0,
                   top_k=args.get("tim_top_k", 0), decoding_steps=args.get("tim_decoding_steps", 1))


def check_tim_inputs(settings: TimSettings, modalities: list[str], bands: Mapping[str, object]) -> None:
    """Upstream's rules: a TiM modality may also be an input only as a tokenised one (then TiM
    skips it when it is given); TiM backbones take no band subsets."""
    for name in settings.modalities:
        for m in modalities:
            if not is_coords(m) and get_modality(m).name == name and not get_modality(m).tokenized:
                raise ValueError(f"TiM modality {name} is also a raw input; TiM generates tokenised modalities "
                                 "only, so drop it from --tim-modalities or from --modalities (as terratorch)")
    if bands:
        raise ValueError("--bands cannot be combined with --tim-modalities: the TiM generation model reads the "
                         "pretrained bands (terratorch's TiM backbones refuse bands= too)")


def split_tim_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict] | None:
    """A TiM backbone's state_dict -> (generation, embedding) state_dicts in the enc-dec key space;
    None for an enc-dec checkpoint (TerraMind_v1_<size>.pt), whose weights serve both.

    The backbone's keys may carry a prefix, e.g. ``model.encoder.`` in a ``terratorch fit``
    checkpoint: ``<prefix>sampler.model.*`` (frozen enc-dec), ``<prefix>encoder_embeddings.*``,
    ``<prefix>encoder.*``, ``<prefix>encoder_norm.*`` (embedding encoder) and
    ``<prefix>tokenizer.*`` (tokenizers of tokenised inputs; not read here).
    """
    hit = next((k for k in state if GENERATION_KEY in k), None)
    if hit is None:
        return None
    prefix = hit[:hit.index(GENERATION_KEY)]
    generation = {k[len(prefix) + len(GENERATION_KEY):]: v for k, v in state.items()
                  if k.startswith(prefix + GENERATION_KEY)}
    embedding = {k[len(prefix):]: v for k, v in state.items()
                 if k.startswith(prefix) and k[len(prefix):].startswith(EMBEDDING_PREFIXES)}
    return generation, embedding


def decoder_state(state: Mapping[str, torch.Tensor]) -> dict:
    """The decoder-side keys of an enc-dec state_dict."""
    return {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def generation_specs(model: TerraMindModel, generation: TerraMindModel | None) -> tuple[list[GraphSpec], dict]:
    """The generation model's own graphs and the renames the runtime applies for it.

    ``generation`` None means shared weights (no graph of its own). Otherwise every encoder-side
    graph of ``generation`` is compared with the graph of the same name of ``model``: equal
    weights reuse that graph, different (or absent) ones are exported as ``tim_<name>``.
    """
    if generation is None:
        return [], {}
    own = {s.name: s for s in all_specs(model)}
    specs, renames = [], {}
    for spec in all_specs(generation):
        twin = own.get(spec.name)
        if twin is not None and _same_weights(twin.module, spec.module):
            continue
        renamed = dataclasses.replace(spec, name=TIM_GRAPH_PREFIX + spec.name,
                                      extra={**spec.extra, "tim_generation": True})
        specs.append(renamed)
        renames[spec.name] = renamed.name
    return specs, renames


def tim_manifest(settings: TimSettings, renames: Mapping[str, str], separate_checkpoint: bool) -> dict:
    """The manifest's ``tim`` section (read by ``tm_runtime.tim``)."""
    return {
        "modalities": list(settings.modalities),
        "chained": settings.chained,
        # Sampling defaults (upstream's tim_temps, tim_top_p, tim_top_k, tim_decoding_steps).
        "defaults": {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": int(settings.top_k),
                     "decoding_steps": int(settings.decoding_steps)},
        # Where the generation weights came from: one enc-dec checkpoint for both models, or a TiM
        # backbone state_dict whose frozen enc-dec (sampler.model) was read on its own.
        "generation_weights": "separate" if separate_checkpoint else "shared",
        # Graph renames that turn the embedding side into the generation model ({} = same graphs).
        "generation_graphs": dict(renames),
    }


def mark_tim_only_targets(targets: dict[str, dict], settings: TimSettings, outputs: list[str],
                          graphs: Mapping[str, object]) -> None:
    """A TiM modality that is not also a generation output has a decoder but no tokenizer
    decoder: say so in its ``targets`` entry (``generate`` refuses it, ``logits`` works)."""
    for name in settings.modalities:
        if name in outputs or name not in targets:
            continue
        entry = targets[name]
        entry["tim_only"] = True
        entry["unet_graph"] = entry["detokenize_graph"] = None
        if entry.get("tokenize_graph") not in graphs:  # kept when the modality is a tokenised input too
            entry["tokenize_graph"] = None


def output_names(output_modalities: list[str]) -> list[str]:
    return [COORDS.name if is_coords(t) else get_target(t).name for t in output_modalities]


def checkpoint_states(state: dict, settings: TimSettings | None, outputs: list[str],
                      source: str) -> tuple[dict, dict | None]:
    """(state for the reference model, state of a separate TiM generation model or None).

    An enc-dec checkpoint serves both models. A TiM backbone's state_dict gives the reference
    model its embedding encoder plus the generation model's decoder, and the generation model
    its own encoder side.
    """
    split = split_tim_state(state)
    if split is None:
        return state, None
    if settings is None:
        raise ValueError(f"{source} holds a TiM backbone (its keys contain '{GENERATION_KEY}'): pass "
                         "--tim-modalities (as the backbone's tim_modalities), or export from an enc-dec checkpoint")
    if outputs:
        raise ValueError(f"{source} holds a fine-tuned TiM backbone: --output-modalities (generation) is not "
                         "supported from it; export generation from the enc-dec checkpoint TerraMind_v1_<size>.pt")
    generation, embedding = split
    return {**embedding, **decoder_state(generation)}, generation
