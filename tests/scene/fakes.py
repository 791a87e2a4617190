"""Stand-ins for the scene tests: a cheap task runtime with ``rt.predict`` / ``rt.task`` (a
deterministic window function, so that tiling, blending and I/O tests need no export; the real
task export is tested in test_predict_task.py) and helpers that write synthetic georeferenced scenes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tm_runtime.modalities import get_modality


def window_function(weights: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Logits (B, K, s, s) that depend on the channels, on the position inside the window and on
    the window as a whole (its mean), so that a window placed or blended wrongly shows."""
    y = sum(np.einsum("kc,bchw->bkhw", weights[m], x) for m, x in inputs.items())
    s = y.shape[-1]
    ramp = (np.arange(s)[:, None] * 0.011 + np.arange(s)[None, :] * 0.017).astype(np.float32)
    return (np.tanh(y) + ramp + y.mean(axis=(1, 2, 3), keepdims=True)).astype(np.float32)


class FakeTaskRuntime:
    """What the scene code uses of a fine-tuned task export: ``task`` and ``predict``."""

    def __init__(self, modalities=("S2L2A",), num_classes: int = 4, seed: int = 0, fail_after: int | None = None,
                 task_type: str = "segmentation") -> None:
        rng = np.random.default_rng(seed)
        self.task = SimpleNamespace(num_classes=num_classes, class_names=[f"class {i}" for i in range(num_classes)],
                                    type=task_type, modalities=list(modalities), num_channels=num_classes,
                                    merge_method="mean", bands=None, standardization=None, temporal=None,
                                    tiled_inference=None)
        self.weights = {m: (rng.standard_normal((num_classes, get_modality(m).num_channels)) / 3000).astype(np.float32)
                        for m in modalities}
        self.calls = 0
        self.fail_after = fail_after

    def predict(self, inputs, standardize=True, output="logits"):
        assert output == "logits"
        self.calls += 1
        self.last_inputs, self.last_standardize = inputs, standardize
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("model failure (injected)")
        return window_function(self.weights, inputs)


def fake_factory():
    """A picklable runtime factory for Ray workers."""
    return FakeTaskRuntime()


def write_scene(path: Path, array: np.ndarray, *, crs="EPSG:32632", res: float = 10.0, origin=(500000.0, 5000000.0),
                nodata=None, descriptions=None, tiled: bool = True) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    count, height, width = array.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=array.dtype, crs=crs,
                   transform=from_origin(origin[0], origin[1], res, res), nodata=nodata, compress="deflate")
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        if descriptions:
            dst.descriptions = tuple(descriptions)
    return path


def s2_array(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish synthetic reflectance x 10000 (int16), 12 bands."""
    rng = np.random.default_rng(seed)
    base = rng.random((12, height // 8 + 2, width // 8 + 2)).astype(np.float32)
    smooth = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)[:, :height, :width]
    return (smooth * 3000 + rng.random((12, height, width)) * 500).astype(np.int16)
