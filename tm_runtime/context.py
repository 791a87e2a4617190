"""The encoder input of one generation, row by row.

Every image modality gives each batch row the same number of tokens, but generated coords do
not: one row may write three tokens and another one. Upstream pads the short rows and masks
them out of attention; our encoder graph has no mask, so rows are kept apart and run in groups
of equal length (with a trained model that is one group, the whole batch). Position + modality
embeddings depend only on a row's layout, so one (1, N, D) table serves a whole group.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


class EncoderContext:
    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.tokens: list[list[np.ndarray]] = [[] for _ in range(batch)]  # per row: (1, n, D) parts
        self.emb: list[list[np.ndarray]] = [[] for _ in range(batch)]

    def append(self, tokens: np.ndarray, emb: np.ndarray) -> None:
        """Tokens (B, n, D) shared in layout by every row, with their (1, n, D) embeddings."""
        for b in range(self.batch):
            self.tokens[b].append(tokens[b:b + 1])
            self.emb[b].append(emb)

    def replace_part(self, index: int, tokens: np.ndarray | None, emb: np.ndarray | None,
                     lengths: list[int]) -> None:
        """Swap part ``index`` (the same in every row) for row b's first ``lengths[b]`` tokens of
        ``tokens`` (B, L, D) with ``emb`` (1, L, D); a row of length 0 loses the part."""
        for b, n in enumerate(lengths):
            if n:
                self.tokens[b][index], self.emb[b][index] = tokens[b:b + 1, :n], emb[:, :n]
            else:
                del self.tokens[b][index], self.emb[b][index]

    @property
    def num_parts(self) -> int:
        return len(self.tokens[0])

    def row(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.tokens[b], axis=1), np.concatenate(self.emb[b], axis=1)

    def groups(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row indices, tokens (b, N, D), emb (1, N, D)) per group of rows of equal length."""
        lengths = [sum(t.shape[1] for t in parts) for parts in self.tokens]
        for length in sorted(set(lengths), key=lengths.index):
            rows = np.array([b for b, n in enumerate(lengths) if n == length])
            tokens = np.concatenate([np.concatenate(self.tokens[b], axis=1) for b in rows], axis=0)
            yield rows, tokens, np.concatenate(self.emb[rows[0]], axis=1)


def gather_rows(batch: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Scatter per-group results [(row indices, values (b, ...))] back into batch order."""
    first = parts[0][1]
    out = np.empty((batch,) + first.shape[1:], dtype=first.dtype)
    for rows, values in parts:
        out[rows] = values
    return out


def per_group(groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]], batch: int,
              fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn(rows, encoded, emb)`` for every group, reassembled in batch order."""
    return gather_rows(batch, [(rows, fn(rows, encoded, emb)) for rows, encoded, emb in groups])
