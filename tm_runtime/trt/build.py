"""``tm-build-engines DIR``: one TensorRT engine per graph of an export, cached by what it depends on.

Per graph: explicit-batch network, ``OnnxParser.parse_from_file`` (finds external-data weights
beside the graph), one optimisation profile from ``profiles.py``, precision flags, a workspace
limit, and a timing cache shared by all graphs and saved after each build (later builds and
later runs skip the kernel timing they already did). Plans go to ``engine_cache.EngineCache``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..manifest import Manifest, ManifestError, load_manifest
from .device import CudaUnavailable, TensorRTUnavailable, device_facts, import_tensorrt, trt_logger
from .engine_cache import CacheLookup, EngineCache, EngineKeyParts, _atomic_write
from .profiles import GraphProfile, ProfileSettings, graph_profiles

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
DEFAULT_WORKSPACE_MB = 4096
Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildSettings:
    precision: str = "fp16"
    batch: tuple[int, int, int] = (1, 1, 4)
    workspace_mb: int | None = DEFAULT_WORKSPACE_MB
    timing_cache: Path | None = None
    optimization_level: int | None = None  # TensorRT's default (3) when None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise ValueError(f"--workspace-mb must be positive, got {self.workspace_mb}")

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_mb is None else int(self.workspace_mb) << 20

    @property
    def builder_options(self) -> dict[str, Any]:
        return {} if self.optimization_level is None else {"optimization_level": self.optimization_level}


def gpu_facts(device: int = 0) -> dict[str, Any]:
    """GPU name and compute capability, from cuda-python or, without it, from nvidia-smi."""
    try:
        return device_facts(device)
    except CudaUnavailable:
        pass
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device}", "--query-gpu=name,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=True)
        name, cc = (s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1))
        return {"gpu_name": name, "compute_capability": cc, "device": device}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise CudaUnavailable(f"cannot identify GPU {device} (no cuda-python and nvidia-smi failed: {exc})") from exc


def key_parts(manifest: Manifest, graph: str, profile: GraphProfile, settings: BuildSettings,
              tensorrt_version: str, facts: dict[str, Any]) -> EngineKeyParts:
    entry = manifest.graph(graph)
    return EngineKeyParts(
        graph=graph, onnx_sha256=entry.sha256, tensorrt_version=tensorrt_version,
        gpu_name=facts["gpu_name"], compute_capability=facts["compute_capability"],
        precision=settings.precision, profile=profile.inputs, workspace_bytes=settings.workspace_bytes,
        external_data_sha256=tuple(e["sha256"] for e in entry.external_data),
        builder_options=settings.builder_options,
    )


def _network_flags(trt: Any) -> int:
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it set.
    if int(trt.__version__.split(".")[0]) < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def _set_precision(trt: Any, config: Any, precision: str) -> None:
    if precision == "fp32":
        # TF32 is on by default for fp32 engines; clear it so fp32 means what the manifest's
        # tolerances assume. "tf32" keeps it.
        config.clear_flag(trt.BuilderFlag.TF32)
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise RuntimeError(f"TensorRT {trt.__version__} has no BF16 builder flag (needs TensorRT >= 9)")
        config.set_flag(trt.BuilderFlag.BF16)


class TimingCache:
    """One ITimingCache shared by every graph's builder config; saved after each build."""

    def __init__(self, path: Path | None, log: Log) -> None:
        self.path, self.log, self.cache = path, log, None

    def attach(self, config: Any) -> None:
        if self.cache is None:
            data = self.path.read_bytes() if self.path is not None and self.path.is_file() else b""
            try:
                self.cache = config.create_timing_cache(data)
                if data:
                    self.log(f"timing cache: loaded {len(data)} bytes from {self.path}")
            except Exception as exc:  # noqa: BLE001 - a corrupt or foreign cache must not stop a build
                self.log(f"timing cache {self.path} is unreadable ({exc}); starting an empty one")
                self.cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(self.cache, ignore_mismatch=False):
            # A cache from another device or TensorRT version: start afresh rather than fail.
            self.log(f"timing cache {self.path} does not match this GPU/TensorRT; starting an empty one")
            self.cache = config.create_timing_cache(b"")
            config.set_timing_cache(self.cache, ignore_mismatch=False)

    def save(self) -> None:
        if self.path is not None and self.cache is not None:
            _atomic_write(self.path, bytes(self.cache.serialize()))


def build_engine(trt: Any, onnx_path: Path, profile: GraphProfile, settings: BuildSettings,
                 timing_cache: TimingCache | None = None) -> bytes:
    """Parse one ONNX graph and build its serialised engine (raises with the parser's errors)."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data relative to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{profile.graph}: TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.optimization_level is not None:
        config.builder_optimization_level = settings.optimization_level
    _set_precision(trt, config, settings.precision)
    opt_profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in profile.inputs]
    if missing:
        raise RuntimeError(f"{profile.graph}: network inputs {missing} are not in the manifest "
                           f"({list(profile.inputs)}); the graph and manifest disagree")
    for name in names:
        lo, opt, hi = profile.inputs[name]
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    if timing_cache is not None:
        timing_cache.attach(config)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{profile.graph}: TensorRT failed to build the engine (see its log above)")
    if timing_cache is not None:
        timing_cache.save()
    return bytes(plan)


@dataclass(frozen=True)
class BuildResult:
    graph: str
    lookup: CacheLookup
    built: bool
    seconds: float
    plan_path: Path


def build_engines(export_dir: str | Path, settings: BuildSettings, graphs: Sequence[str] | None = None,
                  cache_dir: str | Path | None = None, force: bool = False, prune: bool = False,
                  device: int = 0, verify: bool = True, log: Log = print) -> list[BuildResult]:
    """Build (or find cached) engines for ``graphs`` (default: all). Raises TensorRTUnavailable."""
    trt = import_tensorrt()
    manifest = load_manifest(export_dir)
    names = list(graphs) if graphs else list(manifest.graphs)
    for n in names:
        manifest.graph(n)  # unknown names fail before any build
    if verify:
        manifest.verify(names)  # the key trusts the manifest's sha256: make sure the files match it
    facts = gpu_facts(device)
    cache = EngineCache(cache_dir or manifest.directory)
    profiles = graph_profiles(manifest, ProfileSettings(batch=settings.batch), names)
    timing = TimingCache(settings.timing_cache, log)
    log(f"TensorRT {trt.__version__} on {facts['gpu_name']} (sm {facts['compute_capability']}), "
        f"precision {settings.precision}, batch {settings.batch}, workspace {settings.workspace_mb} MiB")
    results = []
    for name in names:
        parts = key_parts(manifest, name, profiles[name], settings, trt.__version__, facts)
        found = cache.lookup(parts)
        if found.hit and not force:
            log(f"  {name}: cached ({found.plan_path.name[:16]}…)")
            results.append(BuildResult(name, found, False, 0.0, found.plan_path))
            continue
        log(f"  {name}: building ({'forced' if found.hit else found.reason})")
        start = time.perf_counter()
        plan = build_engine(trt, manifest.graph_path(name), profiles[name], settings, timing)
        seconds = time.perf_counter() - start
        path = cache.store(parts, plan, {"build_seconds": round(seconds, 3), "export_dir": str(manifest.directory)})
        if prune:
            cache.prune(name, keep={parts.key})
        log(f"  {name}: built in {seconds:.1f}s, {len(plan) / 2**20:.1f} MiB")
        results.append(BuildResult(name, found, True, seconds, path))
    return results


def engine_paths(export_dir: str | Path, settings: BuildSettings, graphs: Sequence[str] | None = None,
                 cache_dir: str | Path | None = None, build_missing: bool = True, device: int = 0,
                 log: Log = print) -> dict[str, Path]:
    """Plan paths for ``graphs``, building the missing ones (or raising with the rebuild reasons)."""
    if build_missing:
        return {r.graph: r.plan_path for r in build_engines(export_dir, settings, graphs, cache_dir,
                                                            device=device, log=log)}
    trt = import_tensorrt()
    manifest = load_manifest(export_dir)
    names = list(graphs) if graphs else list(manifest.graphs)
    facts = gpu_facts(device)
    cache = EngineCache(cache_dir or manifest.directory)
    profiles = graph_profiles(manifest, ProfileSettings(batch=settings.batch), names)
    out, missing = {}, []
    for name in names:
        found = cache.lookup(key_parts(manifest, name, profiles[name], settings, trt.__version__, facts))
        out[name] = found.plan_path
        if not found.hit:
            missing.append(found.reason)
    if missing:
        raise FileNotFoundError("no usable engine; run tm-build-engines first:\n  " + "\n  ".join(missing))
    return out


def plan_report(export_dir: str | Path, settings: BuildSettings, graphs: Sequence[str] | None = None) -> str:
    """The profiles and binding sizes, without TensorRT (``--dry-run``)."""
    from .profiles import buffer_plan, format_plan

    manifest = load_manifest(export_dir)
    profiles = graph_profiles(manifest, ProfileSettings(batch=settings.batch), list(graphs) if graphs else None)
    lines = [f"{name:24s} {inp:16s} " + " / ".join("x".join(map(str, s)) for s in shapes)
             for name, prof in profiles.items() for inp, shapes in prof.inputs.items()]
    return "\n".join(["optimisation profiles (min / opt / max):", *lines, "",
                      "bindings at the max profile:", format_plan(buffer_plan(manifest, profiles))])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tm-build-engines", description="Build TensorRT engines for a tm-deploy export.")
    p.add_argument("dir", type=Path, help="export directory (with manifest.json)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16",
                   help="fp32 (TF32 off), tf32, fp16 or bf16 (default fp16)")
    p.add_argument("--batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), default=[1, 1, 4],
                   help="batch range of the optimisation profile (default 1 1 4)")
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB, help="builder workspace limit (MiB)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file shared by all graphs (default DIR/engines/timing.cache)")
    p.add_argument("--graphs", nargs="+", default=None, help="graph names (default: all)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where engines/ goes (default: DIR)")
    p.add_argument("--optimization-level", type=int, default=None, choices=range(6), help="builder level 0-5")
    p.add_argument("--force", action="store_true", help="rebuild even when a cached engine matches")
    p.add_argument("--prune", action="store_true", help="delete a graph's older engines after building")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--dry-run", action="store_true", help="print profiles and buffer sizes; needs no TensorRT")
    p.add_argument("--json", type=Path, default=None, help="write a JSON summary of the build here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err = lambda msg: print(f"tm-build-engines: error: {msg}", file=sys.stderr)  # noqa: E731
    try:
        timing = args.timing_cache or (args.cache_dir or args.dir) / "engines" / "timing.cache"
        settings = BuildSettings(args.precision, tuple(args.batch), args.workspace_mb, timing, args.optimization_level)
        if args.dry_run:
            print(plan_report(args.dir, settings, args.graphs))
            return 0
        results = build_engines(args.dir, settings, args.graphs, args.cache_dir, force=args.force,
                                prune=args.prune, device=args.device)
    except (TensorRTUnavailable, CudaUnavailable, ManifestError, ValueError, RuntimeError, OSError) as exc:
        err(str(exc))
        return 2
    if args.json:
        summary = [{"graph": r.graph, "built": r.built, "reason": r.lookup.reason, "seconds": r.seconds,
                    "plan": str(r.plan_path), "key": r.lookup.key} for r in results]
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    built = sum(r.built for r in results)
    print(f"{len(results)} engine(s): {built} built, {len(results) - built} cached, under "
          f"{EngineCache(args.cache_dir or args.dir).root / 'engines'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
