"""``--backend`` for tm-bench, and trtexec-style per-graph timing on GPU backends: host-to-device
copies, GPU compute with device-resident inputs and outputs, device-to-host copies, each timed
on its own with the stream synchronised around it.

The feeds each graph sees are recorded during one run of the real workload (``RecordingBackend``),
so the breakdown covers exactly the graphs and shapes of the benchmark.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .stats import summarize

BACKENDS = {"ort-cpu": "ort", "ort-cuda": "ort-cuda", "tensorrt": "tensorrt", "openvino": "openvino"}
PRECISIONS = ("fp32", "bf16", "fp16")  # --precision: OpenVINO's inference precision


def runtime_backend(name: str) -> str:
    """tm-bench's backend name -> ``TerraMindRuntime(backend=...)``."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}") from None


def runtime_options(name: str, precision: str | None, threads: int | None,
                    ort_spinning: bool = False) -> dict[str, Any]:
    """``backend_options`` for ``--backend`` / ``--precision`` (precision is OpenVINO's; an ONNX
    Runtime backend runs the export's graphs in the precision they were exported in) and
    ``--ort-spinning`` (ONNX Runtime on the CPU only)."""
    if ort_spinning and name != "ort-cpu":
        raise ValueError("--ort-spinning applies to --backend ort-cpu only")
    if name != "openvino":
        if precision not in (None, "fp32"):
            raise ValueError(f"--precision {precision} needs --backend openvino (ONNX Runtime runs the graphs in "
                             "the precision they were exported in: use an int8 or fp16 export)")
        return {"spinning": True} if ort_spinning else {}
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    options: dict[str, Any] = {"precision": precision or "fp32"}
    if threads:
        options["threads"] = threads
    return options


def engine_label(name: str, precision: str | None) -> str:
    """How result tables name the runtime's rows: 'onnxruntime' for ort-cpu (as before)."""
    if name == "ort-cpu":
        return "onnxruntime"
    return f"openvino-{precision or 'fp32'}" if name == "openvino" else name


class RecordingBackend:
    """Forwards ``run`` to the real backend and keeps a copy of the first feeds of every graph.

    It deliberately has no ``run_device``: the runtime then takes its host path, where every
    graph's feeds are host arrays that can be recorded.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.feeds: dict[str, dict[str, np.ndarray]] = {}

    def run(self, name: str, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
        if name not in self.feeds and all(isinstance(v, np.ndarray) for v in feeds.values()):
            self.feeds[name] = {k: v.copy() for k, v in feeds.items()}
        return self.inner.run(name, feeds, outputs)


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def device_breakdown(backend: Any, feeds: Mapping[str, Mapping[str, np.ndarray]], warmup: int = 2,
                     iters: int = 10) -> dict[str, dict[str, Any]]:
    """Per graph: summaries (ms) of ``h2d`` (upload every input), ``compute`` (``run_device`` on
    device-resident inputs, synchronised) and ``d2h`` (download every output).

    ``backend`` needs ``to_device(array)``, ``run_device(name, feeds)``, ``to_host(value)`` and
    ``synchronize()`` (the ort-cuda and tensorrt backends have them).
    """
    for need in ("to_device", "run_device", "to_host", "synchronize"):
        if not callable(getattr(backend, need, None)):
            raise TypeError(f"per-graph device timing needs a GPU backend with {need}(); got {type(backend).__name__}")
    out = {}
    for graph, host_feeds in feeds.items():
        device_feeds = {k: backend.to_device(v) for k, v in host_feeds.items()}
        h2d, compute, d2h = [], [], []

        uploaded: list = []

        def upload() -> None:
            uploaded.extend(backend.to_device(v) for v in host_feeds.values())
            backend.synchronize()

        def run() -> dict:
            result = backend.run_device(graph, device_feeds)
            backend.synchronize()
            return result

        outputs = run()

        def download() -> None:
            for v in outputs.values():
                backend.to_host(v)

        for i in range(warmup + iters):
            times = (_ms(upload), _ms(run), _ms(download))
            _release(uploaded)
            if i >= warmup:
                h2d.append(times[0])
                compute.append(times[1])
                d2h.append(times[2])
        _release(list(device_feeds.values()))
        out[graph] = {"h2d_ms": summarize(h2d), "compute_ms": summarize(compute), "d2h_ms": summarize(d2h),
                      "input_bytes": int(sum(v.nbytes for v in host_feeds.values()))}
    return out


def _release(values: list) -> None:
    """Free owned device copies (TensorRT's DeviceArray); ORT's OrtValues are garbage-collected."""
    for v in values:
        free = getattr(v, "free", None)
        if callable(free):
            free()
    values.clear()


def format_breakdown(breakdown: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [f"{'graph':28s} {'H2D p50 ms':>11s} {'compute p50 ms':>15s} {'D2H p50 ms':>11s}"]
    for graph, row in breakdown.items():
        lines.append(f"{graph:28s} {row['h2d_ms']['p50']:11.3f} {row['compute_ms']['p50']:15.3f} "
                     f"{row['d2h_ms']['p50']:11.3f}")
    return lines
