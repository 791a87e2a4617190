"""Scale-out on Ray Data: the windows of one scene, or many scenes, over actors that each load the
export once (``pip install 'tm-deploy[ray]'``; ray is imported only here).

* ``RayExecutor`` (one scene): every batch of windows is one row of a Ray dataset; an actor pool
  reads its windows from the input files and computes them; the driver receives the raw window
  outputs in order (``preserve_order``) and blends and writes them exactly as a local run does,
  so the files are byte-identical to a local run. Ray Data's streaming executor bounds the batches
  in flight (``max_tasks_in_flight_per_actor``, its object-store budget): back-pressure.
* ``run_scenes`` (many scenes): each actor runs whole scenes with the local pipeline and writes
  their outputs itself; the driver collects the summaries.

Workers must reach the export directory and the input files under the same paths (a shared file
system or GDAL URLs such as ``/vsis3/...``); with ``run_scenes`` they also write the outputs.
"""
from __future__ import annotations

import logging
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .executor import BatchResult, WindowJob, compute_batch, read_batch
from .source import date_sources


@dataclass(frozen=True)
class RuntimeFactory:
    """How a worker builds its runtime: picklable, called once per actor."""

    export_dir: str
    backend: str = "ort"
    backend_options: Mapping[str, Any] | None = None
    threads: int | None = None
    verify: bool = True

    def __call__(self):
        from tm_runtime import TerraMindRuntime

        return TerraMindRuntime(self.export_dir, threads=self.threads, verify=self.verify, backend=self.backend,
                                backend_options=dict(self.backend_options or {}))

    def describe(self):
        """A runtime for facts only (manifest, task): ONNX Runtime sessions are created lazily, so
        this loads no graph."""
        from tm_runtime import TerraMindRuntime

        return TerraMindRuntime(self.export_dir, verify=False)


def ensure_ray(address: str | None = None, **init_kwargs):
    """Connect to ``address`` (an existing cluster, e.g. 'ray://head:10001' or 'auto'), or start a
    local one, unless Ray is already initialised; quiet Ray Data's console output."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ImportError("the Ray executor needs Ray Data: pip install 'tm-deploy[ray]'") from error
    if not ray.is_initialized():
        init_kwargs.setdefault("include_dashboard", False)
        init_kwargs.setdefault("logging_level", logging.WARNING)
        ray.init(address=address, **init_kwargs)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def _as_path(name: str, source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if hasattr(source, "read_masks") and hasattr(source, "name") and Path(str(source.name)).exists():
        return str(source.name)
    raise ValueError(f"{name}: the Ray executor needs inputs that workers can open (file paths or GDAL "
                     f"URLs), not {type(source).__name__}")


def _as_paths(inputs: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Workers reopen the inputs: they must be files (or GDAL URLs), not in-memory arrays; a
    modality with several dates keeps its list of them."""
    paths: dict[str, str | list[str]] = {}
    for name, source in inputs.items():
        dates = date_sources(source)
        paths[name] = _as_path(name, dates[0]) if len(dates) == 1 and dates[0] is source else [
            _as_path(name, s) for s in dates]
    return paths


class _WindowWorker:
    """An actor: loads the runtime and opens the scene once, then reads and computes batches."""

    def __init__(self, factory, job: WindowJob, inputs: dict[str, str], specs, options) -> None:
        from .raster import open_scene

        self.runtime = factory()
        self.job = job
        self.batches = job.plan.batches()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver already warned (extents, CRS)
            self.scene = open_scene(inputs, specs, options)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for index in rows["batch"]:
            index = int(index)
            batch = read_batch(self.scene, self.job, index, self.batches[index])
            results.append(pickle.dumps(compute_batch(self.runtime, self.job, batch), protocol=5))
        out = np.empty(len(results), dtype=object)
        out[:] = results
        return {"batch": np.asarray(rows["batch"]), "result": out}


_QUIET_CONTEXT = {"enable_progress_bars": False, "print_on_execution_start": False, "verbose_stats_logs": False}


class RayExecutor:
    """Batches of windows over ``actors`` Ray actors (each with ``num_cpus`` CPUs, ``num_gpus`` GPUs)."""

    name = "ray"

    def __init__(self, factory: RuntimeFactory | Any, actors: int | None = None, address: str | None = None,
                 num_cpus: float = 1, num_gpus: float = 0, max_tasks_in_flight_per_actor: int = 2,
                 init_kwargs: Mapping[str, Any] | None = None) -> None:
        self.factory = factory
        self.actors = actors
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_in_flight = max_tasks_in_flight_per_actor
        self.init_kwargs = dict(init_kwargs or {})

    def _pool_size(self, ray) -> int:
        if self.actors:
            return int(self.actors)
        cpus = ray.cluster_resources().get("CPU", 1)
        return max(1, int(cpus // max(self.num_cpus, 1e-9)))

    def _map(self, items: list[Any], worker, constructor_kwargs: dict) -> Iterator[dict]:
        ray = ensure_ray(self.address, **self.init_kwargs)
        ctx = ray.data.DataContext.get_current()
        saved = {k: getattr(ctx, k) for k in _QUIET_CONTEXT}, ctx.execution_options.preserve_order
        for k, v in _QUIET_CONTEXT.items():
            setattr(ctx, k, v)
        ctx.execution_options.preserve_order = True  # results in batch order: the driver blends in order
        try:
            yield from self._map_in(ray, items, worker, constructor_kwargs)
        finally:
            for k, v in saved[0].items():
                setattr(ctx, k, v)
            ctx.execution_options.preserve_order = saved[1]

    def _map_in(self, ray, items, worker, constructor_kwargs) -> Iterator[dict]:
        strategy = ray.data.ActorPoolStrategy(size=min(self._pool_size(ray), max(len(items), 1)),
                                              max_tasks_in_flight_per_actor=self.max_in_flight)
        ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
        ds = ds.map_batches(worker, batch_size=1, compute=strategy, fn_constructor_kwargs=constructor_kwargs,
                            num_cpus=self.num_cpus, num_gpus=self.num_gpus or None, batch_format="numpy")
        yield from ds.iter_rows()

    def run(self, job: WindowJob, batches: list[list[int]], scene=None, source=None) -> Iterator[BatchResult]:
        inputs, specs, options = source
        paths = _as_paths(inputs)
        items = [{"batch": i} for i in range(len(batches))]
        for row in self._map(items, _WindowWorker, dict(factory=self.factory, job=job, inputs=paths, specs=specs,
                                                          options=options)):
            yield pickle.loads(row["result"])


# -- many scenes -------------------------------------------------------------------------------
@dataclass
class SceneJob:
    """One scene for ``run_scenes``: the command, its inputs and destinations, and its options."""

    command: str  # embed | predict | generate
    inputs: Mapping[str, str | Sequence[str]]  # a modality's dates as a list (multi-temporal task models)
    out: Any  # a path, or {name: path}
    options: Mapping[str, Any] = field(default_factory=dict)  # EmbedOp / PredictOp / GenerateOp arguments
    tiling: Any = None  # TilingParams
    run_options: Mapping[str, Any] = field(default_factory=dict)  # bands, nodata, cog, overwrite, quicklook


def make_op(command: str, options: Mapping[str, Any]):
    from .ops import EmbedOp, GenerateOp, PredictOp

    if command == "embed":
        return EmbedOp(**options)
    if command == "predict":
        return PredictOp(**options)
    if command == "generate":
        options = dict(options)
        if options.get("seed") is None:
            raise ValueError("generate: give each scene job a seed, so that every worker draws the same")
        return GenerateOp(**options)
    raise ValueError(f"unknown command {command!r}; use embed, predict or generate")


def _describe(source: Any) -> str | list[str]:
    dates = date_sources(source)
    return [str(d) for d in dates] if len(dates) > 1 else str(source)


def run_one(runtime, job: SceneJob) -> dict[str, Any]:
    from .pipeline import run_scene

    try:
        summary = run_scene(runtime, make_op(job.command, job.options), job.inputs, job.out, job.tiling,
                            **dict(job.run_options))
        return {"ok": True, **summary}
    except Exception as error:  # noqa: BLE001 - one bad scene does not stop the others; reported
        return {"ok": False, "inputs": {k: _describe(v) for k, v in job.inputs.items()},
                "error": f"{type(error).__name__}: {error}"}


class _SceneWorker:
    def __init__(self, factory) -> None:
        self.runtime = factory()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = np.empty(len(rows["job"]), dtype=object)
        out[:] = [pickle.dumps(run_one(self.runtime, pickle.loads(j)), protocol=5) for j in rows["job"]]
        return {"summary": out}


def run_scenes(jobs: Sequence[SceneJob], factory: RuntimeFactory | Any, executor: RayExecutor | None = None
               ) -> list[dict[str, Any]]:
    """Run many scenes; with ``executor`` (a RayExecutor) each actor runs whole scenes, otherwise
    they run one after another here. Returns one summary per job, in order ({'ok': False,
    'error': ...} for a scene that failed; its outputs are not written)."""
    jobs = list(jobs)
    if executor is None:
        runtime = factory()
        return [run_one(runtime, job) for job in jobs]
    items = [{"job": pickle.dumps(job, protocol=5)} for job in jobs]
    return [pickle.loads(row["summary"]) for row in executor._map(items, _SceneWorker, dict(factory=factory))]
