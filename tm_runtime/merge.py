"""Merging per-modality encoder tokens into one embedding, as terratorch's ``merge_method`` does."""
from __future__ import annotations

import numpy as np

MERGE_METHODS = ("mean", "max", "concat", "dict", None)


def check_merge_method(method: str | None) -> None:
    if method not in MERGE_METHODS:
        raise ValueError(f"merge_method must be one of 'mean', 'max', 'concat', 'dict' or None, got {method!r}")


def merge_tokens(
    tokens: np.ndarray,
    layout: list[tuple[str, int, bool]],
    method: str | None,
    num_missing: int = 0,
) -> np.ndarray | dict[str, np.ndarray]:
    """Merge one layer's output (B, N_total, D), tokens laid out modality after modality as
    ``layout`` lists them: (name, number of tokens, is an image modality).

    - mean / max: element-wise over the image modalities -> (B, N, D); sequence tokens (coords)
      are dropped, as upstream drops them
    - concat: image modalities along channels in input order, then ``num_missing`` zero blocks for
      exported image modalities that were not given -> (B, N, D * (M + num_missing)). Upstream
      fills those with an uninitialised parameter; zeros are our defined choice (README).
    - dict: {name: (B, N_name, D)}, coords included
    - None: the raw concatenation (B, N_total, D)
    """
    if method is None:
        return tokens
    bounds = np.cumsum([0] + [count for _, count, _ in layout])
    parts = {name: tokens[:, bounds[i]:bounds[i + 1]] for i, (name, _, _) in enumerate(layout)}
    if method == "dict":
        return {name: np.ascontiguousarray(part) for name, part in parts.items()}
    images = [parts[name] for name, _, is_image in layout if is_image]
    if not images:
        raise ValueError(f"merge_method={method!r} merges image modalities, but only sequence inputs were given "
                         "(use merge_method='dict' or None)")
    if method == "mean":
        return np.stack(images, axis=1).mean(axis=1, dtype=np.float32)
    if method == "max":
        return np.stack(images, axis=1).max(axis=1)
    if method == "concat":
        images += [np.zeros_like(images[0])] * num_missing
        return np.concatenate(images, axis=-1)
    check_merge_method(method)
    raise AssertionError("unreachable")
