"""Blending window outputs into a scene in bounded memory: a band of rows, flushed as it completes.

Windows arrive in canonical (row-major) order. A window row never writes above the first row
of the window row before it, so once window row k starts, every scene row above its first output
row is final: it is normalised and handed out, and the band moves down. The band holds at most
``TilePlan.band_rows`` rows (one window's height) of the full scene width, whatever the scene's
height: memory is O(width x crop x channels), never O(scene).

The sums run in canonical order whoever computed the windows, so a scene blended from windows
computed on many workers is bit-identical to one computed locally.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .tiling import TilePlan, Window


@dataclass
class Block:
    """Final rows ``row0 .. row0 + n`` of one output: values (K, n, W) and validity (n, W)."""

    row0: int
    values: np.ndarray
    valid: np.ndarray


class BandAccumulator:
    """Weighted sums (``average_patches``) or last-in-terratorch-order wins, over a band of rows."""

    def __init__(self, plan: TilePlan, channels: int, chunk_rows: int = 32) -> None:
        self.plan = plan
        self.chunk_rows = chunk_rows
        self.channels = channels
        self.average = plan.params.average_patches
        rows, width = plan.band_rows, plan.width
        self.capacity = rows
        self.base = 0  # scene row of the band's first row
        self.flushed = 0  # rows handed out so far
        self.sums = np.zeros((channels, rows, width), np.float32)
        self.weights = np.zeros((rows, width), np.float32)
        self.valid = np.zeros((rows, width), bool)
        self.ranks = None if self.average else np.full((rows, width), -1, np.int64)
        self._row = -1

    @property
    def nbytes(self) -> int:
        """Bytes held: bounded by band_rows x width, independent of the scene's height."""
        return sum(a.nbytes for a in (self.sums, self.weights, self.valid, self.ranks) if a is not None)

    def start_window(self, window: Window) -> Iterator[Block]:
        """Call for every window in canonical order (computed or skipped) before ``add``: yields
        the rows that became final."""
        k = window.grid[0]
        if k != self._row:
            self._row = k
            yield from self._flush(self.plan.row_starts[k])

    def add(self, window: Window, values: np.ndarray, valid: np.ndarray) -> None:
        """One window's output (K, crop, crop) and the validity of its input pixels (crop, crop)."""
        r0, r1, c0, c1 = window.dst
        s0, s1, t0, t1 = window.src
        b0, b1 = r0 - self.base, r1 - self.base
        if b0 < 0 or b1 > self.capacity:
            raise AssertionError(f"window {window.index} writes rows {r0}..{r1} outside the band "
                                 f"{self.base}..{self.base + self.capacity}")
        weight = self.plan.masks[window.mask][s0:s1, t0:t1]
        part = values[:, s0:s1, t0:t1]
        if self.average:
            self.sums[:, b0:b1, c0:c1] += part * weight
        else:
            ranks = self.ranks[b0:b1, c0:c1]
            newer = window.rank > ranks
            self.sums[:, b0:b1, c0:c1][:, newer] = part[:, newer]
            ranks[newer] = window.rank
        self.weights[b0:b1, c0:c1] += weight
        self.valid[b0:b1, c0:c1] |= valid[s0:s1, t0:t1]

    def finish(self) -> Iterator[Block]:
        yield from self._flush(self.plan.height)

    def _flush(self, until: int) -> Iterator[Block]:
        """Hand out rows up to ``until`` (exclusive) in blocks of at most ``chunk_rows`` rows, so
        that blocks queued for the writer stay small whatever the scene width."""
        while until > self.base:
            step = min(until - self.base, self.capacity, self.chunk_rows)
            weights = self.weights[:step]
            values = self.sums[:, :step].copy()
            if self.average:
                np.divide(values, weights, out=values, where=weights > 0)
            valid = self.valid[:step] & (weights > 0)
            yield Block(self.base, values, valid)
            self._shift(step)

    def _shift(self, step: int) -> None:
        keep = self.capacity - step
        for array, fill in ((self.sums, 0), (self.weights, 0), (self.valid, False), (self.ranks, -1)):
            if array is None:
                continue
            view = array if array.ndim == 2 else array.transpose(1, 0, 2)
            view[:keep] = view[step:].copy() if keep else view[:0]
            view[keep:] = fill
        self.base += step
