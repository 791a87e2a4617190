"""Helpers for comparing against upstream terratorch (the oracle)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def import_terratorch():
    """terratorch's registry, or a skip with the reason; resets the matmul precision it lowers."""
    pytest.importorskip("terratorch", reason="terratorch not installed: pip install '.[parity]' to run parity tests")
    import torch
    from terratorch.registry import BACKBONE_REGISTRY

    # Importing terratorch calls torch.set_float32_matmul_precision("medium") (from its clay_v15 module),
    # which lets CPU matmuls run at reduced precision; parity needs full fp32.
    torch.set_float32_matmul_precision("highest")
    return BACKBONE_REGISTRY


def randomize_state(module, seed: int) -> dict:
    """Random values for every floating tensor of the state_dict, buffers included (positional
    tables and the zero LayerNorm bias buffers too), so nothing hides behind an init value."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        noise = torch.randn(value.shape, generator=gen)
        if "norm" in key and key.endswith("weight"):
            out[key] = 1.0 + 0.1 * noise
        else:
            fan_in = value.shape[-1] if value.ndim > 1 else 50
            out[key] = noise * min(0.05, fan_in ** -0.5)
    module.load_state_dict(out, strict=True)
    return out


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def terramesh_tile(modality: str, index: int = 0) -> np.ndarray:
    """A real 224x224 TerraMesh tile as (C, H, W) float32, or a skip if the data is absent."""
    tifffile = pytest.importorskip("tifffile", reason="tifffile needed to read TerraMesh tiles")
    folder = Path(__file__).resolve().parents[3] / "shared" / "data" / "terramesh_examples" / modality
    files = sorted(folder.glob("*.tif"))
    if not files:
        pytest.skip(f"no TerraMesh tiles at {folder}")
    array = tifffile.imread(files[index]).astype(np.float32)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
