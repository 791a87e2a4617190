"""Token-count schedules for multi-step decoding: how many tokens to decode at each step.

Both return an int64 array whose entries sum to ``num_tokens``. Note that TerraMind's public
generation API decodes every image token in one pass; these exist for multi-step decoders and
for parity with upstream.
"""
from __future__ import annotations

import math
import numbers

import numpy as np


def _check(num_steps: int, num_tokens: int) -> None:
    for name, value in (("num_steps", num_steps), ("num_tokens", num_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def linear_schedule(num_steps: int, num_tokens: int) -> np.ndarray:
    """Near-equal shares, larger ones first; steps that would get 0 tokens are dropped.

    The shares are the differences of int-truncated ``np.linspace(0, num_tokens, num_steps + 1)``
    (truncation as upstream does it, so float rounding resolves identically), sorted descending.
    (4, 196) -> [49, 49, 49, 49]; (3, 10) -> [4, 3, 3]; (5, 3) -> [1, 1, 1].
    """
    _check(num_steps, num_tokens)
    bounds = np.linspace(0, num_tokens, num_steps + 1).astype(np.int64)
    shares = np.sort(np.diff(bounds))[::-1]
    return np.ascontiguousarray(shares[: np.count_nonzero(shares)])  # zeros sort last: trim them


def cosine_schedule(num_steps: int, num_tokens: int) -> np.ndarray:
    """Shares following a half cosine: few tokens first and last, most in the middle.

    With s_i = (1 + cos(pi * i / num_steps)) / 2 for i = 0..num_steps-1, step i (< last) gets
    round(num_tokens * (s_i - s_{i+1})) tokens (round half to even) and the last step gets the
    remainder. (4, 196) -> [29, 69, 69, 29]. Entries can be 0 and are kept.
    """
    _check(num_steps, num_tokens)
    s = [0.5 * (1.0 + math.cos(math.pi * i / num_steps)) for i in range(num_steps)]
    shares = [round(num_tokens * (s[i] - s[i + 1])) for i in range(num_steps - 1)]
    shares.append(num_tokens - sum(shares))
    return np.asarray(shares, dtype=np.int64)
