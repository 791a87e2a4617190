"""PNG quicklooks of finished outputs, read back at reduced resolution (so memory stays small).

S2 true colour (red, green, blue over 0..3000 reflectance x 10000, gamma 0.7), S1 false colour
(VV, VH, VV - VH in dB), class maps in their colour table, DEM as a hillshade, NDVI on a
red-to-green ramp, embeddings as their first three bands stretched to 2..98 percent.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning

from .ops import OutputSpec

MAX_SIDE = 1024


def _stretch(band: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((band - low) / (high - low), 0, 1)


def _percent_stretch(band: np.ndarray) -> np.ndarray:
    finite = band[np.isfinite(band)]
    if finite.size == 0:
        return np.zeros_like(band)
    low, high = np.percentile(finite, [2, 98])
    return _stretch(band, low, high if high > low else low + 1)


def hillshade(dem: np.ndarray, pixel_size: float, azimuth: float = 315.0, altitude: float = 45.0) -> np.ndarray:
    """Lambertian hillshade in [0, 1] (sun from the north-west, 45 degrees up)."""
    dy, dx = np.gradient(np.nan_to_num(dem, nan=float(np.nanmean(dem)) if np.isfinite(dem).any() else 0.0),
                         pixel_size)
    slope = np.arctan(np.hypot(dx, dy))
    aspect = np.arctan2(-dx, dy)
    az, alt = math.radians(360.0 - azimuth + 90.0), math.radians(altitude)
    shade = np.sin(alt) * np.cos(slope) + np.cos(alt) * np.sin(slope) * np.cos(az - aspect)
    return np.clip(shade, 0, 1)


def render(spec: OutputSpec, data: np.ndarray, pixel_size: float, colormap: dict | None = None) -> np.ndarray:
    """(count, h, w) as written -> (3, h, w) uint8."""
    kind = spec.quicklook
    if spec.kind == "classes" or kind == "classes":
        ids = data[0] if spec.kind == "classes" else np.nan_to_num(data).argmax(axis=0)
        table = np.zeros((256, 3), np.uint8)
        for i, color in (colormap or {}).items():
            table[i] = color[:3]
        for i, color in enumerate(spec.colors or ()):
            table[i] = color
        rgb = table[ids.astype(np.uint8)].transpose(2, 0, 1).astype(np.float32) / 255
    elif kind == "s2":
        rgb = np.stack([_stretch(data[i], 0, 3000) for i in (3, 2, 1)]) ** 0.7
    elif kind == "s1":
        vv, vh = data[0], data[1]
        rgb = np.stack([_stretch(vv, -25, 0), _stretch(vh, -32, -5), _stretch(vv - vh, 0, 15)])
    elif kind == "dem":
        rgb = np.repeat(hillshade(data[0], pixel_size)[None], 3, axis=0)
    elif kind == "ndvi":
        t = _stretch(data[0], -0.2, 0.9)
        rgb = np.stack([1 - t, t, 0.2 * np.ones_like(t)])
    else:
        rgb = np.stack([_percent_stretch(data[min(i, data.shape[0] - 1)]) for i in range(3)])
    rgb = np.nan_to_num(rgb, nan=0.0)
    return (rgb * 255).round().clip(0, 255).astype(np.uint8)


def write_quicklook(tif: str | Path, png: str | Path, spec: OutputSpec) -> None:
    """Render ``tif`` (an output written for ``spec``) into ``png``, at most MAX_SIDE pixels a side."""
    with rasterio.open(tif) as ds:
        factor = max(1, math.ceil(max(ds.width, ds.height) / MAX_SIDE))
        shape = (ds.count, max(1, ds.height // factor), max(1, ds.width // factor))
        resampling = Resampling.nearest if spec.kind == "classes" else Resampling.average
        data = ds.read(out_shape=shape, resampling=resampling, masked=True)
        colormap = ds.colormap(1) if spec.kind == "classes" else None
        pixel = abs(ds.transform.a) * ds.width / shape[2]
        values = data.filled(np.nan if data.dtype.kind == "f" else 255)
    rgb = render(spec, values.astype(np.float32) if values.dtype.kind == "f" else values, pixel, colormap)
    mask = ~np.ma.getmaskarray(data).any(axis=0)
    rgba = np.concatenate([rgb, (mask * 255).astype(np.uint8)[None]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(png, "w", driver="PNG", width=shape[2], height=shape[1], count=4, dtype="uint8") as dst:
            dst.write(rgba)
    aux = Path(str(png) + ".aux.xml")
    if aux.exists():
        aux.unlink()
