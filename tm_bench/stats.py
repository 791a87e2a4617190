"""Summary statistics of latency samples (seconds)."""
from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50, 90, 99)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    This is the definition numpy's default (``method='linear'``) uses, written out so the
    statistics do not depend on a numpy version's defaults.
    """
    if not samples:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """mean, p50, p90, p99, min, max, std (population) and n of the samples."""
    if not samples:
        raise ValueError("no samples to summarize")
    n = len(samples)
    mean = math.fsum(samples) / n
    out: dict[str, float | int] = {"n": n, "mean": mean}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(samples, q)
    out["min"] = min(samples)
    out["max"] = max(samples)
    out["std"] = math.sqrt(math.fsum((s - mean) ** 2 for s in samples) / n)
    return out
