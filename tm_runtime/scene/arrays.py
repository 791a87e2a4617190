"""Tiled inference on in-memory arrays (no files, no rasterio): the same windows, padding and
blending as scenes, for callers holding (C, H, W) arrays, or (C, T, H, W) date stacks for
multi-temporal models, and for checking the scene path."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .accumulate import BandAccumulator
from .executor import WindowJob, compute_batch, read_batch
from .ops import SceneOp
from .source import ArrayReader, Grid, Scene
from .tiling import TilingParams, plan_windows


class _ForwardOp(SceneOp):
    """A plain function of a batch of windows {modality: (B, C, s, s)} -> (B, K, s', s')."""

    def __init__(self, forward: Callable, scale: int, dates: Mapping[str, int]) -> None:
        self.forward = forward
        self.scale = scale
        self.dates = dict(dates)

    def run(self, rt, arrays, windows):
        # Date stacks travel as (C * T) band-major channels, as DateStackReader reads them.
        arrays = {m: a.reshape(a.shape[0], -1, self.dates[m], *a.shape[2:]) if m in self.dates else a
                  for m, a in arrays.items()}
        return {"out": np.asarray(self.forward(arrays), dtype=np.float32)}


def tiled_inference(forward: Callable[[dict[str, np.ndarray]], np.ndarray], inputs: Mapping[str, np.ndarray] | np.ndarray,
                    tiling: TilingParams | None = None, scale: int = 1, nodata: float | None = None) -> np.ndarray:
    """terratorch's ``tiled_inference`` for one scene held in memory: ``inputs`` (C, H, W) or
    {modality: (C, H, W)}; ``forward`` maps a batch of windows to (B, K, crop/scale, crop/scale).
    A (C, T, H, W) input (dates of a multi-temporal model) reaches ``forward`` as (B, C, T, s, s).
    Returns the blended (K, ceil(H/scale), ceil(W/scale)) float32 map, NaN where inputs are nodata."""
    tiling = tiling or TilingParams()
    single = isinstance(inputs, np.ndarray)
    arrays = {"input": inputs} if single else dict(inputs)
    shapes = {a.shape[-2:] for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"all inputs must share height and width, got {[tuple(a.shape) for a in arrays.values()]}")
    height, width = shapes.pop()
    dates = {n: a.shape[1] for n, a in arrays.items() if a.ndim == 4}
    flat = {n: a.reshape(-1, height, width) if n in dates else a for n, a in arrays.items()}
    scene = Scene(Grid(height, width), {n: ArrayReader(n, a, nodata) for n, a in flat.items()})
    op = _ForwardOp((lambda batch: forward(batch["input"])) if single else forward, scale, dates)
    plan = plan_windows(-(-height // scale), -(-width // scale), tiling.in_units(scale))
    job = WindowJob(plan, op)
    acc = None
    rows = []
    for b, indices in enumerate(plan.batches()):
        result = compute_batch(None, job, read_batch(scene, job, b, indices))
        position = {i: p for p, i in enumerate(result.computed)}
        for i in indices:
            if acc is None and result.outputs:
                acc = BandAccumulator(plan, result.outputs["out"].shape[1])
            if acc is None:
                continue
            rows.extend(acc.start_window(plan.windows[i]))
            if i in position:
                acc.add(plan.windows[i], result.outputs["out"][position[i]], result.valid[position[i]])
    if acc is None:
        raise ValueError("every window is nodata")
    rows.extend(acc.finish())
    out = np.concatenate([b.values for b in rows], axis=1)
    valid = np.concatenate([b.valid for b in rows], axis=0)
    out[:, ~valid] = np.nan
    return out
