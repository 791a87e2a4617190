"""``tm-bench predict``: latency of ``TerraMindRuntime.predict`` on a fine-tuned task export, per
stage (patch embeddings, encoder, host merge/pool, head) and end to end; with ``--compare-torch``
terratorch's own task model on the same checkpoint, interleaved with the runtime in one process
(fp32, and "as imported": the float32 matmul precision ``import terratorch`` leaves set).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tm_runtime import TerraMindRuntime
from tm_runtime.embed_chain import CHAIN_PREFIX

from . import machine
from .device import engine_label, runtime_backend, runtime_options
from .embed import _interleaved, _ratios
from .generate import TimingBackend
from .stats import summarize

Log = Callable[[str], None]


@dataclass
class PredictBenchConfig:
    export_dir: Path
    batches: list[int] = field(default_factory=lambda: [1])
    warmup: int = 2
    iters: int = 10
    threads: int | None = None
    compare_torch: bool = False
    ckpt: Path | None = None
    seed: int = 0
    gap_s: float = 0.05
    backend: str = "ort-cpu"  # ort-cpu | ort-cuda | tensorrt | openvino
    precision: str | None = None  # openvino: fp32 | bf16 | fp16
    ort_spinning: bool = False  # ort-cpu: backend_options spinning (spin-wait within a run)


def task_inputs(rt: TerraMindRuntime, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Standard-normal inputs (what the graphs see after standardisation), (B, C, [T,] H, W)."""
    rng = np.random.default_rng(seed)
    task, size = rt.task, rt.manifest.image_size
    dates = () if task.temporal is None else (task.temporal.n_timestamps or 3,)
    return {m: rng.standard_normal((batch, len(task.bands[m]), *dates, size, size), dtype=np.float32)
            for m in task.modalities}


def _stages(rt: TerraMindRuntime, timing: TimingBackend, total: float) -> dict[str, float]:
    """Seconds per stage of one predict call from the graph timer; the rest is host work."""
    task = rt.task
    embed = sum(s for g, s in timing.seconds.items() if g.startswith("embed_"))
    encoder = timing.seconds.get(task.encoder_graph, 0.0)
    head = timing.seconds.get(task.head_graph, 0.0)
    stages = {"patch_embeddings": embed, "encoder": encoder, "head": head}
    fused = sum(s for g, s in timing.seconds.items() if g.startswith(CHAIN_PREFIX))
    if fused:  # OpenVINO ran the patch embeddings and the encoder as one model
        stages["patch embeddings + encoder (one model)"] = fused
    if rt.tim is not None:
        # The TiM step's own graphs: the generation model's (tim_*) and the decoder's. A generation
        # model that shares the fine-tuned encoder's weights runs that graph, counted under "encoder".
        own = set(rt.tim.generation_graphs.values())
        stages["tim step (generation encoder, decoder)"] = sum(
            s for g, s in timing.seconds.items() if g in own or g.startswith("decoder"))
    stages["host (checks, merge, pooling, outputs)"] = max(total - sum(stages.values()), 0.0)
    return stages


def _runtime_phase(rt: TerraMindRuntime, inputs: dict[str, np.ndarray], warmup: int, iters: int) -> dict[str, list[float]]:
    timing = TimingBackend(rt.backend)
    inner, rt.backend = rt.backend, timing
    try:
        for _ in range(warmup):
            rt.predict(inputs, standardize=False)
        samples: dict[str, list[float]] = {"predict": []}
        for _ in range(iters):
            timing.reset()
            start = time.perf_counter()
            rt.predict(inputs, standardize=False)
            total = time.perf_counter() - start
            samples["predict"].append(total)
            for stage, seconds in _stages(rt, timing, total).items():
                samples.setdefault(stage, []).append(seconds)
    finally:
        rt.backend = inner
    return samples


def run_predict_benchmark(config: PredictBenchConfig, log: Log = print) -> dict[str, Any]:
    threads = config.threads or machine.usable_cores()
    rt = TerraMindRuntime(config.export_dir, threads=threads, backend=runtime_backend(config.backend),
                          backend_options=runtime_options(config.backend, config.precision, threads,
                                                          config.ort_spinning))
    engine = engine_label(config.backend, config.precision)
    if rt.task is None:
        raise ValueError(f"{config.export_dir} has no task head; tm-bench predict needs an export made with "
                         "tm-export --task-config")
    result: dict[str, Any] = {
        "tool": "tm-bench predict", "command": sys.argv, "started_unix": time.time(),
        "machine": machine.machine_info(), "versions": machine.versions(),
        "export": {"dir": str(Path(config.export_dir).resolve()), "model": rt.manifest.model,
                   "weights": rt.manifest.data["weights"], "task": rt.manifest.data["task"]["type"],
                   "modalities": list(rt.task.modalities), "temporal": rt.manifest.data["task"]["temporal"],
                   "precision": rt.manifest.data.get("precision")},
        "settings": {"batches": config.batches, "warmup": config.warmup, "iters": config.iters, "threads": threads,
                     "backend": config.backend, "engine": engine, "ort_spinning": config.ort_spinning,
                     "input_seed": config.seed, "interleave_gap_s": config.gap_s,
                     "inputs": "standard normal, standardize=False (the graphs' view after standardisation)"},
        "runs": [],
    }
    for batch in config.batches:
        log(f"{engine}, batch {batch}: {config.warmup} warm-up + {config.iters} timed predict calls")
        samples = _runtime_phase(rt, task_inputs(rt, batch, config.seed), config.warmup, config.iters)
        result["runs"].append({"batch": batch, "runtime": {k: summarize(v) for k, v in samples.items()},
                               "runtime_samples_s": samples})
    result["memory"] = {"peak_rss_runtime_bytes": machine.peak_rss_bytes()}
    if config.compare_torch:
        _torch_phase(rt, config, threads, result, log, engine)
    result["finished_unix"] = time.time()
    try:
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    return result


def _torch_phase(rt: TerraMindRuntime, config: PredictBenchConfig, threads: int, result: dict, log: Log,
                 engine: str) -> None:
    log("--compare-torch: building terratorch's task model on the export's checkpoint")
    from .predict_torch import build_terratorch_task, terratorch_runner, tim_temperature
    from .torch_side import configure_torch

    task, info = build_terratorch_task(rt.manifest, config.ckpt)
    settings = configure_torch(threads)  # after importing terratorch, which lowers the matmul precision
    result["torch"] = {**info, "settings": settings}
    result["versions"] = machine.versions(include_torch=True)
    contenders = {"terratorch_fp32": terratorch_runner(task, "highest"),
                  "terratorch_as_imported": terratorch_runner(task, "medium")}
    for run in result["runs"]:
        batch = run["batch"]
        inputs = task_inputs(rt, batch, config.seed)
        # TiM models sample; the outputs are compared at temperature 0 (argmax on both sides).
        ours = rt.predict(inputs, standardize=False, **({"tim_temperature": 0.0} if rt.tim else {}))
        run["max_rel_diff_vs_runtime"] = {}
        with tim_temperature(task, 0.0):
            for name, fn in contenders.items():
                out = fn(inputs)
                run["max_rel_diff_vs_runtime"][name] = float(np.abs(out - ours).max() / np.abs(out).max())
        runs = [(engine, lambda: rt.predict(inputs, standardize=False))]
        runs += [(name, lambda fn=fn: fn(inputs)) for name, fn in contenders.items()]
        log(f"interleaved {engine} / {' / '.join(contenders)}, batch {batch}")
        samples = _interleaved(runs, config.warmup, config.iters, config.gap_s)
        run["interleaved"] = {name: summarize(s) for name, s in samples.items()}
        run["interleaved_samples_s"] = samples
        run["speedup_of_runtime"] = _ratios(samples, engine)
    result["memory"]["peak_rss_with_torch_bytes"] = machine.peak_rss_bytes()


def format_predict_report(result: dict[str, Any]) -> str:
    export = result["export"]
    engine = result["settings"]["engine"]
    lines = [f"tm-bench predict: {export['model']['name']} {export['task']} task on {engine}, "
             f"{' + '.join(export['modalities'])}{', temporal' if export['temporal'] else ''}; "
             f"{result['settings']['threads']} threads"
             f"{', ORT spinning within a run' if result['settings'].get('ort_spinning') else ''}, "
             f"{result['machine'].get('cpu_model', '')}"]
    for run in result["runs"]:
        lines.append(f"batch {run['batch']} (ms: p50 / p90)")
        for name, s in run["runtime"].items():
            lines.append(f"  {engine} {name:<40} {s['p50'] * 1e3:9.1f} {s['p90'] * 1e3:9.1f}")
        for name, s in run.get("interleaved", {}).items():
            lines.append(f"  interleaved {name:<32} {s['p50'] * 1e3:9.1f} {s['p90'] * 1e3:9.1f}")
        for name, r in run.get("speedup_of_runtime", {}).items():
            lines.append(f"  {engine} speed-up over {name}: {r['median_ratio']:.2f}x (median of medians), "
                         f"{r['paired_median_ratio']:.2f}x (paired median); max rel diff "
                         f"{run['max_rel_diff_vs_runtime'][name]:.1e}")
    return "\n".join(lines)
