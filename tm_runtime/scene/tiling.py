"""Where the windows of a scene go and how their outputs are weighted: terratorch's tiled inference.

Pure numpy. The numbers and rules are those of ``terratorch.tasks.tiled_inference`` (defaults crop
224, stride 192, delta 8, blend_overlaps, average_patches, padding "reflect", batch_size 16):

* With padding, the scene is padded by ``delta`` on every side; window origins along an axis of
  padded length P are ``range(0, P - crop - 1, stride)`` plus a last window flush with the far edge
  (``P - crop``). Every window drops ``delta`` pixels on each side of its output; what is left
  lands on the scene, where the padding is cut off again.
* Without padding, windows touching the scene border keep their whole output and weigh it with a
  blend mask made without ``delta``; interior windows drop ``delta`` like above.
* ``blend_overlaps``: outputs are weighted by a raised-cosine ramp over the overlap (plus 1e-6 so
  that every pixel has weight); ``average_patches``: the output is the weighted sum divided by the
  summed weights, otherwise the window that terratorch processes last overwrites the others.
* A scene no larger than one window runs as that single window (terratorch's shortcut).

Everything here is in *output units*: pixels for pixel maps, 16 x 16 patches for embedding maps
(``scale=16``), where crop, stride and delta are divided by the patch size.

Where we go beyond terratorch (documented in the README): a scene smaller than one window along
one axis only is padded up to one window (terratorch would slice past the image); 'circular'
padding is refused (it would wrap the opposite edge of a scene into a window).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

PADDING_MODES = ("reflect", "replicate", "constant")


@dataclass(frozen=True)
class TilingParams:
    """terratorch's tiled-inference settings, with its defaults."""

    crop: int = 224
    stride: int = 192
    delta: int = 8
    blend_overlaps: bool = True
    average_patches: bool = True
    padding: str | None = "reflect"
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("crop", "stride", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"tiling: {name} must be a positive integer, got {value!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, np.integer)) or self.delta < 0:
            raise ValueError(f"tiling: delta must be a non-negative integer, got {self.delta!r}")
        if self.stride > self.crop:
            raise ValueError(f"tiling: stride ({self.stride}) larger than crop ({self.crop}) would leave gaps "
                             "between windows")
        if self.padding in (False, "none", "", None):
            object.__setattr__(self, "padding", None)
        elif self.padding == "circular":
            raise ValueError("tiling: padding 'circular' is not supported for scenes (it would wrap the opposite "
                             f"edge of the scene into a window); use one of {', '.join(PADDING_MODES)} or None")
        elif self.padding not in PADDING_MODES:
            raise ValueError(f"tiling: padding must be one of {', '.join(PADDING_MODES)} or None, got {self.padding!r}")

    @classmethod
    def from_terratorch(cls, settings: Mapping[str, Any], base: "TilingParams | None" = None) -> "TilingParams":
        """``base`` (default: terratorch's defaults) updated with terratorch's tiled-inference keyword
        arguments (a task config's ``tiled_inference_parameters``); windows are square here."""
        settings = dict(settings)
        for axis in ("crop", "stride"):
            h, w = settings.pop(f"h_{axis}", None), settings.pop(f"w_{axis}", None)
            if h is not None or w is not None:
                if h is not None and w is not None and h != w:
                    raise ValueError(f"tiling: h_{axis} ({h}) and w_{axis} ({w}) differ; scenes use square windows")
                settings.setdefault(axis, h if h is not None else w)
        settings.pop("verbose", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"tiling: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(base or cls(), **settings)

    def in_units(self, scale: int) -> "TilingParams":
        """The same tiling in units of ``scale`` pixels (16 for embedding maps: one unit per patch).
        crop and stride must be whole multiples of ``scale``; delta is rounded down."""
        if scale == 1:
            return self
        for name in ("crop", "stride"):
            if getattr(self, name) % scale:
                raise ValueError(f"tiling: {name} ({getattr(self, name)}) must be a multiple of {scale} for a map "
                                 f"with one pixel per {scale}x{scale} patch")
        return TilingParams(self.crop // scale, self.stride // scale, self.delta // scale, self.blend_overlaps,
                            self.average_patches, self.padding, self.batch_size)


def blend_mask(crop: int, stride: int, delta: int) -> np.ndarray:
    """terratorch's ``get_blend_mask`` (square): a (crop - 2 delta)^2 float32 weight, a raised-cosine
    ramp over the overlap on every edge, + 1e-6 so no pixel has zero weight."""
    overlap = min(crop // 2, crop - stride) - delta
    size = crop - 2 * delta
    line = np.ones(size, dtype=np.float32)
    if overlap:
        k = np.arange(overlap, dtype=np.float32)
        ramp = (np.cos(np.float32(math.pi) * (k + 1) / np.float32(overlap + 1)) / 2 + np.float32(0.5)).astype(np.float32)
        line[:overlap] = ramp[::-1]
        line[-overlap:] = ramp
    return (line[:, None] * line[None, :] + np.float32(1e-6)).astype(np.float32)


@dataclass(frozen=True)
class Window:
    """One window: where it reads and where its output lands, in output units of the scene.

    ``row``/``col``: origin of the window in the scene (negative inside the padding);
    ``grid``: (row index, column index) in the window grid, its position for seeds;
    ``dst``: (row0, row1, col0, col1) in the scene that receive output;
    ``src``: (row0, row1, col0, col1) of the window's output that lands there;
    ``mask``: key of its weight in ``TilePlan.masks`` (full crop x crop, zero where cropped);
    ``rank``: its place in terratorch's processing order (the last one wins without averaging).
    """

    index: int
    row: int
    col: int
    grid: tuple[int, int]
    dst: tuple[int, int, int, int]
    src: tuple[int, int, int, int]
    mask: str
    rank: int


@dataclass
class TilePlan:
    """Every window of a scene in canonical (row-major) order, their weights and the row bands."""

    height: int  # of the scene, in output units
    width: int
    params: TilingParams  # in output units (delta possibly reduced, as terratorch does)
    windows: list[Window]
    masks: dict[str, np.ndarray]
    row_starts: list[int] = field(default_factory=list)  # per window row: first scene row it writes

    @property
    def crop(self) -> int:
        return self.params.crop

    @property
    def band_rows(self) -> int:
        """Rows an accumulator must hold: from a window row's first output row to the last row
        any window of it writes (later rows never start above an earlier row's start)."""
        ends: dict[int, int] = {}
        for w in self.windows:
            ends[w.grid[0]] = max(ends.get(w.grid[0], 0), w.dst[1])
        return max(end - self.row_starts[k] for k, end in ends.items())

    def batches(self) -> list[list[int]]:
        """Window indices in canonical order, in chunks of ``batch_size``: the unit of work of every
        executor, so the same windows share a batch however the work is distributed."""
        size = self.params.batch_size
        return [list(range(i, min(i + size, len(self.windows)))) for i in range(0, len(self.windows), size)]


def _axis_starts(padded: int, crop: int, stride: int, delta: int, padding: str | None) -> list[int]:
    """terratorch's window origins along one padded axis: a regular grid ``range(0, padded - crop - 1,
    stride)``, then one flush with the end. Where that grid leaves pixels without output
    (terratorch raises then, e.g. for padded == crop + 1, where the grid is empty and the first
    window is missing), the missing windows are added."""
    starts = list(range(0, padded - crop - 1, stride)) + [padded - crop]
    last = len(starts) - 1

    def kept(i: int, x: int) -> tuple[int, int]:
        edge = not padding and (x == 0 or i == last)  # edge windows keep all their output (no padding)
        return (x, x + crop) if edge else (x + delta, x + crop - delta)

    if starts[0] != 0:
        starts.insert(0, 0)
        last += 1
    i = 0
    while i < len(starts) - 1:
        end, start = kept(i, starts[i])[1], kept(i + 1, starts[i + 1])[0]
        if start > end:  # a gap between two windows: one more window right after the first
            starts.insert(i + 1, min(end - delta, padded - crop))
            last += 1
        i += 1
    return starts


def effective_delta(params: TilingParams) -> int:
    """terratorch lowers delta to half the overlap so that every pixel stays covered (with a warning)."""
    half_overlap = (params.crop - params.stride) // 2
    if half_overlap < params.delta:
        warnings.warn(f"Tiled inference: delta is higher than overlap, reducing delta to {half_overlap}.",
                      stacklevel=3)
        return half_overlap
    return params.delta


def plan_windows(height: int, width: int, params: TilingParams) -> TilePlan:
    """All windows for a scene of ``height`` x ``width`` output units."""
    if height < 1 or width < 1:
        raise ValueError(f"tiling: the scene is empty ({height} x {width})")
    crop = params.crop
    if height <= crop and width <= crop:
        # terratorch runs such an input in one forward pass, without delta or blending.
        mask = np.ones((crop, crop), np.float32)
        window = Window(0, 0, 0, (0, 0), (0, height, 0, width), (0, height, 0, width), "single", 0)
        return TilePlan(height, width, params, [window], {"single": mask}, [0])

    delta = effective_delta(params)
    params = TilingParams(crop, params.stride, delta, params.blend_overlaps, params.average_patches, params.padding,
                          params.batch_size)
    pad = delta if params.padding else 0
    # An axis shorter than a window (after padding) is padded up to one window at its far end.
    rows = _axis_starts(max(height + 2 * pad, crop), crop, params.stride, delta, params.padding)
    cols = _axis_starts(max(width + 2 * pad, crop), crop, params.stride, delta, params.padding)

    inner = np.zeros((crop, crop), np.float32)
    inner[delta:crop - delta, delta:crop - delta] = (
        blend_mask(crop, params.stride, delta) if params.blend_overlaps else 1.0)
    masks = {"inner": inner}
    if not params.padding:
        masks["border"] = blend_mask(crop, params.stride, 0) if params.blend_overlaps else np.ones((crop, crop),
                                                                                                    np.float32)
    ranks = _terratorch_order(rows, cols)

    windows: list[Window] = []
    row_starts: list[int] = []
    for k, r in enumerate(rows):
        row_start = None
        for j, c in enumerate(cols):
            border = not params.padding and (r == 0 or c == 0 or k == len(rows) - 1 or j == len(cols) - 1)
            keep = 0 if border else delta  # pixels dropped on each side of the window's output
            origin_r, origin_c = r - pad, c - pad  # in scene coordinates
            r0, r1 = max(origin_r + keep, 0), min(origin_r + crop - keep, height)
            c0, c1 = max(origin_c + keep, 0), min(origin_c + crop - keep, width)
            windows.append(Window(len(windows), origin_r, origin_c, (k, j), (r0, r1, c0, c1),
                                  (r0 - origin_r, r1 - origin_r, c0 - origin_c, c1 - origin_c),
                                  "border" if border else "inner", ranks[(k, j)]))
            row_start = r0 if row_start is None else min(row_start, r0)
        row_starts.append(row_start)
    _check_coverage(height, width, windows)
    return TilePlan(height, width, params, windows, masks, row_starts)


def _terratorch_order(rows: list[int], cols: list[int]) -> dict[tuple[int, int], int]:
    """terratorch's processing order: the right column of windows, the bottom row, the corner,
    then the rest row by row (matters only without average_patches, where the last one wins)."""
    last_r, last_c = len(rows) - 1, len(cols) - 1
    order = [(k, last_c) for k in range(last_r)] + [(last_r, j) for j in range(last_c)] + [(last_r, last_c)]
    order += [(k, j) for k in range(last_r) for j in range(last_c)]
    return {pos: rank for rank, pos in enumerate(order)}


def _check_coverage(height: int, width: int, windows: list[Window]) -> None:
    """Every pixel must receive output (terratorch raises the same way). Checked exactly on the
    grid of cells cut by the windows' edges (a few per window, not per pixel)."""
    row_cuts = np.unique([0, height] + [v for w in windows for v in w.dst[:2]])
    col_cuts = np.unique([0, width] + [v for w in windows for v in w.dst[2:]])
    covered = np.zeros((len(row_cuts) - 1, len(col_cuts) - 1), bool)
    for w in windows:
        r0, r1 = np.searchsorted(row_cuts, w.dst[:2])
        c0, c1 = np.searchsorted(col_cuts, w.dst[2:])
        covered[r0:r1, c0:c1] = True
    if not covered.all():
        r, c = np.argwhere(~covered)[0]
        raise RuntimeError(f"tiling: pixels from row {row_cuts[r]} and column {col_cuts[c]} would receive no output "
                           "with these crop/stride/delta settings")


def source_indices(start: int, stop: int, size: int, padding: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Scene indices that fill positions ``start..stop-1`` of an axis of ``size`` pixels, and
    whether each position lies inside the scene. Outside: torch's 'reflect' (mirror without
    repeating the edge, repeated for pads longer than the axis), 'replicate' (edge value),
    'constant' (marked outside; the caller writes zeros). Without padding, positions beyond the
    scene occur only when the scene is smaller than a window; they are filled like 'constant'."""
    idx = np.arange(start, stop)
    inside = (idx >= 0) & (idx < size)
    if padding == "reflect" and size > 1:
        period = 2 * (size - 1)
        folded = np.mod(idx, period)
        mapped = np.where(folded >= size, period - folded, folded)
    elif padding == "reflect" or padding == "replicate":
        mapped = np.clip(idx, 0, size - 1)
    else:
        mapped = np.clip(idx, 0, size - 1)
        return mapped, inside
    return mapped, np.ones_like(inside)
