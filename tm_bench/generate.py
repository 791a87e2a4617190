"""tm-bench generate: per-stage and end-to-end latency of ``TerraMindRuntime.generate``.

Stages are timed by a proxy around the runtime's backend (every graph call, by graph) and by
wrapping the host-side steps (sampling, the DDIM update) for the duration of the benchmark. With
``--compare-torch`` our eager PyTorch reference and terratorch's ``terramind_v1_<size>_generate``
run on the same weights and inputs, interleaved with the runtime, at temperature 0 (so every
contender does the same work) and the same number of diffusion steps.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tm_runtime import TerraMindRuntime
from tm_runtime import runtime as runtime_module
from tm_runtime.embed_chain import CHAIN_PREFIX
from tm_runtime.scheduler import DDIMScheduler

from .device import RecordingBackend, device_breakdown, engine_label, format_breakdown, runtime_backend, runtime_options
from .machine import machine_info, numpy_sgemm_gflops, peak_rss_bytes, versions
from .stats import summarize

Log = Callable[[str], None]


@dataclass
class GenerateBenchConfig:
    export_dir: Path
    outputs: list[str]
    timesteps: int = 10
    batch: int = 1
    warmup: int = 1
    iters: int = 3
    threads: int | None = None
    compare_torch: bool = False
    seed: int = 0
    backend: str = "ort-cpu"  # ort-cpu | ort-cuda | tensorrt | openvino
    precision: str | None = None  # openvino: fp32 | bf16 | fp16
    ort_spinning: bool = False  # ort-cpu: backend_options spinning (spin-wait within a run)


class TimingBackend:
    """Forwards ``run`` to the real backend and adds up the wall time per graph, and per stage.

    The decoder graph is shared by every output: its time joins the stage of the output whose
    head graph runs next ("decoder S1GRD" = its queries + the shared decoder + its head)."""

    def __init__(self, inner: Any, decoder_graph: str | None = None) -> None:
        self.inner = inner
        self.decoder_graph = decoder_graph
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self._pending = 0.0  # decoder time not yet attributed to an output

    def run(self, name: str, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
        start = time.perf_counter()
        try:
            return self.inner.run(name, feeds, outputs)
        finally:
            self._record(name, time.perf_counter() - start)

    def _record(self, name: str, elapsed: float) -> None:
        self.seconds[name] += elapsed
        self.calls[name] += 1
        if name == self.decoder_graph:
            self._pending += elapsed
        else:
            if name.startswith("decoder_head_"):
                elapsed, self._pending = elapsed + self._pending, 0.0
            self.stage_seconds[_stage_label(name)] += elapsed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.stage_seconds.clear()
        self._pending = 0.0

    def __getattr__(self, attr: str) -> Any:
        # Anything else (stream, describe, ...) is the real backend's. ``run_device`` is looked up
        # here too, so that the runtime sees it exactly when the real backend has it.
        if attr == "inner" or attr.startswith("__"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(attr)
        if attr == "run_device" and hasattr(self.inner, "run_device"):
            return self._timed_run_device
        if attr == "run_fused_chain" and hasattr(self.inner, "run_fused_chain"):
            return self._timed_run_fused_chain
        return getattr(self.inner, attr)

    def _timed_run_fused_chain(self, chain: Any, images: dict) -> list[np.ndarray] | None:
        """A backend's patch embeddings + encoder as one model (OpenVINO), timed as one stage when it ran
        so (when it declines, the runtime runs the graphs through ``run``, timed per graph)."""
        start = time.perf_counter()
        out = self.inner.run_fused_chain(chain, images)
        if out is not None:
            self._record(chain.key, time.perf_counter() - start)
        return out

    def _timed_run_device(self, name: str, feeds: dict, outputs: list[str] | None = None) -> Any:
        """GPU backends' device-resident calls (the diffusion loop), timed like ``run``. A backend
        that only enqueues (TensorRT) is synchronised after each call, or the time would be the
        enqueue's: the loop then runs a little slower than without the benchmark."""
        start = time.perf_counter()
        try:
            out = self.inner.run_device(name, feeds, outputs)
            sync = getattr(self.inner, "synchronize", None)
            if callable(sync):
                sync()
            return out
        finally:
            self._record(name, time.perf_counter() - start)


@contextmanager
def timed_host_steps(seconds: dict[str, float]):
    """Time the host-side sampling and DDIM updates while the benchmark runs."""
    sample, step = runtime_module.sample_tokens, DDIMScheduler.step

    def timed_sample(*args, **kwargs):
        start = time.perf_counter()
        try:
            return sample(*args, **kwargs)
        finally:
            seconds["sampling (host)"] += time.perf_counter() - start

    def timed_step(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            seconds["DDIM update (host)"] += time.perf_counter() - start

    runtime_module.sample_tokens, DDIMScheduler.step = timed_sample, timed_step
    try:
        yield
    finally:
        runtime_module.sample_tokens, DDIMScheduler.step = sample, step


def _inputs(rt: TerraMindRuntime, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs at the pretraining statistics of every exported raw modality."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in rt.manifest.modalities.items():
        if spec.tokenized:
            continue
        mean = np.asarray(spec.mean, np.float32)[None, :, None, None]
        std = np.asarray(spec.std, np.float32)[None, :, None, None]
        size = rt.manifest.image_size
        out[name] = rng.standard_normal((batch, spec.num_channels, size, size)).astype(np.float32) * std + mean
    return out


def _stage_label(graph: str) -> str:
    if graph.startswith(CHAIN_PREFIX):
        return "patch embeddings + encoder (one model)"
    if graph.startswith("unet_"):
        return f"UNet step ({graph[5:]}), per call"
    if graph in ("decoder_head_coords", "decoder_query_coords"):
        return "decoder coords (causal, token by token)"
    if graph.startswith(("decoder_head_", "decoder_query_")):
        return f"decoder {graph.split('_', 2)[2]}"
    if graph.startswith("detokenize_"):
        return f"{graph[11:]} ViT decoder"
    if graph == "embed_coords":
        return "coords embedding"
    if graph.startswith("embed_tok_"):
        return f"token embedding {graph[10:]} (chaining)"
    if graph.startswith("embed_"):
        return f"patch embedding {graph[6:]}"
    return graph


def run_generate_benchmark(config: GenerateBenchConfig, log: Log = print) -> dict[str, Any]:
    threads = config.threads
    rt = TerraMindRuntime(config.export_dir, threads=threads, backend=runtime_backend(config.backend),
                          backend_options=runtime_options(config.backend, config.precision, threads,
                                                          config.ort_spinning))
    timing = TimingBackend(rt.backend, rt.manifest.decoder_graph)
    rt.backend = timing
    inputs = _inputs(rt, config.batch, config.seed)
    outputs = list(config.outputs)

    def ort_generate() -> dict:
        return rt.generate(inputs, outputs, timesteps=config.timesteps, seed=config.seed, temperature=0.0)

    log(f"{config.backend}: {config.warmup} warm-up + {config.iters} timed generate calls "
        f"({'+'.join(inputs)} -> {'+'.join(outputs)}, T={config.timesteps}, batch {config.batch})")
    for _ in range(config.warmup):
        ort_generate()
    host: dict[str, float] = defaultdict(float)
    stage_samples: dict[str, list[float]] = defaultdict(list)
    end_to_end: list[float] = []
    with timed_host_steps(host):
        for _ in range(config.iters):
            timing.reset()
            host.clear()
            start = time.perf_counter()
            ort_generate()
            end_to_end.append(time.perf_counter() - start)
            for graph in [g for g in timing.seconds if g.startswith("unet_")]:
                timing.stage_seconds[_stage_label(graph)] = timing.seconds[graph] / timing.calls[graph]
            for label, seconds in timing.stage_seconds.items():
                stage_samples[label].append(seconds)
            for label, seconds in host.items():
                stage_samples[label].append(seconds)
    calls = dict(timing.calls)
    result: dict[str, Any] = {
        "command": "generate", "export_dir": str(config.export_dir), "outputs": outputs,
        "inputs": list(inputs), "timesteps": config.timesteps, "batch": config.batch, "iters": config.iters,
        "threads": threads, "backend": config.backend, "engine": engine_label(config.backend, config.precision),
        "ort_spinning": config.ort_spinning,
        "precision": config.precision, "machine": machine_info(), "versions": versions(include_torch=config.compare_torch),
        "graph_calls_per_generate": calls,
        "ort": {"end_to_end": summarize(end_to_end),
                "stages": {label: summarize(s) for label, s in stage_samples.items()}},
        "peak_rss_bytes": peak_rss_bytes(),
        "export_peak_rss_bytes": rt.manifest.data.get("exporter", {}).get("peak_rss_bytes"),
    }
    if hasattr(timing.inner, "describe"):
        result["openvino"] = timing.inner.describe()
    if config.backend not in ("ort-cpu", "openvino"):
        result["device"] = _device_section(rt, timing.inner, ort_generate, log)
    sgemm = numpy_sgemm_gflops(threads or 2)
    result["sgemm"] = sgemm
    if config.compare_torch:
        from .generate_torch import compare_generate

        result["torch"] = compare_generate(rt, inputs, outputs, config, ort_generate, log)
        flops = result["torch"].get("flops")
        rate = max([sgemm["gflops_best"]] + [r["gflops_best"] for r in result["torch"].get("sgemm", [])])
        if flops:
            floor = flops / (rate * 1e9)
            result["floor"] = {"flops": flops, "gflops_per_s": rate, "seconds": floor}
            for name, row in result["torch"]["contenders"].items():
                row["floor_fraction"] = floor / row["p50"]
            result["ort"]["floor_fraction"] = floor / result["torch"]["contenders"][result["engine"]]["p50"]
    return result


def _device_section(rt: TerraMindRuntime, backend: Any, workload: Callable[[], object], log: Log) -> dict:
    """trtexec-style per-graph H2D / compute / D2H on a GPU backend, with the feeds of one run."""
    recorder = RecordingBackend(backend)  # no run_device: the runtime takes its host path, so
    rt.backend = recorder                 # every graph's feeds arrive as host arrays
    try:
        workload()
    finally:
        rt.backend = backend
    log(f"per-graph device timing of {len(recorder.feeds)} graphs")
    return device_breakdown(backend, recorder.feeds)


def format_generate_report(result: dict[str, Any]) -> str:
    lines = [f"tm-bench generate: {'+'.join(result['inputs'])} -> {'+'.join(result['outputs'])}, "
             f"T={result['timesteps']}, batch {result['batch']}, {result['iters']} timed runs, "
             f"threads {result['threads'] or 'default'}"
             f"{', ORT spinning within a run' if result.get('ort_spinning') else ''}"]
    e2e = result["ort"]["end_to_end"]
    lines.append(f"  {'stage (' + result.get('backend', 'ort-cpu') + ')':<40} {'p50 ms':>10} {'min ms':>10} {'share':>7}")
    total = e2e["p50"]
    for label, s in sorted(result["ort"]["stages"].items(), key=lambda kv: -kv[1]["p50"]):
        count = ""
        lines.append(f"  {label:<40} {s['p50'] * 1e3:>10.1f} {s['min'] * 1e3:>10.1f} {s['p50'] / total:>6.1%}{count}")
    lines.append(f"  {'end to end':<40} {total * 1e3:>10.1f} {e2e['min'] * 1e3:>10.1f}")
    lines.append(f"  graph calls per generate: {result['graph_calls_per_generate']}")
    if result.get("peak_rss_bytes"):
        export_peak = result.get("export_peak_rss_bytes")
        lines.append(f"  peak RSS: this process {result['peak_rss_bytes'] / 2**30:.2f} GiB"
                     + (f"; the export's own {export_peak / 2**30:.2f} GiB (manifest)" if export_peak else ""))
    if "device" in result:
        lines.append("\n  per graph on the device, H2D / compute / D2H timed apart (as trtexec):")
        lines += ["  " + line for line in format_breakdown(result["device"])]
    if "torch" in result:
        engine = result.get("engine", "onnxruntime")
        speed_up = f"{engine} speed-up"
        lines.append(f"\n  {'contender (interleaved)':<40} {'p50 s':>10} {'min s':>10} {'floor %':>8} {speed_up:>{len(speed_up) + 1}}")
        ort_p50 = result["torch"]["contenders"][engine]["p50"]
        for name, row in result["torch"]["contenders"].items():
            frac = f"{row['floor_fraction']:.0%}" if "floor_fraction" in row else "-"
            lines.append(f"  {name:<40} {row['p50']:>10.2f} {row['min']:>10.2f} {frac:>8} {row['p50'] / ort_p50:>{len(speed_up)}.2f}x")
    if "floor" in result:
        f = result["floor"]
        lines.append(f"  floor: {f['flops'] / 1e9:.0f} GFLOP / {f['gflops_per_s']:.0f} GFLOP/s = {f['seconds']:.2f} s")
    return "\n".join(lines)
