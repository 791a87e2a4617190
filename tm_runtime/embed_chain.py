"""What ``embed``, ``encode_context`` and a task model's ``predict`` run: each input's patch embedding,
their tokens concatenated in input order, the encoder; plus the inputs' position + modality embeddings
concatenated the same way (the decoders' context).

A backend that can compile this chain as one model offers ``run_fused_chain(chain, images)``
(OpenVINO: one inference instead of one per graph, no host-side concatenation; tiny embed at B=1
~10% faster on an AMX Xeon, see BENCHMARKS.md), which returns None when it will not; then, and on
every other backend, the graphs run one by one through ``backend.run`` (``run_graphs``). The context
embeddings are always an output, so that ``embed`` and ``logits`` share one compiled model.
Tokenised inputs, coords and TiM backbones keep the general path.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .manifest import Manifest

CHAIN_PREFIX = "chain["  # of every chain's key


@dataclass(frozen=True)
class EmbedChain:
    """The graphs of one ``embed`` call.

    embeddings: (modality, its patch-embedding graph) in concatenation order; each graph takes
      ``image`` and gives ``tokens`` (B, n, D).
    encoder: the encoder graph, fed the concatenated tokens as ``tokens``.
    outputs: the encoder outputs wanted, in order, each once; the chain returns them, then ``emb``
      (1, N, D): the embeddings' position + modality embeddings, concatenated like the tokens.
    token_counts: n of each embedding, in order (for the merge's layout).
    """

    embeddings: tuple[tuple[str, str], ...]
    encoder: str
    outputs: tuple[str, ...]
    token_counts: tuple[int, ...]

    @property
    def key(self) -> str:
        """A name for the chain as one graph (OpenVINO's compilation key)."""
        return f"{CHAIN_PREFIX}{'+'.join(g for _, g in self.embeddings)}>{self.encoder}:{','.join(self.outputs)}]"

    @property
    def graphs(self) -> list[str]:
        return [g for _, g in self.embeddings] + [self.encoder]

    @property
    def layout(self) -> list[tuple[str, int, bool]]:
        """``merge_tokens``' layout of the encoder's tokens: (modality, token count, an image modality)."""
        return [(name, n, True) for (name, _), n in zip(self.embeddings, self.token_counts)]


def embed_chain(manifest: Manifest, order: list[str], outputs: list[str],
                encoder: str | None = None) -> EmbedChain | None:
    """The chain for image inputs ``order`` (modality names) into ``encoder`` (default: the export's
    encoder graph), or None where the inputs need more than a chain (a tokenised input) or a token
    count is not fixed in the manifest."""
    embeddings, counts = [], []
    for name in order:
        spec = manifest.modalities.get(name)
        if spec is None or spec.tokenize_graph is not None:
            return None
        tokens = [t for t in manifest.graph(spec.graph).outputs if t.name == "tokens"]
        if not tokens or len(tokens[0].shape) != 3 or not isinstance(tokens[0].shape[1], int):
            return None
        embeddings.append((name, spec.graph))
        counts.append(tokens[0].shape[1])
    if not embeddings:
        return None
    encoder = encoder or manifest.data["encoder"]["graph"]
    # each output once (layers=[11, -1] asks for one twice): OpenVINO cannot compile a model that lists a
    # result twice; run_embed_chain hands the repeats back
    return EmbedChain(tuple(embeddings), encoder, tuple(dict.fromkeys(outputs)), tuple(counts))


def run_graphs(backend: Any, chain: EmbedChain, images: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The chain graph by graph through ``backend.run``: its encoder outputs, then ``emb``."""
    parts = [backend.run(graph, {"image": images[name]}, ["tokens", "emb"]) for name, graph in chain.embeddings]
    tokens, emb = (np.concatenate([p[i] for p in parts], axis=1) if len(parts) > 1 else parts[0][i] for i in (0, 1))
    return [*backend.run(chain.encoder, {"tokens": tokens}, list(chain.outputs)), emb]


def run_embed_chain(backend: Any, chain: EmbedChain, images: Mapping[str, np.ndarray],
                    outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    """The encoder outputs ``outputs`` (default ``chain.outputs``; repeats allowed), then ``emb``: as one
    model where the backend runs the chain so, else graph by graph."""
    fused = getattr(backend, "run_fused_chain", None)
    results = fused(chain, images) if callable(fused) else None
    if results is None:
        results = run_graphs(backend, chain, images)
    if outputs is None:
        return results
    by_name = dict(zip(chain.outputs, results))
    return [by_name[o] for o in outputs] + [results[-1]]
