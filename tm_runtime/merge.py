"""Merging per-modality encoder tokens into one embedding, as terratorch's ``merge_method`` does."""
from __future__ import annotations

import numpy as np

MERGE_METHODS = ("mean", "max", "concat", "dict", None)


def check_merge_method(method: str | None) -> None:
    if method not in MERGE_METHODS:
        raise ValueError(f"merge_method must be one of 'mean', 'max', 'concat', 'dict' or None, got {method!r}")


def merge_tokens(
    tokens: np.ndarray,
    names: list[str],
    tokens_per_modality: int,
    method: str | None,
    num_missing: int = 0,
) -> np.ndarray | dict[str, np.ndarray]:
    """Merge one layer's output (B, M*N, D), tokens laid out modality after modality in ``names`` order.

    - mean / max: element-wise over modalities -> (B, N, D)
    - concat: along channels in input order, then ``num_missing`` zero blocks for exported
      modalities that were not given -> (B, N, D * (M + num_missing)). Upstream fills those with an
      uninitialised parameter; zeros are our defined choice (documented in the README).
    - dict: {name: (B, N, D)}
    - None: the raw concatenation (B, M*N, D)
    """
    if method is None:
        return tokens
    batch, _, dim = tokens.shape
    stacked = tokens.reshape(batch, len(names), tokens_per_modality, dim)
    if method == "mean":
        return stacked.mean(axis=1, dtype=np.float32)
    if method == "max":
        return stacked.max(axis=1)
    if method == "dict":
        return {name: np.ascontiguousarray(stacked[:, i]) for i, name in enumerate(names)}
    if method == "concat":
        parts = [stacked[:, i] for i in range(len(names))]
        parts += [np.zeros((batch, tokens_per_modality, dim), np.float32)] * num_missing
        return np.concatenate(parts, axis=-1)
    check_merge_method(method)
    raise AssertionError("unreachable")
