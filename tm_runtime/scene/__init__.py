"""Whole scenes: GeoTIFF in, tiled inference, georeferenced GeoTIFF out (``tm-run``); Ray Data scale-out.

Tiling, blending and the executors are numpy; GeoTIFF I/O needs rasterio (``pip install
'tm-deploy[geo]'``) and Ray Data ``pip install 'tm-deploy[ray]'``. Both are imported only when a
function that needs them is used, so ``import tm_runtime`` stays numpy + onnxruntime.
"""
from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "TilingParams": "tiling", "plan_windows": "tiling", "blend_mask": "tiling",
    "tiled_inference": "arrays",
    "EmbedOp": "ops", "PredictOp": "ops", "GenerateOp": "ops",
    "LocalExecutor": "executor",
    "run_scene": "pipeline", "embed_scene": "pipeline", "predict_scene": "pipeline", "generate_scene": "pipeline",
    "GeoArray": "raster", "open_scene": "raster",
    "RayExecutor": "ray_executor", "RuntimeFactory": "ray_executor", "SceneJob": "ray_executor",
    "run_scenes": "ray_executor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
