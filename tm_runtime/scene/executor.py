"""Executors: who reads and computes the batches of windows of a scene.

A batch is the unit of work (``TilePlan.batches``: fixed windows in canonical order). Reading a
batch (``read_batch``) and computing it (``compute_batch``) are plain functions of the scene, the
job and the runtime, so any executor runs exactly the same work; the driver blends the results
in canonical order, whatever order they come back in.

``LocalExecutor`` reads in a prefetch thread while the calling thread computes (ONNX Runtime and
GDAL release the GIL), with a bounded queue between them; ``RayExecutor`` (``ray_executor.py``)
spreads batches over Ray Data actors.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .ops import SceneOp
from .source import Scene, read_window
from .tiling import TilePlan


@dataclass
class WindowJob:
    """What every worker needs to compute the windows of one scene."""

    plan: TilePlan
    op: SceneOp

    @property
    def scale(self) -> int:
        return self.op.scale

    @property
    def window_pixels(self) -> int:
        return self.plan.crop * self.op.scale


@dataclass
class ReadBatch:
    index: int
    computed: list[int]  # windows with at least one valid pixel, in order
    skipped: list[int]  # windows whose pixels are all nodata: not computed, written as nodata
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (B, C, s, s) float32
    valid: np.ndarray | None = None  # (B, crop, crop) in output units


@dataclass
class BatchResult:
    index: int
    computed: list[int]
    skipped: list[int]
    outputs: dict[str, np.ndarray]  # output name -> (B, K, crop, crop) in output units
    valid: np.ndarray | None


def read_batch(scene: Scene, job: WindowJob, index: int, windows: list[int]) -> ReadBatch:
    """Read (and pad) the windows of one batch; all-nodata windows are listed as skipped. Windows
    go straight into one preallocated array per modality (no per-window list, then a stacked copy)."""
    scale, size, padding, crop = job.scale, job.window_pixels, job.plan.params.padding, job.plan.crop
    computed: list[int] = []
    skipped: list[int] = []
    arrays: dict[str, np.ndarray] = {}
    valid_out = None
    for i in windows:
        w = job.plan.windows[i]
        window_arrays, valid = read_window(scene, w.row * scale, w.col * scale, size, padding)
        if not valid.any():
            skipped.append(i)
            continue
        if not arrays:
            arrays = {n: np.empty((len(windows), *a.shape), a.dtype) for n, a in window_arrays.items()}
            valid_out = np.empty((len(windows), crop, crop), bool)
        for name, a in window_arrays.items():
            arrays[name][len(computed)] = a
        if scale > 1:  # an output pixel (a patch) is valid if any of its pixels is
            valid = valid.reshape(crop, scale, crop, scale).any(axis=(1, 3))
        valid_out[len(computed)] = valid
        computed.append(i)
    if not computed:
        return ReadBatch(index, computed, skipped)
    n = len(computed)
    return ReadBatch(index, computed, skipped, {k: a[:n] for k, a in arrays.items()}, valid_out[:n])


def compute_batch(runtime, job: WindowJob, batch: ReadBatch) -> BatchResult:
    if not batch.computed:
        return BatchResult(batch.index, [], batch.skipped, {}, None)
    windows = [job.plan.windows[i] for i in batch.computed]
    outputs = job.op.run(runtime, batch.arrays, windows)
    for name, out in outputs.items():
        expected = (len(windows), job.plan.crop, job.plan.crop)
        if out.ndim != 4 or (out.shape[0], *out.shape[2:]) != expected:
            raise ValueError(f"{name}: the model returned {tuple(out.shape)} for {len(windows)} windows, expected "
                             f"({len(windows)}, channels, {job.plan.crop}, {job.plan.crop})")
    return BatchResult(batch.index, batch.computed, batch.skipped, outputs, batch.valid)


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class LocalExecutor:
    """This process: a prefetch thread reads up to ``prefetch`` batches ahead while the caller computes
    (one is enough when reading a batch is faster than computing it, and keeps memory lowest)."""

    name = "local"

    def __init__(self, runtime, prefetch: int = 1) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.runtime = runtime
        self.prefetch = prefetch
        self.compute_seconds = 0.0  # time spent in the model, for the run summary

    def run(self, job: WindowJob, batches: list[list[int]], scene: Scene, source=None) -> Iterator[BatchResult]:
        self.compute_seconds = 0.0
        for batch in prefetched(lambda b: read_batch(scene, job, b, batches[b]), range(len(batches)), self.prefetch):
            start = time.perf_counter()
            result = compute_batch(self.runtime, job, batch)
            self.compute_seconds += time.perf_counter() - start
            yield result


def prefetched(read, indices: Iterable[int], depth: int) -> Iterator:
    """``read(i)`` for every index, in order, computed ``depth`` ahead in a background thread.
    An error in the thread is raised here; leaving early stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for i in indices:
                if stop.is_set() or not put(read(i)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put(_Failure(error))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="tm-scene-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def in_order(results: Iterable[BatchResult]) -> Iterator[BatchResult]:
    """Results by batch index, whatever order they arrive in (a small reorder buffer)."""
    pending: dict[int, BatchResult] = {}
    expected = 0
    for result in results:
        pending[result.index] = result
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    if pending:
        raise RuntimeError(f"batches {sorted(pending)} arrived but batch {expected} never did")
