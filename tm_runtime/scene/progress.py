"""A one-line progress bar on stderr: windows done, windows/s, ETA. No dependencies."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``update(done)`` redraws at most every ``interval`` seconds; ``close`` ends the line."""

    def __init__(self, total: int, label: str = "windows", stream: TextIO | None = None, enabled: bool | None = None,
                 interval: float = 0.25) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.start = time.perf_counter()
        self.done = 0
        self._last = 0.0
        self._drawn = -1

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn = self.done
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        eta_text = _clock(eta) if eta == eta else "?"
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} windows  {rate:.1f} windows/s  "
                          f"ETA {eta_text}  elapsed {_clock(elapsed)} ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self._drawn != self.done:
                self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
