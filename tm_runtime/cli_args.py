"""argparse value types shared by the command-line tools (tm-run, tm-bench, tm-export)."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def modality_factor(text: str) -> tuple[str, float]:
    """``S2L2A=0.0001`` -> ``("S2L2A", 0.0001)`` (``--tile-scale``; ``dict()`` of several)."""
    name, sep, value = text.partition("=")
    try:
        factor = float(value)
    except ValueError:
        sep = ""
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected MODALITY=FACTOR (e.g. S2L2A=0.0001), got {text!r}")
    return name, factor
