"""What ``embed`` runs: each input's patch embedding, their tokens concatenated in input order, the encoder.

A backend that can compile this chain as one model offers ``run_embed_chain(chain, images)``
(OpenVINO: one inference instead of one per graph, no host-side concatenation; tiny embed at B=1
~15% faster on an AMX Xeon, see BENCHMARKS.md). Every other backend runs the graphs one by one
(``run_graphs``), exactly as before. Tokenised inputs, coords and TiM backbones keep the general path.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .manifest import Manifest


@dataclass(frozen=True)
class EmbedChain:
    """The graphs of one ``embed`` call.

    embeddings: (modality, its patch-embedding graph) in concatenation order; each graph takes
      ``image`` and gives ``tokens`` (B, n, D).
    encoder: the encoder graph, fed the concatenated tokens as ``tokens``.
    outputs: the encoder outputs wanted, in order.
    token_counts: n of each embedding, in order (for the merge's layout).
    """

    embeddings: tuple[tuple[str, str], ...]
    encoder: str
    outputs: tuple[str, ...]
    token_counts: tuple[int, ...]

    @property
    def key(self) -> str:
        """A name for the chain as one graph (OpenVINO's compilation key)."""
        return f"chain[{'+'.join(g for _, g in self.embeddings)}>{self.encoder}:{','.join(self.outputs)}]"

    @property
    def graphs(self) -> list[str]:
        return [g for _, g in self.embeddings] + [self.encoder]


def embed_chain(manifest: Manifest, order: list[str], outputs: list[str]) -> EmbedChain | None:
    """The chain for image inputs ``order`` (modality names), or None where ``embed`` needs more
    than a chain (a tokenised input) or a token count is not fixed in the manifest."""
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
    return EmbedChain(tuple(embeddings), manifest.data["encoder"]["graph"], tuple(outputs), tuple(counts))


def run_graphs(backend: Any, chain: EmbedChain, images: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The chain graph by graph through ``backend.run``."""
    tokens = [backend.run(graph, {"image": images[name]}, ["tokens"])[0] for name, graph in chain.embeddings]
    joined = tokens[0] if len(tokens) == 1 else np.concatenate(tokens, axis=1)
    return backend.run(chain.encoder, {"tokens": joined}, list(chain.outputs))


def run_embed_chain(backend: Any, chain: EmbedChain, images: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The chain's encoder outputs: as one model where the backend offers it, else graph by graph."""
    fused = getattr(backend, "run_embed_chain", None)
    if callable(fused):
        return fused(chain, images)
    return run_graphs(backend, chain, images)
