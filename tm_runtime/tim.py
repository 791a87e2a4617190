"""Thinking-in-Modalities (TiM): the step a ``terramind_v1_<size>_tim`` backbone runs before its encoder.

For every TiM modality (manifest ``tim.modalities``, in order) that is not among the inputs, the
frozen generation model writes its tokens: the generation encoder reads the inputs, the decoder
scores every position of the modality in one pass, and one token per position is sampled
(``sampling.sample_tokens``: top-k/top-p on the raw logits, then temperature; temperature 0 =
argmax). With ``chained`` (upstream's default) each generated modality also joins the generation
encoder's input for the ones after it. The ids then enter the embedding encoder through the TiM
modality's token embedding (token + pos + modality embedding), after the inputs' tokens. No
tokenizer decoder runs: TiM needs the tokens only.

Differences from terratorch, on purpose:

* randomness: upstream seeds torch with a fresh ``random.randint`` on every forward, so two calls
  on the same input differ and cannot be repeated. Here one ``numpy.random.Generator`` built from
  ``seed`` draws ``B * h * w`` uniforms per generated modality, in order: a given seed gives the
  same tokens on every run and backend (``seed=None`` takes fresh OS entropy, like upstream);
  temperature 0 needs no randomness at all;
* ``decoding_steps > 1``: upstream crashes (its first pass already decodes every token); here it
  runs the ROAR extension of ``iterative`` (share of positions per pass, tokens so far fed back).

The generation model is the runtime itself with some graphs swapped in (manifest
``tim.generation_graphs``): nothing when it shares the embedding side's weights (a backbone
exported from an enc-dec checkpoint), ``encoder -> tim_encoder`` etc. after fine-tuning.
"""
from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .iterative import iterative_decode
from .sampling import check_sampling_args, sample_tokens

Part = tuple[str, np.ndarray, np.ndarray]  # (modality, tokens (B, n, D), pos + modality emb (1, n, D))


@dataclass(frozen=True)
class TimConfig:
    """The manifest's ``tim`` section."""

    modalities: tuple[str, ...]
    chained: bool
    temperature: float
    top_p: float
    top_k: int
    decoding_steps: int
    generation_graphs: Mapping[str, str]

    @classmethod
    def from_manifest(cls, data: Mapping) -> "TimConfig | None":
        section = data.get("tim")
        if not section:
            return None
        defaults = section.get("defaults", {})
        return cls(tuple(section["modalities"]), bool(section.get("chained", True)),
                   float(defaults.get("temperature", 1.0)), float(defaults.get("top_p", 0.8)),
                   int(defaults.get("top_k", 0)), int(defaults.get("decoding_steps", 1)),
                   dict(section.get("generation_graphs", {})))


@dataclass(frozen=True)
class TimOptions:
    """Sampling of one TiM step; None in ``resolve`` takes the export's default."""

    temperature: float
    top_p: float
    top_k: int
    decoding_steps: int
    seed: int | None

    @classmethod
    def resolve(cls, config: TimConfig | None, temperature: float | None = None, top_p: float | None = None,
                top_k: int | None = None, decoding_steps: int | None = None,
                seed: int | None = None) -> "TimOptions | None":
        given = {"tim_temperature": temperature, "tim_top_p": top_p, "tim_top_k": top_k,
                 "tim_decoding_steps": decoding_steps}
        if config is None:
            named = [k for k, v in given.items() if v is not None]
            if named:
                raise ValueError(f"{', '.join(named)}: this export has no TiM step "
                                 "(re-export with --tim-modalities to get a TiM backbone)")
            return None
        options = cls(config.temperature if temperature is None else temperature,
                      config.top_p if top_p is None else top_p,
                      config.top_k if top_k is None else top_k,
                      config.decoding_steps if decoding_steps is None else decoding_steps, seed)
        try:
            check_sampling_args(options.temperature, options.top_k, options.top_p)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"TiM sampling (tim_temperature, tim_top_k, tim_top_p): {exc}") from None
        steps = options.decoding_steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"tim_decoding_steps must be an int >= 1, got {steps!r}")
        if steps > 1 and not config.chained:
            raise ValueError("tim_decoding_steps > 1 feeds decoded tokens back to the generation encoder; this "
                             "export's TiM is unchained (tim_chained_generations=False)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if seed is not None and seed < 0:  # numpy's own message would not name the argument
            raise ValueError(f"seed must be a non-negative int or None, got {seed}")
        return options


class _RenamedGraphs:
    """A backend that runs ``renames[name]`` in place of ``name``."""

    def __init__(self, backend, renames: Mapping[str, str]) -> None:
        self._backend, self._renames = backend, dict(renames)

    def run(self, graph: str, feeds: dict, outputs: Sequence[str]) -> list[np.ndarray]:
        return self._backend.run(self._renames.get(graph, graph), feeds, outputs)


def generation_model(rt, config: TimConfig):
    """The runtime as the frozen generation model: ``rt`` itself when the weights are shared."""
    if not config.generation_graphs:
        return rt
    view = copy.copy(rt)
    view.backend = _RenamedGraphs(rt.backend, config.generation_graphs)
    return view


def token_embedding(rt, modality: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids (B, h, w) -> (tokens (B, h*w, D), emb (1, h*w, D)) through the modality's token embedding."""
    graph = rt.manifest.targets[modality].condition_graph
    return tuple(rt.backend.run(graph, {"ids": np.ascontiguousarray(ids, dtype=np.int64)}, ["tokens", "emb"]))


def input_graphs(rt, order: Sequence[str]) -> set[str]:
    """The graphs that embed the inputs ``order``: when the generation model swaps in none of them
    (a fine-tuned model whose embeddings stayed frozen), it reuses the embedding side's tokens."""
    out = set()
    for name in order:
        if name in rt.manifest.modalities:
            spec = rt.manifest.modalities[name]
            out.update(g for g in (spec.graph, spec.tokenize_graph) if g)
        elif rt.manifest.coords is not None and rt.manifest.coords.embed_graph:
            out.add(rt.manifest.coords.embed_graph)
    return out


def generate_tim_tokens(rt, config: TimConfig, arrays: dict[str, np.ndarray], coords: np.ndarray | None,
                        order: list[str], parts: list[Part] | None, options: TimOptions) -> dict[str, np.ndarray]:
    """Token ids (B, h, w) of every TiM modality that is not among the inputs ``order``, in
    ``config.modalities`` order. ``parts`` are the inputs' embedding-side parts, reused when the
    generation model runs the same embedding graphs (None: computed here)."""
    todo = [m for m in config.modalities if m not in order]
    if not todo:
        return {}
    gen = generation_model(rt, config)
    reuse = parts is not None and not input_graphs(rt, order) & set(config.generation_graphs)
    gen_parts = parts if reuse else gen._input_parts(arrays, coords, order)
    tokens = [t for _, t, _ in gen_parts]
    emb = [e for _, _, e in gen_parts]
    batch, grid = tokens[0].shape[0], rt.grid
    rng = np.random.default_rng(options.seed)
    last = gen.num_layers - 1
    out = {}
    for i, name in enumerate(todo):
        context, context_emb = np.concatenate(tokens, axis=1), np.concatenate(emb, axis=1)
        if options.decoding_steps == 1:
            logits = gen.decoder_logits(name, gen.encode(context, [last])[0], context_emb)
            ids = sample_tokens(logits, rng, temperature=options.temperature, top_k=options.top_k,
                                top_p=options.top_p)
        else:
            ids = np.stack([iterative_decode(gen._partial_logits_fn(name, context[b:b + 1], context_emb),
                                             grid * grid, options.decoding_steps, "roar", rng,
                                             options.temperature, options.top_k, options.top_p)
                            for b in range(batch)])
        out[name] = ids.reshape(batch, grid, grid)
        if config.chained and i < len(todo) - 1:
            # As upstream's chained TiM: a generated modality is an encoder input for the next ones.
            t, e = token_embedding(gen, name, out[name])
            tokens.append(t)
            emb.append(e)
    return out


def tim_parts(rt, config: TimConfig, arrays: dict[str, np.ndarray], coords: np.ndarray | None, order: list[str],
              parts: list[Part], options: TimOptions) -> list[Part]:
    """The TiM step: the generated modalities as embedding-encoder parts, to follow ``parts``."""
    generated = generate_tim_tokens(rt, config, arrays, coords, order, parts, options)
    return [(name, *token_embedding(rt, name, ids)) for name, ids in generated.items()]


def tim_tokens(rt, inputs: Mapping[str, np.ndarray], standardize: bool = False, check_finite: bool = True,
               tim_temperature: float | None = None, tim_top_p: float | None = None, tim_top_k: int | None = None,
               tim_decoding_steps: int | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
    """What a TiM backbone "thinks": the token ids (B, h, w) that ``rt.embed`` with the same
    arguments feeds its encoder, by TiM modality (those among the inputs are not generated)."""
    if rt.tim is None:
        raise ValueError("this export has no TiM step (re-export with --tim-modalities)")
    options = TimOptions.resolve(rt.tim, tim_temperature, tim_top_p, tim_top_k, tim_decoding_steps, seed)
    arrays, coords, order = rt._prepare_inputs(inputs, standardize, check_finite)
    return generate_tim_tokens(rt, rt.tim, arrays, coords, order, None, options)
