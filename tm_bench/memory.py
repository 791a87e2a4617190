"""``tm-bench memory DIR``: resident memory of a loaded export, per workload, each in a fresh process.

A process's peak RSS cannot be reset reliably everywhere and ONNX Runtime keeps its arenas, so
every workload runs in its own child process (``python -m tm_bench.memory --child ...``), which
reports its RSS after the imports, after ``TerraMindRuntime(DIR)``, after the workload (with the
sessions warm), its peak RSS, and which graphs it created sessions for (and their bytes on disk):

- ``load``: the runtime object alone (sessions are created on first use);
- ``embed``: ``embed`` on every exported input modality (the decoder and tokenizer graphs must
  stay untouched; the report says so);
- ``generate``: ``generate`` of the given outputs (default: every exported output).

The parent adds what the manifest records of the export itself: its bytes on disk and, when the
exporter recorded them, its wall time and peak RSS.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOADS = ("load", "embed", "generate")
MARKER = "TM_BENCH_MEMORY "


@dataclass
class MemoryBenchConfig:
    export_dir: Path
    outputs: list[str] | None = None  # generate: default every exported output
    timesteps: int = 2  # the peak does not grow with the number of diffusion steps
    batch: int = 1
    threads: int | None = None
    workloads: tuple[str, ...] = WORKLOADS
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the children
    lean_memory: bool = False  # backend_options={"lean_memory": True} (ONNX Runtime)


def export_bytes(manifest: Any) -> dict[str, int]:
    """Bytes on disk per graph (the graph file and its external data)."""
    out = {}
    for name, entry in manifest.graphs.items():
        files = [entry.file] + [e["file"] for e in entry.external_data]
        out[name] = sum((manifest.directory / f).stat().st_size for f in files)
    return out


def generate_calls(inputs: dict[str, Any], outputs: list[str]) -> list[tuple[dict[str, Any], list[str]]]:
    """(inputs, outputs) of the generate calls that produce every one of ``outputs``: an output
    cannot also be an input, so when every input is an output too (e.g. S2L2A S1GRD -> all six),
    the first input's outputs come from the other inputs, and the rest from the first."""
    free = {k: v for k, v in inputs.items() if k not in outputs}
    if free:
        return [(free, list(outputs))]
    first, *others = inputs
    if not others:
        raise ValueError(f"{first} is the only input and also an output: nothing to generate it from")
    rest = {k: inputs[k] for k in others}
    return [(rest, [o for o in outputs if o not in rest]), ({first: inputs[first]}, [o for o in outputs if o in rest])]


def _child(workload: str, export_dir: str, outputs: list[str], timesteps: int, batch: int,
           threads: int | None, lean_memory: bool = False) -> dict[str, Any]:
    import numpy as np

    from tm_runtime import TerraMindRuntime

    from .machine import current_rss_bytes, peak_rss_bytes

    out: dict[str, Any] = {"workload": workload, "rss_after_imports_bytes": current_rss_bytes()}
    rt = TerraMindRuntime(export_dir, threads=threads, backend_options={"lean_memory": True} if lean_memory else None)
    out["rss_after_load_bytes"] = current_rss_bytes()
    rng = np.random.default_rng(0)
    size = rt.manifest.image_size
    inputs = {}
    for name, spec in rt.manifest.modalities.items():
        if spec.tokenized:  # a class map / NDVI in [0, 1]: any values in range will do
            inputs[name] = rng.integers(0, spec.num_channels, (batch, size, size)) if name == "LULC" else \
                rng.uniform(0, 1, (batch, spec.num_channels, size, size)).astype(np.float32)
        else:
            inputs[name] = rng.standard_normal((batch, spec.num_channels, size, size)).astype(np.float32)
    if workload == "embed":
        rt.embed(inputs)
    elif workload == "generate":
        outputs = outputs or rt.output_modalities
        for sources, targets in generate_calls(inputs, outputs):
            rt.generate(sources, targets, timesteps=timesteps, seed=0)
        out["outputs"] = outputs
    out["rss_after_workload_bytes"] = current_rss_bytes()
    out["peak_rss_bytes"] = peak_rss_bytes()
    sessions = sorted(getattr(rt.backend, "session_seconds", {}))
    sizes = export_bytes(rt.manifest)
    out["sessions"] = sessions
    out["session_graph_bytes"] = sum(sizes[s] for s in sessions)
    return out


def run_child(workload: str, config: MemoryBenchConfig) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tm_bench.memory", "--child", workload, str(config.export_dir),
           "--timesteps", str(config.timesteps), "--batch", str(config.batch)]
    if config.outputs:
        cmd += ["--outputs", *config.outputs]
    if config.threads:
        cmd += ["--threads", str(config.threads)]
    if config.lean_memory:
        cmd += ["--lean-memory"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **config.env})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"tm-bench memory: the {workload} child failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1][len(MARKER):])


def run_memory_benchmark(config: MemoryBenchConfig, log=print) -> dict[str, Any]:
    from tm_runtime.manifest import load_manifest

    from .machine import machine_info, versions

    manifest = load_manifest(config.export_dir)
    workloads = [w for w in config.workloads if w != "generate" or manifest.targets or manifest.coords]
    sizes = export_bytes(manifest)
    exporter = manifest.data.get("exporter", {})
    result: dict[str, Any] = {
        "command": "memory", "export_dir": str(config.export_dir), "machine": machine_info(),
        "versions": versions(include_torch=False), "batch": config.batch, "timesteps": config.timesteps,
        "lean_memory": config.lean_memory,
        "export": {"model": manifest.model.get("size"), "precision": manifest.data.get("precision"),
                   "bytes": sum(sizes.values()), "graph_bytes": sizes,
                   "export_seconds": exporter.get("seconds"), "export_peak_rss_bytes": exporter.get("peak_rss_bytes")},
        "workloads": {},
    }
    for workload in workloads:
        log(f"{workload}: in a fresh process")
        result["workloads"][workload] = run_child(workload, config)
    return result


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def format_memory_report(result: dict[str, Any]) -> str:
    e = result["export"]
    lines = [f"tm-bench memory: {result['export_dir']} ({e['model']}, {e['precision']}), "
             f"{len(e['graph_bytes'])} graphs, {_gib(e['bytes'])} GiB on disk"
             + (", ONNX Runtime lean_memory (no arenas, no pre-packing)" if result.get("lean_memory") else "")]
    if e.get("export_peak_rss_bytes"):
        lines.append(f"  export (from the manifest): peak RSS {_gib(e['export_peak_rss_bytes'])} GiB"
                     + (f", {e['export_seconds']:.0f} s" if e.get("export_seconds") else ""))
    else:
        lines.append("  export: the manifest records no peak RSS (exported by an older tm-export)")
    lines.append(f"  {'workload':<10} {'RSS load':>9} {'RSS after':>10} {'peak':>7} {'graphs run':>11} "
                 f"{'their bytes':>12}   (GiB, fresh process each)")
    for name, w in result["workloads"].items():
        lines.append(f"  {name:<10} {_gib(w['rss_after_load_bytes']):>9} {_gib(w['rss_after_workload_bytes']):>10} "
                     f"{_gib(w['peak_rss_bytes']):>7} {len(w['sessions']):>11} {_gib(w['session_graph_bytes']):>12}")
    embed = result["workloads"].get("embed")
    if embed:
        decoder_side = [s for s in embed["sessions"] if s.startswith(("decoder", "tokenize_", "unet_", "detokenize_"))]
        lines.append("  embed created no decoder or tokenizer session" if not decoder_side
                     else f"  embed created decoder/tokenizer sessions: {', '.join(decoder_side)}")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tm_bench.memory")
    p.add_argument("--child", choices=WORKLOADS, required=True)
    p.add_argument("export_dir")
    p.add_argument("--outputs", nargs="+", default=[])
    p.add_argument("--timesteps", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lean-memory", action="store_true")
    args = p.parse_args(argv)
    result = _child(args.child, args.export_dir, args.outputs, args.timesteps, args.batch, args.threads,
                    args.lean_memory)
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
