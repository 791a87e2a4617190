"""Georeferenced outputs: tiled, compressed GeoTIFF (COG on request), written atomically.

Each output goes to a temporary file next to its destination; rows arrive in order and are
written a whole row of tiles at a time; only when every output of a run is complete are they
renamed into place (``commit``). A failure anywhere removes the temporary files (``abort``), so a
destination either holds a complete file or is untouched. An existing destination is an error
unless ``overwrite``.
"""
from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning

from .ops import OutputSpec
from .source import Grid

UNITS = {"S1GRD": "dB", "S1RTC": "dB", "DEM": "m"}


def check_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work if ``path`` cannot be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file name")
    if not path.parent.exists():
        raise FileNotFoundError(f"the directory of {path} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"cannot write to the directory of {path}")
    return path


def choose_blocksize(count: int, itemsize: int, width: int, height: int, limit: int = 1 << 19) -> int:
    """Square tiles of at most ``limit`` bytes uncompressed (an embedding map has hundreds of bands),
    no larger than the raster needs, 16..256 pixels: small tiles keep the row buffer small too."""
    size = 256
    while size > 16 and (size * size * count * itemsize > limit or size // 2 >= max(width, height)):
        size //= 2
    return size


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


class GeoTiffWriter:
    """One output map, written a row of tiles at a time into a temporary file."""

    def __init__(self, path: str | os.PathLike, grid: Grid, spec: OutputSpec, *, cog: bool = False,
                 overwrite: bool = False, tags: dict | None = None, blocksize: int | None = None,
                 compress: str = "deflate") -> None:
        self.path = check_destination(path, overwrite)
        self.grid = grid
        self.spec = spec
        self.cog = cog
        self.blocksize = blocksize or choose_blocksize(spec.count, np.dtype(spec.dtype).itemsize, grid.width,
                                                       grid.height)
        blocksize = self.blocksize
        self.tmp = temporary_sibling(self.path, ".tif")
        self.final_tmp: Path | None = None
        self.extra: list[tuple[Path, Path]] = []  # (temporary, destination) of side files (quicklooks)
        self._next = 0
        self._buffer = np.zeros((spec.count, 0, grid.width), spec.dtype)
        # GDAL < 3.11 has no Float16 type: GeoTIFF stores half floats as Float32 with NBITS=16.
        dtype = "float32" if spec.dtype == "float16" else spec.dtype
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=spec.count, dtype=dtype,
                       crs=grid.crs, transform=grid.transform, nodata=spec.nodata, tiled=True, blockxsize=blocksize,
                       blockysize=blocksize, compress=compress, BIGTIFF="IF_SAFER",
                       predictor=2 if spec.dtype == "uint8" else 3)
        if spec.dtype == "float16":
            profile["nbits"] = 16
        if spec.dtype == "uint8":
            profile.pop("predictor")  # a class map compresses as well without, and readers need not support it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self._ds = rasterio.open(self.tmp, "w", **profile)
        try:
            self._ds.descriptions = spec.bands
            units = UNITS.get(spec.name)
            if units and spec.kind == "values":
                self._ds.units = (units,) * spec.count
            if spec.kind == "classes":
                colors = spec.colors or ()
                table = {i: (*c, 255) for i, c in enumerate(colors)}
                table[255] = (0, 0, 0, 0)
                self._ds.write_colormap(1, table)
            tags = dict(tags or {})
            if spec.class_names:
                tags["class_names"] = ",".join(spec.class_names)
                self._ds.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(spec.class_names)})
            self._ds.update_tags(**{k: str(v) for k, v in tags.items()})
        except BaseException:
            self.abort()
            raise

    def write(self, row0: int, data: np.ndarray) -> None:
        """Rows ``row0 ..`` of the output (count, n, width); rows must arrive in order."""
        if row0 != self._next:
            raise AssertionError(f"{self.path.name}: rows must arrive in order, expected {self._next}, got {row0}")
        self._next += data.shape[1]
        self._buffer = np.concatenate([self._buffer, data.astype(self.spec.dtype, copy=False)], axis=1)
        full = (self._buffer.shape[1] // self.blocksize) * self.blocksize
        if full:
            self._write_rows(self._buffer[:, :full])
            self._buffer = self._buffer[:, full:].copy()

    def _write_rows(self, rows: np.ndarray) -> None:
        top = self._next - self._buffer.shape[1]
        self._ds.write(rows, window=rasterio.windows.Window(0, top, self.grid.width, rows.shape[1]))

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes

    def close(self) -> Path:
        """Write what is left, close, convert to COG if asked; returns the finished temporary file."""
        if self._next != self.grid.height:
            raise AssertionError(f"{self.path.name}: {self._next} of {self.grid.height} rows written")
        if self._buffer.shape[1]:
            self._write_rows(self._buffer)
            self._buffer = self._buffer[:, :0]
        self._ds.close()
        self.final_tmp = self.tmp
        if self.cog:
            cog_tmp = temporary_sibling(self.path, ".cog.tif")
            extra = {"nbits": 16} if self.spec.dtype == "float16" else {}
            rasterio.shutil.copy(self.tmp, cog_tmp, driver="COG", compress="DEFLATE", blocksize=max(self.blocksize, 64),
                                 overviews="AUTO", BIGTIFF="IF_SAFER",
                                 resampling="NEAREST" if self.spec.kind == "classes" else "AVERAGE", **extra)
            self.tmp.unlink()
            self.final_tmp = cog_tmp
        return self.final_tmp

    def commit(self) -> Path:
        os.replace(self.final_tmp, self.path)
        for tmp, dest in self.extra:
            os.replace(tmp, dest)
        return self.path

    def abort(self) -> None:
        ds = getattr(self, "_ds", None)
        if ds is not None and not ds.closed:
            try:
                ds.close()
            except Exception:  # noqa: BLE001 - cleaning up after another error
                pass
        for p in [self.tmp, self.final_tmp, *(t for t, _ in self.extra)]:
            if p is not None:
                for side in (p, Path(str(p) + ".aux.xml")):
                    try:
                        side.unlink()
                    except FileNotFoundError:
                        pass
