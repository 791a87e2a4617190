"""The decoder side of an export: one decoder transformer shared by every output modality, and per
output its query graph (the decoder input) and head graph (hidden states -> logits).

    image target:  queries (1, N, D), a constant computed once  -> decoder -> head -> (B, N, V)
    coords:        queries of the ids so far (B, L, D), causal   -> decoder -> head -> (B, L, V)

The decoder's ``self_bias`` (L, L) input is all zeros for an image target (no mask: adding zeros
changes no score) and the causal bias for coords, so one graph serves both.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .coords import causal_bias
from .manifest import CoordsEntry, Manifest, TargetEntry


class DecoderGraphs:
    """Runs the decoder graphs of ``manifest`` on a backend given per call (a benchmark may wrap
    or swap the runtime's backend). Image targets' queries are cached after their first use."""

    def __init__(self, manifest: Manifest) -> None:
        self.graph = manifest.decoder_graph
        self.tokens = (manifest.image_size // 16) ** 2
        self._queries: dict[str, np.ndarray] = {}
        self._zero_bias: dict[int, np.ndarray] = {}

    def queries(self, backend: Any, target: TargetEntry) -> np.ndarray:
        """(1, N, D): the target's decoder input at every position, in position order."""
        cached = self._queries.get(target.name)
        if cached is None:
            positions = np.arange(self.tokens, dtype=np.int64)
            cached = backend.run(target.query_graph, {"positions": positions}, ["queries"])[0]
            self._queries[target.name] = cached
        return cached

    def hidden(self, backend: Any, queries: np.ndarray, encoder_output: np.ndarray, context_emb: np.ndarray,
               self_bias: np.ndarray) -> np.ndarray:
        """The shared decoder: normed hidden states (B, L, D) of ``queries`` (B, L, D)."""
        feeds = {"encoder_output": encoder_output, "context_emb": context_emb, "queries": queries,
                 "self_bias": self_bias}
        return backend.run(self.graph, feeds, ["hidden"])[0]

    def _no_bias(self, length: int) -> np.ndarray:
        bias = self._zero_bias.get(length)
        if bias is None:
            bias = self._zero_bias[length] = np.zeros((length, length), dtype=np.float32)
        return bias

    def target_logits(self, backend: Any, target: TargetEntry, encoder_output: np.ndarray,
                      context_emb: np.ndarray) -> np.ndarray:
        """(B, N, V) logits of an image target, every position decoded in one pass."""
        table = self.queries(backend, target)
        queries = np.ascontiguousarray(np.broadcast_to(table, (encoder_output.shape[0],) + table.shape[1:]))
        hidden = self.hidden(backend, queries, encoder_output, context_emb, self._no_bias(table.shape[1]))
        return backend.run(target.head_graph, {"hidden": hidden}, ["logits"])[0]

    def coords_logits(self, backend: Any, coords: CoordsEntry, encoder_output: np.ndarray, context_emb: np.ndarray,
                      ids: np.ndarray) -> np.ndarray:
        """(B, L, V) causal logits of the coords sequence ``ids`` (B, L): position i scores the
        token after ids[:, i], seeing ids[:, :i + 1] only."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        queries = backend.run(coords.query_graph, {"ids": ids}, ["queries"])[0]
        hidden = self.hidden(backend, queries, encoder_output, context_emb, causal_bias(ids.shape[1]))
        return backend.run(coords.head_graph, {"hidden": hidden}, ["logits"])[0]
