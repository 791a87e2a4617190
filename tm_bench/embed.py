"""``tm-bench embed``: per-graph and end-to-end latency of ``TerraMindRuntime.embed``, and
(optionally) the same inputs through PyTorch, measured interleaved in one process.

Phases, in this order so that the ONNX Runtime memory figures are not inflated by torch:
1. sessions are created (timed per graph) and numpy's sgemm rate is measured;
2. ORT only, per batch: each embed graph, the encoder, and ``embed`` end to end;
3. with ``compare_torch``: torch is imported, the reference and terratorch eager are built on
   the same weights, and ORT ``embed`` / reference / terratorch are alternated every iteration
   (rotating who goes first) so that load from other tenants hits all of them alike.
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
from tm_runtime.backends import OrtBackend
from tm_runtime.modalities import canonical_name

from . import machine
from .device import RecordingBackend, device_breakdown, engine_label, runtime_backend, runtime_options
from .flops import model_flops
from .stats import summarize

Log = Callable[[str], None]
ORT = "onnxruntime"


@dataclass
class EmbedBenchConfig:
    export_dir: Path
    batches: list[int] = field(default_factory=lambda: [1])
    warmup: int = 3
    iters: int = 20
    threads: int | None = None  # None: the cores this process may use
    modalities: list[str] | None = None  # None: every exported modality
    compare_torch: bool = False
    ckpt: Path | None = None
    seed: int = 0  # for the random inputs
    ort_spinning: bool = False  # backend_options spinning: spin-wait within a run (the runtime's default is off)
    # Idle gap before each interleaved call. OpenMP (torch) and OpenBLAS workers busy-wait for
    # a while after their work; without a gap they take a core from whoever runs next.
    gap_s: float = 0.05
    backend: str = "ort-cpu"  # ort-cpu | ort-cuda | tensorrt | openvino
    precision: str | None = None  # openvino: fp32 | bf16 | fp16


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _inputs(rt: TerraMindRuntime, names: list[str], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Standard-normal images: the graphs see standardised data, as after ``standardize=True``."""
    rng = np.random.default_rng(seed)
    size = rt.manifest.image_size
    return {name: rng.standard_normal((batch, rt.manifest.modalities[name].num_channels, size, size),
                                      dtype=np.float32) for name in names}


def _row(name: str, engine: str, scope: str, phase: str, batch: int, samples: list[float],
         floor_flops: int, attention_flops: int, rates: dict[str, float]) -> dict[str, Any]:
    """One timed row; ``rates`` are the sgemm rates (GFLOP/s) by library, the best one first."""
    lat = summarize(samples)
    best = max(rates.values())
    floor_s = floor_flops / (best * 1e9)
    return {
        "name": name, "engine": engine, "runtime": phase == "ort-only" or not engine.startswith(("torch", "terratorch")),
        "scope": scope, "phase": phase, "batch": batch,
        "latency_s": lat, "throughput_images_per_s": batch / lat["p50"],
        "floor_flops": floor_flops, "floor_s": floor_s, "floor_fraction": floor_s / lat["p50"],
        "floor_fraction_with_attention": (floor_flops + attention_flops) / (best * 1e9) / lat["p50"],
        "floor_fraction_by_rate": {lib: floor_flops / (r * 1e9) / lat["p50"] for lib, r in rates.items()},
        "achieved_gflops": floor_flops / lat["p50"] / 1e9,
        "samples_s": list(samples),
    }


def _ort_phase(rt: TerraMindRuntime, inputs: dict[str, np.ndarray], warmup: int,
               iters: int) -> dict[str, list[float]]:
    """Each graph alone, then ``embed`` end to end, in every iteration."""
    backend = rt.backend
    last_output = rt.manifest.data["encoder"]["outputs"][-1]
    encoder = rt.manifest.data["encoder"]["graph"]
    steps: list[tuple[str, Callable[[], object]]] = []
    for name, image in inputs.items():
        # patch_embed is the runtime's per-modality step (its embedding graph, plus the
        # tokenizer graph for tokenised modalities), named here by the embedding graph.
        graph = rt.manifest.modalities[name].graph
        steps.append((graph, lambda n=name, x=image: rt.patch_embed(n, x)))
    tokens = np.concatenate([rt.patch_embed(n, a) for n, a in inputs.items()], axis=1)
    # embed() asks the encoder for the last layer only; time the encoder the same way.
    steps.append((encoder, lambda: backend.run(encoder, {"tokens": tokens}, [last_output])))
    steps.append(("embed", lambda: rt.embed(inputs)))
    for _ in range(warmup):
        for _, fn in steps:
            fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(iters):
        for name, fn in steps:
            samples[name].append(_timed(fn))
    return samples


def _interleaved(runs: list[tuple[str, Callable[[], object]]], warmup: int, iters: int,
                 gap_s: float = 0.0) -> dict[str, list[float]]:
    """Alternate the contenders every iteration, rotating who goes first, with an idle gap
    before each call so that no one pays for the previous contender's spinning threads."""
    for _ in range(warmup):
        for _, fn in runs:
            fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in runs}
    for i in range(iters):
        k = i % len(runs)
        for name, fn in runs[k:] + runs[:k]:
            if gap_s:
                time.sleep(gap_s)
            samples[name].append(_timed(fn))
    return samples


def _ratios(samples: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Speed-up of ``baseline`` over each other contender: their median / its median, and the
    median of per-iteration ratios (paired, so shared slow spells cancel)."""
    base = samples[baseline]
    out = {}
    for name, other in samples.items():
        if name == baseline:
            continue
        paired = sorted(o / b for o, b in zip(other, base))
        out[name] = {"median_ratio": float(np.median(other) / np.median(base)),
                     "mean_ratio": float(np.mean(other) / np.mean(base)),
                     "paired_median_ratio": float(np.median(paired))}
    return out


def run_embed_benchmark(config: EmbedBenchConfig, log: Log = print) -> dict[str, Any]:
    threads = config.threads or machine.usable_cores()
    result: dict[str, Any] = {
        "tool": "tm-bench embed", "command": sys.argv, "started_unix": time.time(),
        "machine": machine.machine_info(), "versions": machine.versions(),
    }
    rss_start = machine.current_rss_bytes()
    peak_reset = machine.reset_peak_rss()
    rt = TerraMindRuntime(config.export_dir, threads=threads, backend=runtime_backend(config.backend),
                          backend_options=runtime_options(config.backend, config.precision, threads,
                                                          config.ort_spinning))
    engine = engine_label(config.backend, config.precision)
    if rt.tim:  # its FLOP floor, per-graph split and terratorch twin would all be those of a plain backbone
        raise ValueError(f"{config.export_dir} is a TiM backbone; tm-bench embed does not measure TiM exports yet")
    names = [canonical_name(m) for m in config.modalities] if config.modalities else rt.modalities
    unknown = [n for n in names if n not in rt.manifest.modalities]
    if unknown:
        raise ValueError(f"modalities {unknown} are not in this export ({', '.join(rt.modalities)})")
    graphs = [rt.manifest.modalities[n].graph for n in names] + [rt.manifest.data["encoder"]["graph"]]
    has_sessions = callable(getattr(rt.backend, "session", None))  # ORT and OpenVINO; TensorRT has engines
    for graph in graphs:
        if has_sessions:
            rt.backend.session(graph)
    result["export"] = {
        "dir": str(Path(config.export_dir).resolve()), "model": rt.manifest.model,
        "weights": rt.manifest.data["weights"], "modalities": names,
        "graph_files": {g: rt.manifest.graph(g).file for g in graphs},
        "graph_variants": {g: rt.manifest.graph(g).raw.get("optimized", {}).get("pass", "portable") for g in graphs},
    }
    result["settings"] = {
        "batches": config.batches, "warmup": config.warmup, "iters": config.iters, "threads": threads,
        "input_seed": config.seed, "compare_torch": config.compare_torch, "timer": "time.perf_counter",
        "interleave_gap_s": config.gap_s,
        "backend": config.backend, "engine": engine, "ort_spinning": config.ort_spinning,
        "ort": _session_facts(rt, graphs[-1]) if isinstance(rt.backend, OrtBackend) else {},
    }
    created = getattr(rt.backend, "session_seconds", {})
    result["session_creation_s"] = {g: created[g] for g in graphs if g in created}
    log(f"sessions created in {sum(result['session_creation_s'].values()):.2f}s; measuring the sgemm rate")
    gemm = {"numpy": machine.numpy_sgemm_gflops(threads), "onnxruntime": machine.ort_sgemm_gflops(threads)}

    ort_samples: dict[int, dict[str, list[float]]] = {}
    for batch in config.batches:
        log(f"ORT, batch {batch}: {config.warmup} warm-up + {config.iters} timed iterations")
        ort_samples[batch] = _ort_phase(rt, _inputs(rt, names, batch, config.seed), config.warmup, config.iters)
    if hasattr(rt.backend, "describe"):
        result["settings"]["openvino"] = rt.backend.describe()
    # Again after the warm-ups: OpenVINO compiles its static-shape graphs, and embed's fused chain
    # (patch embeddings + encoder as one model), at their first call.
    compiled = graphs + list(result["settings"].get("openvino", {}).get("fused_chains", []))
    late = {g: created[g] for g in compiled if g in created and g not in result["session_creation_s"]}
    if late:
        log("compiled at their first call (static shapes): "
            + ", ".join(f"{g} {t:.2f}s" for g, t in late.items()))
    result["session_creation_s"] = {g: created[g] for g in compiled if g in created}
    if config.backend not in ("ort-cpu", "openvino"):
        recorder = RecordingBackend(rt.backend)
        backend, rt.backend = rt.backend, recorder
        try:
            rt.embed(_inputs(rt, names, config.batches[0], config.seed))
        finally:
            rt.backend = backend
        result["device"] = device_breakdown(backend, recorder.feeds, warmup=config.warmup, iters=config.iters)
    result["memory"] = {"rss_before_sessions_bytes": rss_start, "peak_rss_ort_bytes": machine.peak_rss_bytes(),
                        "peak_is_per_phase": peak_reset,
                        "export_peak_rss_bytes": rt.manifest.data.get("exporter", {}).get("peak_rss_bytes")}

    compare: dict[int, dict[str, Any]] = {}
    counted_flops: dict[int, dict[str, Any]] = {}
    if config.compare_torch:
        compare, counted_flops = _torch_phase(rt, names, config, threads, gemm, result, log, engine)

    rates = {lib: g["gflops_best"] for lib, g in gemm.items()}
    gemm_rate = max(rates.values())
    result["gemm"] = {**gemm, "rate_gflops": gemm_rate, "rate_source": max(rates, key=rates.get),
                      "definition": "best of 7 float32 2048x2048 matmuls at the benchmark's thread count, "
                                    "per library; the floor uses the fastest library's rate"}
    result["runs"] = []
    for batch in config.batches:
        flops = model_flops(rt.manifest.data, names, batch)
        floor_total = counted_flops.get(batch, {}).get("floor_flops", flops["total_without_attention"])
        attention = flops["attention"]
        rows = []
        for name, samples in ort_samples[batch].items():
            if name == "embed":
                rows.append(_row("embed", engine, "end-to-end", "ort-only", batch, samples, floor_total, attention,
                                 rates))
            else:
                graph_attention = attention if name == rt.manifest.data["encoder"]["graph"] else 0
                rows.append(_row(name, engine, "graph", "ort-only", batch, samples,
                                 flops["per_graph_without_attention"][name], graph_attention, rates))
        run: dict[str, Any] = {"batch": batch, "flops": {**flops, **counted_flops.get(batch, {})},
                               "floor_flops": floor_total, "floor_s": floor_total / (gemm_rate * 1e9)}
        if batch in compare:
            # not ``engine``: the next batch's own rows are labelled with it
            for contender, samples in compare[batch]["samples"].items():
                rows.append(_row("embed", contender, "end-to-end", "interleaved", batch, samples, floor_total,
                                 attention, rates))
            run["speedup_of_ort"] = compare[batch]["ratios"]
            run["max_abs_diff_vs_ort"] = compare[batch]["diffs"]
            run["accuracy_vs_terratorch_fp32"] = compare[batch]["accuracy"]
        run["rows"] = rows
        result["runs"].append(run)
    result["finished_unix"] = time.time()
    try:
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    return result


def _accuracy(outputs: dict[str, np.ndarray], reference: str) -> dict[str, dict[str, float]]:
    """Per-token cosine (min, mean) of every contender's embedding against terratorch in fp32
    (or our reference when terratorch is missing): the accuracy beside each time."""
    from tm_runtime.accuracy import token_cosines

    ref = outputs.get(reference, outputs.get("torch_reference"))
    if ref is None:
        return {}
    out = {}
    for name, value in outputs.items():
        cos = token_cosines(value, ref)
        out[name] = {"token_cosine_min": float(cos.min()), "token_cosine_mean": float(cos.mean())}
    return out


def _session_facts(rt: TerraMindRuntime, graph: str) -> dict[str, Any]:
    sess = rt.backend.session(graph)
    opts = sess.get_session_options()
    return {"providers": sess.get_providers(), "intra_op_num_threads": opts.intra_op_num_threads,
            "inter_op_num_threads": opts.inter_op_num_threads,
            "graph_optimization_level": str(opts.graph_optimization_level),
            "execution_mode": str(opts.execution_mode),
            "allow_spinning": _config_entry(opts, "session.intra_op.allow_spinning", "default (1)"),
            "force_spinning_stop": _config_entry(opts, "session.force_spinning_stop", "default (0)")}


def _config_entry(opts: Any, key: str, default: str) -> str:
    try:
        return opts.get_session_config_entry(key) or default
    except Exception:  # not set: ORT's default applies
        return default


def _torch_phase(rt: TerraMindRuntime, names: list[str], config: EmbedBenchConfig, threads: int,
                 gemm: dict[str, Any], result: dict[str, Any],
                 log: Log, engine: str = ORT) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    log("--compare-torch: building the PyTorch reference and terratorch eager on the same weights")
    from . import torch_side  # imports torch: only here

    machine.reset_peak_rss()
    torch_settings = torch_side.configure_torch(threads)
    contenders, info = torch_side.make_contenders(rt.manifest, config.ckpt, threads, log)
    result["torch"] = {**info, "initial_settings": torch_settings,
                       "contenders": {c.name: c.notes for c in contenders}}
    result["versions"] = machine.versions(include_torch=True)
    gemm["torch"] = torch_side.torch_sgemm_gflops(threads)
    flop_module = contenders[-1]  # terratorch when importable, else the reference
    compare: dict[int, dict[str, Any]] = {}
    counted: dict[int, dict[str, Any]] = {}
    for batch in config.batches:
        inputs = _inputs(rt, names, batch, config.seed)
        ordered = {n: inputs[n] for n in names}
        flops = torch_side.count_flops(flop_module.module, ordered)
        floor = flops
        if not flop_module.name.startswith("terratorch"):
            # Our reference spells attention as explicit matmuls, which the counter sees; upstream's
            # SDPA it does not. Keep the floor's definition the same either way.
            floor -= model_flops(rt.manifest.data, names, batch)["attention"]
        counted[batch] = {"flop_counter": flops, "flop_counter_model": flop_module.name, "floor_flops": floor}
        reference_out = rt.embed(ordered)
        diffs = {}
        outputs = {engine: reference_out}
        for c in contenders:
            out = outputs[c.name] = c.run(ordered)
            diffs[c.name] = {"max_abs": float(np.max(np.abs(out - reference_out))),
                             "max_rel": float(np.max(np.abs(out - reference_out)) / np.max(np.abs(out)))}
        runs: list[tuple[str, Callable[[], object]]] = [(engine, lambda: rt.embed(ordered))]
        runs += [(c.name, lambda c=c: c.run(ordered)) for c in contenders]
        log(f"interleaved {engine} / {' / '.join(c.name for c in contenders)}, batch {batch}")
        samples = _interleaved(runs, config.warmup, config.iters, config.gap_s)
        compare[batch] = {"samples": samples, "ratios": _ratios(samples, engine), "diffs": diffs,
                          "accuracy": _accuracy(outputs, torch_side.FP32_REFERENCE)}
    result["memory"]["peak_rss_with_torch_bytes"] = machine.peak_rss_bytes()
    return compare, counted
