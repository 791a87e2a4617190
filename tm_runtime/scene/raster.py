"""GeoTIFF / COG inputs through rasterio: band selection, alignment to one grid, nodata, extents.

The first modality's grid is the reference. Another modality on the same grid is read directly;
on any other grid (another resolution, CRS or origin) it is warped onto the reference grid
window by window through a WarpedVRT: bilinear for reflectance, backscatter, DEM and NDVI,
nearest for class maps (LULC). Where modalities cover different extents the scene is their
intersection (a warning says so); grids that do not overlap are an error.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader, MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window as RioWindow
from rasterio.windows import from_bounds
from rasterio.windows import transform as window_transform

from .source import DateStackReader, Grid, Scene, date_sources, fill_invalid
from .specs import ModalitySpec

# Sentinel-2 band codes for TerraMind's band names, so files described "B02" or "B8A" match.
BAND_ALIASES: dict[str, tuple[str, ...]] = {
    "COASTAL_AEROSOL": ("B01", "B1", "COASTAL"), "BLUE": ("B02", "B2"), "GREEN": ("B03", "B3"),
    "RED": ("B04", "B4"), "RED_EDGE_1": ("B05", "B5", "RE1"), "RED_EDGE_2": ("B06", "B6", "RE2"),
    "RED_EDGE_3": ("B07", "B7", "RE3"), "NIR_BROAD": ("B08", "B8", "NIR"), "NIR_NARROW": ("B8A", "NIR08"),
    "WATER_VAPOR": ("B09", "B9", "WATER_VAPOUR"), "CIRRUS": ("B10",), "SWIR_1": ("B11", "SWIR16"),
    "SWIR_2": ("B12", "SWIR22"), "DEM": ("ELEVATION", "HEIGHT"),
}


@dataclass(frozen=True)
class GeoArray:
    """An in-memory input: (bands, height, width) with its affine transform and CRS."""

    array: np.ndarray
    transform: Any
    crs: Any
    nodata: float | None = None
    descriptions: tuple[str | None, ...] | None = None


def _norm(text: str | None) -> str:
    return (text or "").strip().upper().replace(" ", "_").replace("-", "_")


def _band_keys(name: str) -> set[str]:
    return {_norm(name), *(_norm(a) for a in BAND_ALIASES.get(_norm(name), ()))}


def select_bands(spec: ModalitySpec, label: str, descriptions: Sequence[str | None],
                 requested: Sequence[str | int] | None) -> list[int]:
    """1-based band indexes of ``label`` to read for ``spec``: the requested names or indexes, else
    the file's band descriptions if they name every band, else all bands if the count fits."""
    count = len(descriptions)
    listed = (", ".join(repr(d) if d else f"#{i + 1} (none)" for i, d in enumerate(descriptions))
              if any(descriptions) else "(it has no band descriptions)")
    want = spec.file_bands
    expected = "a class map (1 band)" if spec.class_map else f"{want} ({', '.join(spec.bands)})"
    if requested is not None:
        indexes = []
        for item in requested:
            if isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.strip().isdigit()):
                index = int(item)
                if not 1 <= index <= count:
                    raise ValueError(f"{spec.name}: band index {index} is out of range for {label} ({count} bands; "
                                     "indexes start at 1)")
                indexes.append(index)
                continue
            matches = [i + 1 for i, d in enumerate(descriptions) if _norm(d) in _band_keys(str(item))]
            if not matches:
                raise ValueError(f"{spec.name}: band {item!r} not found in {label}; its band descriptions: {listed}; "
                                 "select bands by 1-based index instead")
            indexes.append(matches[0])
        if len(indexes) != want:
            raise ValueError(f"{spec.name}: {len(indexes)} bands selected from {label}, the export expects {expected}")
        return indexes
    if not spec.class_map:
        by_name = [[i + 1 for i, d in enumerate(descriptions) if _norm(d) in _band_keys(b)] for b in spec.bands]
        if all(len(m) == 1 for m in by_name):
            return [m[0] for m in by_name]
    if count == want:
        return list(range(1, count + 1))
    if spec.full_bands and count == len(spec.full_bands) and set(spec.bands) <= set(spec.full_bands):
        # No usable descriptions, but all the modality's bands in TerraMind's order: pick the subset.
        return [spec.full_bands.index(b) + 1 for b in spec.bands]
    raise ValueError(f"{spec.name}: {label} has {count} bands ({listed}), the export expects {expected}; select "
                     f"them by name or 1-based index, e.g. --bands {spec.name}="
                     + ",".join(str(i + 1) for i in range(min(want, count))))


def _same_grid(a, b) -> bool:
    return (a.crs == b.crs and a.width == b.width and a.height == b.height
            and a.transform.almost_equals(b.transform, precision=1e-6 * max(abs(a.transform.a), 1e-12)))


def _footprint(dataset, ref) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1) of the reference grid covered by ``dataset``'s bounds, or None."""
    bounds = dataset.bounds
    if dataset.crs != ref.crs:
        bounds = transform_bounds(dataset.crs, ref.crs, *bounds, densify_pts=21)
    w = from_bounds(*bounds, transform=ref.transform)
    r0 = max(math.floor(w.row_off + 1e-6), 0)
    c0 = max(math.floor(w.col_off + 1e-6), 0)
    r1 = min(math.ceil(w.row_off + w.height - 1e-6), ref.height)
    c1 = min(math.ceil(w.col_off + w.width - 1e-6), ref.width)
    return (r0, r1, c0, c1) if r1 > r0 and c1 > c0 else None


class RasterReader:
    """Reads selected bands of a dataset (or of a WarpedVRT onto the reference grid) as float32."""

    def __init__(self, name: str, dataset, indexes: list[int], offset: tuple[int, int],
                 nodata: float | None, fill: Sequence[float] | None, alpha: int | None = None,
                 owned: Sequence[Any] = ()) -> None:
        self.name = name
        self.dataset = dataset
        self.indexes = indexes
        self.channels = len(indexes)
        self.offset = offset
        self.nodata = nodata
        self.fill = fill
        self.alpha = alpha
        self._owned = list(owned)
        flags = [dataset.mask_flag_enums[i - 1] for i in indexes]
        self._has_masks = alpha is None and any(MaskFlags.all_valid not in f for f in flags)

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        window = RioWindow(c0 + self.offset[1], r0 + self.offset[0], c1 - c0, r1 - r0)
        try:
            data = self.dataset.read(self.indexes, window=window, out_dtype="float32")
            valid = np.isfinite(data).all(axis=0)
            if self.alpha is not None:
                valid &= self.dataset.read(self.alpha, window=window) > 0
            elif self._has_masks:
                valid &= (self.dataset.read_masks(self.indexes, window=window) > 0).all(axis=0)
        except RasterioError as error:
            raise OSError(f"{self.name}: reading rows {r0}..{r1}, columns {c0}..{c1} of {self.dataset.name} "
                          f"failed: {error}") from error
        if self.nodata is not None and not math.isnan(self.nodata):
            valid &= ~(data == np.float32(self.nodata)).any(axis=0)
        return fill_invalid(data, valid, self.fill), valid

    def close(self) -> None:
        for thing in reversed(self._owned):
            thing.close()
        self._owned = []


def _open(name: str, source: Any, stack: list) -> tuple[Any, str]:
    """A rasterio dataset for a path, an open dataset or a GeoArray; closing is ours for the first
    and the last (they go on ``stack``)."""
    if isinstance(source, (DatasetReader, WarpedVRT)) or hasattr(source, "read_masks"):
        return source, getattr(source, "name", name)
    if isinstance(source, tuple) and len(source) in (3, 4) and isinstance(source[0], np.ndarray):
        source = GeoArray(*source)
    if isinstance(source, GeoArray):
        array = source.array[None] if source.array.ndim == 2 else source.array
        if array.ndim != 3:
            raise ValueError(f"{name}: a scene array must be (bands, height, width), got shape {tuple(source.array.shape)}")
        memfile = MemoryFile()
        stack.append(memfile)
        with memfile.open(driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                          dtype=array.dtype, crs=source.crs, transform=source.transform, nodata=source.nodata) as dst:
            dst.write(array)
            if source.descriptions:
                dst.descriptions = tuple(source.descriptions)
        dataset = memfile.open()
        stack.append(dataset)
        return dataset, f"the {name} array"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if "://" not in path and not path.startswith("/vsi") and not Path(path).exists():
            raise FileNotFoundError(f"{name}: no such file: {path}")
        try:
            dataset = rasterio.open(path)
        except RasterioError as error:
            raise ValueError(f"{name}: cannot read {path} as a raster (unreadable or corrupt): {error}") from None
        stack.append(dataset)
        return dataset, path
    raise TypeError(f"{name}: expected a GeoTIFF path, an open rasterio dataset or a GeoArray(array, transform, crs), "
                    f"got {type(source).__name__}")


@dataclass
class SceneOptions:
    """Per-modality choices: bands (names or 1-based indexes), nodata override, resampling."""

    bands: Mapping[str, Sequence[str | int]] = field(default_factory=dict)
    nodata: Mapping[str, float] = field(default_factory=dict)
    resampling: Mapping[str, str] = field(default_factory=dict)


def open_scene(inputs: Mapping[str, Any], specs: Mapping[str, ModalitySpec],
               options: SceneOptions | None = None) -> Scene:
    """Open every input and align it to the first one's grid; the scene is their common extent."""
    options = options or SceneOptions()
    if not inputs:
        raise ValueError("no inputs: pass at least one modality, e.g. --input S2L2A=scene.tif")
    unknown = [m for m in list(options.bands) + list(options.nodata) + list(options.resampling) if m not in inputs]
    if unknown:
        raise ValueError(f"options given for {', '.join(sorted(set(unknown)))}, which is not among the inputs "
                         f"({', '.join(inputs)})")
    stack: list = []
    try:
        return _open_scene(inputs, specs, options, stack)
    except BaseException:
        for thing in reversed(stack):
            thing.close()
        raise


def _open_scene(inputs, specs, options, stack) -> Scene:
    # Per modality one dataset per date (a list of sources); the first date of the first modality
    # is the reference grid, and every date of every modality is aligned to it.
    labels = {name: [name] if len(dates) == 1 else [f"{name} date {t + 1}" for t in range(len(dates))]
              for name, dates in ((name, date_sources(source)) for name, source in inputs.items())}
    opened = {name: [_open(label, source, stack) for label, source in zip(labels[name], date_sources(inputs[name]))]
              for name in inputs}
    ref_name = next(iter(opened))
    ref, ref_label = opened[ref_name][0]
    flat = [(who, dataset, label) for name, dates in opened.items()
            for who, (dataset, label) in zip(labels[name], dates)]
    if ref.crs is None:
        others = [n for n, d, _ in flat[1:] if (d.width, d.height) != (ref.width, ref.height)]
        if others:
            raise ValueError(f"{ref_name}: {ref_label} has no CRS, so {', '.join(others)} cannot be aligned to it")
        warnings.warn(f"{ref_name}: {ref_label} has no CRS; outputs will not be georeferenced", stacklevel=3)

    # The common extent, in pixels of the reference grid.
    r0, r1, c0, c1 = 0, ref.height, 0, ref.width
    for name, dataset, label in flat[1:]:
        if ref.crs is None:
            continue
        if dataset.crs is None:
            raise ValueError(f"{name}: {label} has no CRS, so it cannot be aligned to {ref_name}'s grid")
        box = _footprint(dataset, ref)
        if box is None:
            raise ValueError(f"{name}: {label} does not overlap {ref_name}'s grid ({ref_label}): its bounds "
                             f"{tuple(round(v, 3) for v in dataset.bounds)} in {dataset.crs} vs "
                             f"{tuple(round(v, 3) for v in ref.bounds)} in {ref.crs}")
        r0, r1, c0, c1 = max(r0, box[0]), min(r1, box[1]), max(c0, box[2]), min(c1, box[3])
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"the inputs {', '.join(inputs)} have no area in common")
    if (r0, r1, c0, c1) != (0, ref.height, 0, ref.width):
        warnings.warn(f"the inputs cover different extents: processing their intersection, rows {r0}..{r1} and "
                      f"columns {c0}..{c1} of {ref_name}'s grid ({r1 - r0} x {c1 - c0} of {ref.height} x {ref.width} "
                      "pixels); outputs cover only that", stacklevel=3)
    transform = window_transform(RioWindow(c0, r0, c1 - c0, r1 - r0), ref.transform) if ref.crs is not None else ref.transform
    grid = Grid(r1 - r0, c1 - c0, transform, ref.crs)

    readers = {}
    description = {}
    for name, dates in opened.items():
        spec = specs[name]
        per_date = [_reader(name, spec, dataset, label, t, ref, (r0, c0), options, stack)
                    for t, (dataset, label) in enumerate(dates)]
        if len(per_date) == 1:
            readers[name], description[name] = per_date[0]
        else:
            readers[name] = DateStackReader(name, [reader for reader, _ in per_date])
            description[name] = {key: [info[key] for _, info in per_date] for key in ("source", "bands", "aligned")}
            description[name]["dates"] = len(per_date)
    owned = list(stack)
    stack.clear()
    scene = Scene(grid, readers, {"inputs": description, "window": [r0, r1, c0, c1]})
    first = readers[ref_name]
    first = first.dates[0] if isinstance(first, DateStackReader) else first
    first._owned = owned  # closed with the scene
    return scene


def _reader(name: str, spec: ModalitySpec, dataset, label: str, t: int, ref, offset: tuple[int, int],
            options: SceneOptions, stack: list) -> tuple[RasterReader, dict]:
    """The reader of one date of one modality, read directly or warped onto the reference grid."""
    indexes = select_bands(spec, label, dataset.descriptions, options.bands.get(name))
    nodata = options.nodata.get(name)
    fill = (0.0,) if spec.class_map else spec.fill_of_date(t)
    if dataset is ref or ref.crs is None or _same_grid(dataset, ref):
        reader = RasterReader(name, dataset, indexes, offset, nodata, fill)
        aligned = "direct"
    else:
        method = options.resampling.get(name) or ("nearest" if spec.class_map else "bilinear")
        try:
            resampling = Resampling[method]
        except KeyError:
            raise ValueError(f"{name}: unknown resampling {method!r}; use one of "
                             f"{', '.join(r.name for r in Resampling)}") from None
        vrt = WarpedVRT(dataset, crs=ref.crs, transform=ref.transform, width=ref.width, height=ref.height,
                        resampling=resampling, add_alpha=True)
        stack.append(vrt)
        reader = RasterReader(name, vrt, indexes, offset, nodata, fill, alpha=vrt.count)
        aligned = f"warped ({resampling.name})"
    return reader, {"source": label, "bands": indexes, "aligned": aligned}
