"""Peak resident memory of the export, overall and per step.

Linux keeps a high-water mark of the process's RSS (VmHWM) and lets the process reset it
(``/proc/self/clear_refs`` <- "5"): reading it at the end of a step and resetting it gives that
step's own peak, exactly (a sampling thread would miss peaks inside C++ calls that hold the GIL,
e.g. protobuf serialisation). Elsewhere (macOS) only the overall peak is known (``ru_maxrss``).

A ``PeakWindow`` is the peak between its opening and closing (``export`` records its own);
export code marks its steps with ``with step("trace"): ...``, which a ``StepLog`` (the memory
profiler's, ``scripts/profile_export_memory.py``) collects; ``peak_rss_bytes()`` is the peak since
the process started. The resets lower what ``ru_maxrss`` reports afterwards: read these instead.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_peak_before_reset = 0  # the largest high-water mark seen before a reset
_can_reset: bool | None = None  # whether /proc/self/clear_refs may be written


def _status_kb(key: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kb = _status_kb("VmRSS:")
    return kb * 1024 if kb is not None else _hwm_bytes()  # not Linux: the peak stands in for it


def _hwm_bytes() -> int:
    kb = _status_kb("VmHWM:")
    if kb is not None:
        return kb * 1024
    import resource  # not on Windows, where nothing here can measure

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class PeakWindow:
    """The peak RSS between its opening and now (or its closing): open windows see every reset."""

    def __init__(self) -> None:
        _fold()
        self.peak = current_rss_bytes()
        self.start_rss = self.peak
        _windows.add(self)

    def close(self) -> int:
        _fold()
        _windows.discard(self)
        return self.peak


_windows: weakref.WeakSet[PeakWindow] = weakref.WeakSet()  # a window dropped unclosed leaves by itself


def _fold() -> None:
    """Credit the high-water mark so far to every open window, then reset it to the current RSS
    (where Linux allows; elsewhere windows share the process's overall peak)."""
    global _can_reset, _peak_before_reset
    peak = _hwm_bytes()
    _peak_before_reset = max(_peak_before_reset, peak)
    for window in _windows:
        window.peak = max(window.peak, peak)
    if _can_reset is False:
        return
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _can_reset = True
    except OSError:
        _can_reset = False


def peak_rss_bytes() -> int:
    """The process's peak RSS since it started."""
    return max(_peak_before_reset, _hwm_bytes())


_libc = None


def release_memory(collect: bool = False) -> None:
    """Hand freed heap pages back to the OS (glibc keeps freed small blocks otherwise, and the next
    step's peak would stand on them); with ``collect``, collect reference cycles first (a full
    collection takes ~0.3 s with torch loaded: done between models, not after every graph)."""
    global _libc
    if collect:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


@dataclass
class StepRecord:
    graph: str
    step: str
    rss_before: int
    peak: int  # the step's own peak RSS (the overall peak so far where the high-water mark cannot be reset)
    rss_after: int
    seconds: float

    @property
    def cost(self) -> int:
        """How far above its starting RSS the step went."""
        return self.peak - self.rss_before


@dataclass
class StepLog:
    records: list[StepRecord] = field(default_factory=list)
    graph: str = ""
    # Called with each record as its step ends (a profile that is killed still shows how far it got).
    on_record: Callable[[StepRecord], None] | None = None


_log: StepLog | None = None


@contextmanager
def recording(log: StepLog) -> Iterator[StepLog]:
    """Record every ``step`` inside this block into ``log`` (the memory profiler uses it)."""
    global _log
    previous, _log = _log, log
    try:
        yield log
    finally:
        _log = previous


@contextmanager
def step(name: str, graph: str | None = None) -> Iterator[None]:
    """Mark one export step (steps may nest); recorded only inside ``recording``: its own peak RSS."""
    log = _log
    if log is None:
        yield
        return
    if graph is not None:
        log.graph = graph
    window, t0, index = PeakWindow(), time.perf_counter(), len(log.records)
    try:
        yield
    finally:
        peak = window.close()
        record = StepRecord(log.graph, name, window.start_rss, peak, current_rss_bytes(), time.perf_counter() - t0)
        log.records.insert(index, record)
        if log.on_record is not None:
            log.on_record(record)
