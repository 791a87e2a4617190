"""``tm-compare-trt DIR``: per graph, TensorRT and ONNX Runtime (CPU) on the same random inputs.

Inputs come from the manifest's specs (float: standard normal; token ids: uniform over the
vocabulary; timesteps: uniform in [0, 1000); FSQ codes: uniform in [-1, 1]; a query graph's
positions: a permutation). Errors are the
exporter's statistics: max |trt - ort| and max |trt - ort| / max |ort|; quantised outputs (ids,
FSQ codes) report the fraction of elements that differ. Tolerances default to the manifest's per
graph for fp32 engines, and to looser per-precision values for tf32 / fp16 / bf16.

TensorRT runs through our ``TensorRTBackend`` or, with ``--runner polygraphy``, Polygraphy's
``TrtRunner`` (an independent implementation, to tell our binding code from TensorRT itself).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..manifest import GraphEntry, Manifest, ManifestError, TensorSpec, load_manifest
from .device import CudaUnavailable, TensorRTUnavailable, import_tensorrt
from .profiles import ProfileSettings, dim_ranges

# Relative tolerance per precision for continuous outputs (fp32 uses the manifest's value), and the
# allowed fraction of differing quantised elements (a value on a rounding boundary may flip).
PRECISION_MAX_REL = {"tf32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}
MAX_MISMATCH = {"fp32": 1e-3, "tf32": 1e-2, "fp16": 2e-2, "bf16": 5e-2}


@dataclass
class OutputComparison:
    graph: str
    output: str
    max_abs: float
    max_rel: float
    mismatch: float | None  # quantised outputs only
    tolerance: float
    passed: bool


def _is_quantised(entry: GraphEntry, spec: TensorSpec) -> bool:
    return not spec.dtype.startswith(("float", "bfloat")) or entry.raw.get("role") == "tokenizer_encoder"


def random_feeds(manifest: Manifest, name: str, batch: int, modalities: int | None = None,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for one graph at ``batch`` and ``modalities`` x 196 tokens (default: the
    exported input modalities)."""
    entry = manifest.graph(name)
    ranges = dim_ranges(manifest, ProfileSettings(batch=(1, batch, max(batch, 1)), opt_modalities=modalities))
    dims = {d: r[1] for d, r in ranges.items()}
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in entry.inputs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in s.shape)
        if s.name == "t":
            value = rng.integers(0, 1000, shape)
        elif s.name == "ids":
            value = rng.integers(0, int(entry.raw.get("vocab_size", 2)), shape)
        elif s.name == "positions":  # a decoder query graph's table rows, each once
            value = rng.permutation(shape[0]) % int(entry.raw.get("num_positions", shape[0]))
        elif s.name == "quant":
            value = rng.uniform(-1, 1, shape)
        elif s.dtype.startswith("float"):
            value = rng.standard_normal(shape)
        else:
            value = rng.integers(0, 2, shape)
        feeds[s.name] = value.astype(s.dtype)
    return feeds


def compare_outputs(entry: GraphEntry, got: Sequence[np.ndarray], ref: Sequence[np.ndarray], precision: str,
                    max_rel_override: float | None = None) -> list[OutputComparison]:
    rows = []
    base = float(entry.raw.get("max_rel_error", 1e-4))
    tol = max_rel_override or (base if precision == "fp32" else max(base, PRECISION_MAX_REL[precision]))
    for spec, g, r in zip(entry.outputs, got, ref):
        g64, r64 = np.asarray(g, np.float64), np.asarray(r, np.float64)
        if g64.shape != r64.shape:
            rows.append(OutputComparison(entry.name, spec.name, float("inf"), float("inf"), None, tol, False))
            continue
        diff = np.abs(g64 - r64)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(r64).max()) if r64.size else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        finite = bool(np.isfinite(g64).all())
        if _is_quantised(entry, spec):
            mismatch = float((diff > 0).mean()) if diff.size else 0.0
            limit = MAX_MISMATCH[precision]
            rows.append(OutputComparison(entry.name, spec.name, max_abs, max_rel, mismatch, limit,
                                         finite and mismatch <= limit))
        else:
            rows.append(OutputComparison(entry.name, spec.name, max_abs, max_rel, None, tol, finite and max_rel <= tol))
    return rows


TrtRun = Callable[[str, dict[str, np.ndarray], list[str]], list[np.ndarray]]


def polygraphy_runner(plans: dict[str, Path]) -> TrtRun:
    """Run engines with Polygraphy's TrtRunner (raises ImportError without polygraphy)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    def run(name: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        with TrtRunner(EngineFromBytes(plans[name].read_bytes())) as runner:
            out = runner.infer(feeds)
            return [np.asarray(out[k]) for k in outputs]

    return run


def compare(export_dir: str | Path, precision: str = "fp32", batch: int = 2, profile_batch=(1, 2, 4),
            graphs: Sequence[str] | None = None, seed: int = 0, runner: str = "ours", max_rel: float | None = None,
            cache_dir: str | Path | None = None, build_missing: bool = True, workspace_mb: int | None = None,
            log: Callable[[str], None] = print) -> list[OutputComparison]:
    from ..backends.onnxruntime import OrtBackend
    from .build import DEFAULT_WORKSPACE_MB, BuildSettings, engine_paths

    import_tensorrt()  # fail early with the one clear message
    manifest = load_manifest(export_dir)
    names = list(graphs) if graphs else list(manifest.graphs)
    settings = BuildSettings(precision, tuple(profile_batch), workspace_mb or DEFAULT_WORKSPACE_MB)
    plans = engine_paths(export_dir, settings, names, cache_dir, build_missing=build_missing, log=log)
    ort_backend = OrtBackend({n: manifest.graph_path(n) for n in names})
    if runner == "polygraphy":
        trt_run = polygraphy_runner(plans)
    else:
        from ..backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend(plans, manifest)
        trt_run = backend.run
    rows: list[OutputComparison] = []
    for name in names:
        entry = manifest.graph(name)
        feeds = random_feeds(manifest, name, batch, seed=seed)
        ref = ort_backend.run(name, feeds, entry.output_names)
        got = trt_run(name, feeds, entry.output_names)  # in the manifest's order, as ``ref``
        rows += compare_outputs(entry, got, ref, precision, max_rel)
    return rows


def format_rows(rows: Sequence[OutputComparison]) -> str:
    lines = [f"{'graph':24s} {'output':12s} {'max_abs':>10s} {'max_rel':>10s} {'mismatch':>9s} {'tol':>8s}  result"]
    for r in rows:
        mm = "" if r.mismatch is None else f"{r.mismatch:.2e}"
        lines.append(f"{r.graph:24s} {r.output:12s} {r.max_abs:10.3e} {r.max_rel:10.3e} {mm:>9s} {r.tolerance:8.0e}  "
                     f"{'ok' if r.passed else 'FAIL'}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tm-compare-trt",
                                description="Compare TensorRT engines with ONNX Runtime CPU on random inputs.")
    p.add_argument("dir", type=Path, help="export directory (with manifest.json)")
    p.add_argument("--precision", choices=("fp32", "tf32", "fp16", "bf16"), default="fp32")
    p.add_argument("--batch", type=int, default=2, help="batch of the random inputs (default 2)")
    p.add_argument("--profile-batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), default=[1, 2, 4],
                   help="engine profile batch range (must include --batch)")
    p.add_argument("--graphs", nargs="+", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runner", choices=("ours", "polygraphy"), default="ours")
    p.add_argument("--max-rel", type=float, default=None, help="override every continuous tolerance")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--workspace-mb", type=int, default=None)
    p.add_argument("--no-build", action="store_true", help="fail instead of building missing engines")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.profile_batch[0] <= args.batch <= args.profile_batch[2]:
        print(f"tm-compare-trt: error: --batch {args.batch} is outside --profile-batch {args.profile_batch}",
              file=sys.stderr)
        return 2
    try:
        rows = compare(args.dir, args.precision, args.batch, tuple(args.profile_batch), args.graphs, args.seed,
                       args.runner, args.max_rel, args.cache_dir, not args.no_build, args.workspace_mb)
    except (TensorRTUnavailable, CudaUnavailable, ManifestError, FileNotFoundError, ImportError, ValueError,
            RuntimeError) as exc:
        print(f"tm-compare-trt: error: {exc}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)}/{len(rows)} outputs within tolerance ({args.precision})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
