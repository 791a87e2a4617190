"""One scene end to end: open and align the inputs, plan the windows, run them through an executor,
blend in bounded memory, write georeferenced outputs atomically.

Threads: the executor's prefetch thread reads windows, the calling thread computes and blends,
a writer thread finalises rows (argmax / softmax / nodata) and compresses them to disk; bounded
queues between them keep memory flat.
"""
from __future__ import annotations

import json
import os
import queue
import resource
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .accumulate import BandAccumulator
from .executor import LocalExecutor, WindowJob, in_order
from .ops import EmbedOp, GenerateOp, OutputSpec, PredictOp, SceneOp, window_size
from .progress import Progress
from .source import date_sources
from .tiling import TilingParams, plan_windows

DEFAULT_GDAL_CACHE = 32 * 1024 * 1024  # bytes: GDAL's default (5% of RAM) would grow with the scene


class _WriterThread:
    """Finalises blocks and writes them in a background thread; errors surface in ``put``/``close``."""

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="tm-scene-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            writer, spec, block = item
            try:
                writer.write(block.row0, spec.finalize(block.values, block.valid))
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = error

    def put(self, writer, spec: OutputSpec, block) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((writer, spec, block))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _destinations(op: SceneOp, specs: list[OutputSpec], out) -> dict[str, Path]:
    if isinstance(out, Mapping):
        wanted = {s.name for s in specs}
        given = {str(k) for k in out}
        if isinstance(op, GenerateOp):
            from ..modalities import get_target

            out = {get_target(k).name: v for k, v in out.items()}
            given = set(out)
        if given != wanted:
            raise ValueError(f"outputs: expected destinations for {', '.join(sorted(wanted))}, got "
                             f"{', '.join(sorted(given)) or 'none'}")
        dests = {k: Path(v) for k, v in out.items()}
    else:
        if len(specs) != 1:
            raise ValueError(f"outputs: {len(specs)} outputs ({', '.join(s.name for s in specs)}) need a "
                             "{name: path} mapping")
        dests = {specs[0].name: Path(out)}
    if len({p.resolve() for p in dests.values()}) != len(dests):
        raise ValueError("outputs: two outputs have the same destination")
    return dests


def _quicklook_paths(quicklook, dests: dict[str, Path]) -> dict[str, Path]:
    if not quicklook:
        return {}
    if quicklook is True:
        return {name: p.with_suffix(".png") for name, p in dests.items()}
    if isinstance(quicklook, Mapping):
        return {name: Path(p) for name, p in quicklook.items()}
    if len(dests) != 1:
        raise ValueError("quicklook: give True or a {name: path} mapping when there are several outputs")
    return {next(iter(dests)): Path(quicklook)}


def run_scene(runtime, op: SceneOp, inputs: Mapping[str, Any], out,
              tiling: TilingParams | Mapping[str, Any] | None = None, *,
              bands: Mapping[str, Any] | None = None, nodata: Mapping[str, float] | None = None,
              resampling: Mapping[str, str] | None = None, cog: bool = False, overwrite: bool = False,
              quicklook: bool | str | Mapping[str, str] = False, executor=None, progress: bool | Progress | None = None,
              gdal_cache_bytes: int | None = None, source=None) -> dict[str, Any]:
    """Run ``op`` over a whole scene and write its outputs; returns a summary dict.

    ``runtime``: a ``TerraMindRuntime`` (or any object with the same public API); with a Ray
    executor it only describes the export (the actors load their own).
    ``inputs``: {modality: GeoTIFF path | open rasterio dataset | GeoArray}, the first one's grid
    is the output grid. ``out``: a path, or {output name: path} (generate: per modality).
    ``tiling``: ``TilingParams``, or a mapping of terratorch's tiled-inference arguments applied over
    the defaults (for predict: over the task config's ``tiled_inference_parameters``).
    """
    try:
        import rasterio
    except ImportError as error:
        raise ImportError("scenes need rasterio for GeoTIFF I/O: pip install 'tm-deploy[geo]'") from error

    from .geotiff import GeoTiffWriter, check_destination
    from .raster import SceneOptions, open_scene

    if callable(runtime) and hasattr(runtime, "describe"):  # a RuntimeFactory
        runtime = runtime() if executor is None else runtime.describe()
    tiling = resolve_tiling(op, runtime, tiling)
    if tiling.crop != window_size(runtime):
        raise ValueError(f"tiling: crop ({tiling.crop}) must equal the export's image size ({window_size(runtime)}); "
                         f"re-export with --image-size {tiling.crop} for other windows")
    specs = op.input_specs(runtime, list(inputs))
    if len(specs) != len(inputs):  # e.g. "S2L2A" and "s2l2a": one modality, its dates go in one list
        raise ValueError(f"inputs: {', '.join(map(str, inputs))} name the same modality more than once; give a "
                         "modality's dates as one list (tm-run: repeat --input with one name)")
    inputs = {name: value for name, value in zip(specs, inputs.values())}
    op.check_dates(runtime, {name: len(date_sources(value)) for name, value in inputs.items()})
    out_specs = op.outputs(runtime)
    dests = _destinations(op, out_specs, out)
    looks = _quicklook_paths(quicklook, dests)
    for path in [*dests.values(), *looks.values()]:
        check_destination(path, overwrite)
    options = SceneOptions(dict(bands or {}), dict(nodata or {}), dict(resampling or {}))
    executor = executor or LocalExecutor(runtime)
    cache = gdal_cache_bytes or DEFAULT_GDAL_CACHE
    started = time.perf_counter()
    env = rasterio.Env(GDAL_CACHEMAX=cache) if "GDAL_CACHEMAX" not in os.environ else rasterio.Env()
    with env:
        scene = open_scene(inputs, specs, options)
        writers: dict[str, GeoTiffWriter] = {}
        try:
            grid = scene.grid.scaled(op.scale)
            plan = plan_windows(grid.height, grid.width, tiling.in_units(op.scale))
            job = WindowJob(plan, op)
            batches = plan.batches()
            tags = _tags(op, tiling, plan, runtime)
            for spec in out_specs:
                writers[spec.name] = GeoTiffWriter(dests[spec.name], grid, spec, cog=cog, overwrite=overwrite, tags=tags)
            accumulators = {spec.name: BandAccumulator(plan, spec.channels) for spec in out_specs}
            by_name = {spec.name: spec for spec in out_specs}
            bar = progress if isinstance(progress, Progress) else Progress(
                len(plan.windows), f"tm-run {type(op).__name__.removesuffix('Op').lower()}", enabled=progress)
            sink = _WriterThread()
            done = computed = skipped = 0
            held = 0
            try:
                results = executor.run(job, batches, scene=scene, source=source or (inputs, specs, options))
                for result in in_order(results):
                    position = {i: p for p, i in enumerate(result.computed)}
                    for i in sorted(result.computed + result.skipped):
                        window = plan.windows[i]
                        for name, acc in accumulators.items():
                            for block in acc.start_window(window):
                                sink.put(writers[name], by_name[name], block)
                            if i in position:
                                acc.add(window, result.outputs[name][position[i]], result.valid[position[i]])
                    computed += len(result.computed)
                    skipped += len(result.skipped)
                    done += len(result.computed) + len(result.skipped)
                    held = max(held, sum(a.nbytes for a in accumulators.values()))
                    bar.update(done)
                for name, acc in accumulators.items():
                    for block in acc.finish():
                        sink.put(writers[name], by_name[name], block)
            finally:
                sink.close()
                bar.close()
            finished = {name: w.close() for name, w in writers.items()}
            for name, png in looks.items():
                from .geotiff import temporary_sibling
                from .quicklook import write_quicklook

                tmp = temporary_sibling(png, ".png")
                writers[name].extra.append((tmp, png))
                write_quicklook(finished[name], tmp, by_name[name])
            written = {name: str(w.commit()) for name, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            scene.close()
    seconds = time.perf_counter() - started
    return {
        "command": type(op).__name__.removesuffix("Op").lower(),
        "outputs": {name: {"path": path, "width": grid.width, "height": grid.height, "count": by_name[name].count,
                           "dtype": by_name[name].dtype, "quicklook": str(looks[name]) if name in looks else None}
                    for name, path in written.items()},
        "crs": str(scene.grid.crs) if scene.grid.crs is not None else None,
        "transform": list(grid.transform)[:6] if grid.transform is not None else None,
        "scene": {"height": scene.grid.height, "width": scene.grid.width, **scene.description},
        "tiling": asdict(plan.params) | {"units": "patches" if op.scale > 1 else "pixels"},
        "op": op.describe(),
        "windows": {"total": len(plan.windows), "computed": computed, "skipped_nodata": skipped,
                    "batches": len(batches)},
        "executor": getattr(executor, "name", type(executor).__name__),
        "seconds": seconds,
        "compute_seconds": getattr(executor, "compute_seconds", None),
        "windows_per_second": len(plan.windows) / seconds if seconds > 0 else None,
        "accumulator_bytes": held,
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def resolve_tiling(op: SceneOp, runtime, tiling: TilingParams | Mapping[str, Any] | None) -> TilingParams:
    """``TilingParams`` as given; else terratorch's defaults updated with what the model asks for
    (a task config's ``tiled_inference_parameters``), then with ``tiling`` if it is a mapping of
    terratorch's keyword arguments (``{"batch_size": 8}``: only those change)."""
    if isinstance(tiling, TilingParams):
        return tiling
    base = TilingParams.from_terratorch(op.default_tiling(runtime))
    return TilingParams.from_terratorch(tiling, base) if tiling else base


def _tags(op: SceneOp, tiling: TilingParams, plan, runtime) -> dict[str, str]:
    """Provenance in the GeoTIFF: what produced it (identical for local and Ray runs)."""
    manifest = getattr(runtime, "manifest", None)
    model = getattr(manifest, "model", {}) if manifest is not None else {}
    return {
        "TM_COMMAND": type(op).__name__.removesuffix("Op").lower(),
        "TM_OPTIONS": json.dumps(op.describe(), sort_keys=True, default=str),
        "TM_TILING": json.dumps(asdict(tiling), sort_keys=True),
        "TM_MODEL": str(model.get("name", type(runtime).__name__)) if isinstance(model, dict) else "",
        "TM_RANDOM_WEIGHTS": str(bool(getattr(runtime, "random_weights", False))),
    }


# -- convenience entry points ------------------------------------------------------------------
def embed_scene(runtime, inputs: Mapping[str, Any], out, *, merge_method: str = "mean", layer: int = -1,
                standardize: bool = True, dtype: str = "float32",
                tiling: TilingParams | Mapping[str, Any] | None = None, **kwargs):
    """Embedding map: one pixel per 16 x 16 patch, D bands, a 16x coarser transform."""
    return run_scene(runtime, EmbedOp(merge_method, layer, standardize, dtype), inputs, out, tiling, **kwargs)


def predict_scene(runtime, inputs: Mapping[str, Any], out, *, output: str | None = None, standardize: bool = True,
                  tiling: TilingParams | Mapping[str, Any] | None = None, seed: int | None = None,
                  tim_temperature: float | None = None, tim_top_p: float | None = None, tim_top_k: int | None = None,
                  **kwargs):
    """A fine-tuned task model (a ``tm-export --task-config`` export) over a scene: classes (uint8 +
    colour table), probabilities or logits (regression: values), blended as terratorch's tiled
    inference blends the task's logits; tiling defaults to the task config's
    ``tiled_inference_parameters``, then terratorch's defaults. TiM task models: ``seed`` (the
    scene seed; each window draws from its own, see ``PredictOp``) and the ``tim_*`` sampling."""
    op = PredictOp(output, standardize, seed, tim_temperature, tim_top_p, tim_top_k)
    return run_scene(runtime, op, inputs, out, tiling, **kwargs)


def generate_scene(runtime, inputs: Mapping[str, Any], outputs: Mapping[str, Any], *, timesteps: int = 10,
                   seed: int | None = None, temperature: float = 1.0, top_p: float = 0.8, top_k: int = 0,
                   chained: bool = True, tiling: TilingParams | Mapping[str, Any] | None = None, **kwargs):
    """Generated modalities over a scene, one file per output modality ({modality: path}).
    ``seed=None`` draws a scene seed, reported in the summary and the files' tags."""
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    op = GenerateOp(tuple(outputs), timesteps, seed, temperature, top_p, top_k, chained)
    return run_scene(runtime, op, inputs, outputs, tiling, **kwargs)
