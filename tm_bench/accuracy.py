"""``tm-bench accuracy``: the accuracy gates (``tm_runtime.accuracy``) of any path against fp32.

    tm-bench accuracy EXPORT --backend openvino --precision bf16      # OpenVINO bf16 vs ORT fp32
    tm-bench accuracy INT8_EXPORT --reference FP32_EXPORT             # an int8 export vs its fp32 twin

A fine-tuned task export is gated through ``predict`` (``tm_runtime.task_accuracy``: encoder token
cosine, class agreement, logits PSNR) on its own bands and standardisation.

Torch-free. The candidate is ``EXPORT`` on ``--backend`` / ``--precision``; the reference is
``--reference`` (default: the same export) on ONNX Runtime CPU, which must be fp32 graphs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tm_runtime import TerraMindRuntime
from tm_runtime.accuracy import load_tiles

from .device import engine_label, runtime_backend, runtime_options
from .machine import cpu_flags, cpu_model, versions

DEFAULT_DATA = Path("..") / "shared" / "data" / "terramesh_examples"


def _precisions(rt: TerraMindRuntime) -> set[str]:
    return {g.raw.get("precision", "fp32") for g in rt.manifest.graphs.values()}


def run_accuracy(export_dir: Path, backend: str = "ort-cpu", precision: str | None = None,
                 reference: Path | None = None, data: Path | None = None, tiles: int | None = None,
                 timesteps: int = 10, threads: int | None = None, seed: int = 0,
                 log: Callable[[str], None] = print, tile_scale: dict[str, float] | None = None) -> dict[str, Any]:
    from tm_runtime.accuracy import accuracy_report
    from tm_runtime.task_accuracy import task_accuracy_report, task_tiles

    candidate = TerraMindRuntime(export_dir, threads=threads, backend=runtime_backend(backend),
                                 backend_options=runtime_options(backend, precision, threads))
    ref_dir = reference or export_dir
    ref = TerraMindRuntime(ref_dir, threads=threads)
    if _precisions(ref) != {"fp32"}:
        hint = (" (this is an int8/fp16 export: pass --reference with the fp32 export made with the same "
                "seed or checkpoint)") if reference is None else ""
        raise ValueError(f"the reference {ref_dir} must be fp32 graphs, it has {sorted(_precisions(ref))}{hint}")
    if reference is not None and ref.manifest.model != candidate.manifest.model:
        raise ValueError(f"--reference {reference} is another model than {export_dir}")
    if (ref.task is None) != (candidate.task is None):
        raise ValueError(f"--reference {reference} and {export_dir} must both be task exports, or neither")
    if tile_scale and candidate.task is None:
        raise ValueError("--tile-scale is for task exports (their config's statistics may be in other units "
                         "than the tiles)")
    data = data or DEFAULT_DATA
    if candidate.task is not None:
        arrays, source = task_tiles(data, candidate.task, limit=tiles, scale=tile_scale)
    else:
        arrays, source = load_tiles(data, list(candidate.manifest.modalities), limit=tiles)
    log(f"{engine_label(backend, precision)} on {export_dir} vs ONNX Runtime fp32 on {ref_dir}: "
        f"{len(source['tiles'])} tile(s) from {source['dir']}"
        + (f" ({', '.join(f'{m} read from {f}' for m, f in source['substituted'].items())})"
           if source["substituted"] else ""))
    start = time.perf_counter()
    if candidate.task is not None:
        report = task_accuracy_report(ref, candidate, arrays, seed=seed)
    else:
        report = accuracy_report(ref, candidate, arrays, timesteps=timesteps, seed=seed)
    report.update({"candidate": {"export": str(export_dir), "backend": backend, "precision": precision,
                                 "graph_precisions": sorted(_precisions(candidate))},
                   "reference": {"export": str(ref_dir), "backend": "ort-cpu", "precision": "fp32"},
                   "data": source, "seconds": time.perf_counter() - start,
                   "machine": {"cpu_model": cpu_model(), "cpu_flags": cpu_flags()}, "versions": versions(),
                   "random_weights": bool(candidate.manifest.random_weights)})
    if hasattr(candidate.backend, "describe"):
        report["candidate"]["openvino"] = candidate.backend.describe()
    if candidate.manifest.random_weights:
        log("note: random weights; reduced precision usually looks better on them than on trained weights "
            "(no outlier channels). Rerun on an export of the real checkpoint before relying on it.")
    return report
