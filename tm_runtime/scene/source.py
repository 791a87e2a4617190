"""A scene as the tiler sees it: a grid and, per modality, a reader of pixel rectangles.

Pure numpy; GeoTIFF readers (``raster.py``) and in-memory arrays both fit this shape. Readers
return float32 values and a validity mask (False where any selected band is nodata or not
finite); invalid pixels are filled with ``fill`` per band (the modality's pretraining mean,
neutral after standardisation) so that the model never sees nodata values.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .tiling import source_indices


@dataclass(frozen=True)
class Grid:
    """The pixel grid outputs are written on: size, affine transform and CRS (opaque here)."""

    height: int
    width: int
    transform: Any = None
    crs: Any = None

    def scaled(self, factor: int) -> "Grid":
        """The grid of a map with one pixel per ``factor`` x ``factor`` pixels (embeddings)."""
        if factor == 1:
            return self
        transform = self.transform @ type(self.transform).scale(factor) if self.transform is not None else None
        return Grid(-(-self.height // factor), -(-self.width // factor), transform, self.crs)


class ModalityReader(Protocol):
    name: str
    channels: int

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels [r0, r1) x [c0, c1) of the scene grid: (C, h, w) float32, valid (h, w) bool."""


def date_sources(source: Any) -> list:
    """The sources of one input modality, one per date: a list (or a tuple that is not an
    ``(array, transform, crs[, nodata])`` GeoArray tuple) holds several dates in order; anything
    else is one date."""
    if isinstance(source, list) or (isinstance(source, tuple) and not (source and isinstance(source[0], np.ndarray))):
        if not source:
            raise ValueError("an input modality was given an empty list of dates")
        return list(source)
    return [source]


def fill_invalid(data: np.ndarray, valid: np.ndarray, fill: Sequence[float] | None) -> np.ndarray:
    """Replace the values of invalid pixels by ``fill`` per band (in place)."""
    if fill is not None and not valid.all():
        hole = ~valid
        for band, value in zip(data, fill):
            band[hole] = value
    return data


@dataclass
class ArrayReader:
    """An in-memory (C, H, W) array on the scene grid; ``nodata`` marks invalid pixels."""

    name: str
    array: np.ndarray
    nodata: float | None = None
    fill: Sequence[float] | None = None
    channels: int = field(init=False)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"{self.name}: a scene array must be (bands, height, width), got shape "
                             f"{tuple(self.array.shape)}")
        self.channels = self.array.shape[0]

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        data = np.array(self.array[:, r0:r1, c0:c1], dtype=np.float32)
        valid = np.isfinite(data).all(axis=0)
        if self.nodata is not None and not np.isnan(self.nodata):
            valid &= ~(data == np.float32(self.nodata)).any(axis=0)
        return fill_invalid(data, valid, self.fill), valid


class DateStackReader:
    """One modality over several dates (one aligned reader per date) as a single reader of
    (C * T, h, w): band-major (band c of date t at c * T + t), so that a batch of windows reshapes
    to the (B, C, T, H, W) a temporal model takes. Each date fills its own invalid pixels; a pixel
    is valid where every date is."""

    def __init__(self, name: str, dates: Sequence[ModalityReader]) -> None:
        channels = {reader.channels for reader in dates}
        if len(channels) != 1:
            raise ValueError(f"{name}: the dates have different band counts ({sorted(channels)})")
        self.name = name
        self.dates = list(dates)
        self.channels = channels.pop() * len(self.dates)

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [reader.read(r0, r1, c0, c1) for reader in self.dates]
        data = np.stack([p[0] for p in parts], axis=1)  # (C, T, h, w)
        valid = np.logical_and.reduce([p[1] for p in parts])
        return data.reshape(-1, *data.shape[2:]), valid

    def close(self) -> None:
        for reader in self.dates:
            close = getattr(reader, "close", None)
            if close:
                close()


@dataclass
class Scene:
    """The grid and the aligned readers of every input modality (first = the reference grid)."""

    grid: Grid
    readers: dict[str, ModalityReader]
    description: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for reader in self.readers.values():
            close = getattr(reader, "close", None)
            if close:
                close()

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_window(scene: Scene, row: int, col: int, size: int, padding: str | None
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One window of ``size`` x ``size`` scene pixels at (row, col), padded beyond the scene as
    terratorch pads the whole image; returns {modality: (C, size, size)} and the validity of the
    window's pixels (False outside the scene)."""
    rows, rows_inside = source_indices(row, row + size, scene.grid.height, padding)
    cols, cols_inside = source_indices(col, col + size, scene.grid.width, padding)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    plain = (r1 - r0 == size and c1 - c0 == size and rows_inside.all() and cols_inside.all())
    inside = rows_inside[:, None] & cols_inside[None, :]
    arrays: dict[str, np.ndarray] = {}
    valid = None
    for name, reader in scene.readers.items():
        data, ok = reader.read(r0, r1, c0, c1)
        if not plain:
            data = data[:, rows - r0][:, :, cols - c0]
            ok = ok[rows - r0][:, cols - c0]
            if not inside.all():
                data[:, ~inside] = 0.0  # 'constant' padding (and scenes smaller than a window without padding)
        arrays[name] = data
        valid = ok if valid is None else valid & ok
    in_scene = (np.arange(row, row + size)[:, None] >= 0) & (np.arange(row, row + size)[:, None] < scene.grid.height)
    in_scene = in_scene & (np.arange(col, col + size)[None, :] >= 0) & (np.arange(col, col + size)[None, :] < scene.grid.width)
    return arrays, valid & in_scene
