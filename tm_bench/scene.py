"""tm-bench scene: whole scenes through tm-run's pipeline (reading, tiling, blending, writing).

    tm-bench scene EXPORT [--task-export TASK_EXPORT] [--size 2048] [--commands embed predict] [--batch 8]
                   [--threads 2] [--repeats 3] [--rss-sizes 1024 8192] [--ray] [--workdir DIR] [--json FILE]

* End to end vs the model alone, interleaved in one process: a scene run, then the runtime's time
  per batch (median of ``--batch-iters`` calls on random windows), repeated; the ratio is the
  scene run over (number of batches x time per batch).
* Peak RSS vs scene size: one fresh process per size (peak RSS only grows within a process).
* Windows/s locally and, with ``--ray``, on a local Ray cluster (actors with one thread each),
  Ray and local runs interleaved.

``embed`` runs on EXPORT, ``predict`` on a fine-tuned task export (``tm-export --task-config``):
``--task-export``, or EXPORT itself when it is one; the task must take S2L2A. Synthetic S2L2A
scenes (12 bands, int16, tiled 256, deflate) are written strip by strip into ``--workdir`` and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .machine import machine_info, peak_rss_bytes, versions


def write_synthetic_s2(path: Path, size: int, seed: int = 0, strip: int = 256, width: int | None = None) -> Path:
    """A size x size (or size x width) S2L2A-like scene (reflectance x 10000, int16), a strip at a time."""
    import rasterio
    from rasterio.transform import from_origin

    if path.exists():
        return path
    height, size = size, width or size
    tmp = path.with_suffix(".part.tif")
    profile = dict(driver="GTiff", width=size, height=height, count=12, dtype="int16", crs="EPSG:32632",
                   transform=from_origin(500000, 5000000, 10, 10), tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", predictor=2, BIGTIFF="IF_SAFER")
    phase = np.random.default_rng(seed).random(12)[:, None, None] * 6.28
    cols = np.arange(size, dtype=np.float32)[None, None, :]
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, height, strip):
            rows = np.arange(r0, min(r0 + strip, height), dtype=np.float32)[None, :, None]
            field = 1800 + 900 * np.sin(cols / 97 + phase) * np.cos(rows / 131 + phase)
            noise = np.random.default_rng([seed, r0]).integers(-150, 150, (12, rows.shape[1], size))
            dst.write((field + noise).astype(np.int16), window=rasterio.windows.Window(0, r0, size, rows.shape[1]))
    os.replace(tmp, path)
    return path


def _export_for(args, command: str) -> str:
    """The export a command runs on: predict needs a task export that takes S2L2A."""
    if command != "predict":
        return str(args.export_dir)
    from tm_runtime.manifest import load_manifest

    path = str(args.task_export or args.export_dir)
    task = load_manifest(path).data.get("task")
    if not task:
        raise ValueError(f"predict needs a fine-tuned task export (tm-export --task-config ...); {path} is a backbone "
                         "export: pass --task-export DIR")
    if "S2L2A" not in task["modalities"]:
        raise ValueError(f"the benchmark scenes are S2L2A; the task export {path} takes {', '.join(task['modalities'])}")
    return path


def _runtime(args, command: str):
    from tm_runtime import TerraMindRuntime

    return TerraMindRuntime(_export_for(args, command), threads=args.threads)


def _run(rt, command: str, scene: Path, out: Path, batch: int, executor=None) -> dict:
    from tm_runtime.scene import TilingParams, embed_scene, predict_scene

    tiling = TilingParams(batch_size=batch)
    run = embed_scene if command == "embed" else predict_scene
    return run(rt, {"S2L2A": scene}, out, tiling=tiling, overwrite=True, executor=executor)


def _time_batch(rt, command: str, batch: int, iters: int, rng) -> float:
    """Median seconds of one model call on ``batch`` random windows (what the pipeline calls)."""
    channels = rt.manifest.modalities["S2L2A"].num_channels
    x = {"S2L2A": (rng.random((batch, channels, 224, 224), dtype=np.float32) * 3000)}
    call = (lambda: rt.embed(x, standardize=True)) if command == "embed" else (lambda: rt.predict(x))
    call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def end_to_end(args, command: str, scene: Path, log) -> dict:
    rt = _runtime(args, command)
    rng = np.random.default_rng(0)
    out = Path(args.workdir) / f"out_{command}_{args.size}.tif"
    _time_batch(rt, command, args.batch, 1, rng)  # warm up: sessions created
    runs, per_batch, partial = [], [], []
    for repeat in range(args.repeats):
        summary = _run(rt, command, scene, out, args.batch)
        runs.append(summary)
        per_batch.append(_time_batch(rt, command, args.batch, args.batch_iters, rng))
        last = summary["windows"]["total"] - args.batch * (summary["windows"]["batches"] - 1)
        partial.append(_time_batch(rt, command, last, 3, rng) if last != args.batch else per_batch[-1])
        log(f"  {command} {args.size}^2 repeat {repeat + 1}: scene {summary['seconds']:.2f} s "
            f"({summary['windows_per_second']:.2f} windows/s), batch of {args.batch} {per_batch[-1]:.3f} s")
    batches = runs[0]["windows"]["batches"]
    model_only = (batches - 1) * statistics.median(per_batch) + statistics.median(partial)
    scene_s = statistics.median(r["seconds"] for r in runs)
    return {"command": command, "size": args.size, "batch": args.batch, "windows": runs[0]["windows"],
            "scene_seconds": [r["seconds"] for r in runs], "scene_seconds_median": scene_s,
            "compute_seconds_in_run": [r["compute_seconds"] for r in runs],
            "time_per_batch": per_batch, "time_partial_batch": partial, "model_only_seconds": model_only,
            "ratio_end_to_end_over_model": scene_s / model_only,
            "windows_per_second": runs[0]["windows"]["total"] / scene_s}


def child(args) -> int:
    """One scene in a fresh process: peak RSS and the summary, as JSON on stdout."""
    from .machine import current_rss_bytes

    rt = _runtime(args, args.child)
    _time_batch(rt, args.child, args.batch, 1, np.random.default_rng(0))
    loaded = current_rss_bytes()
    summary = _run(rt, args.child, Path(args.scene), Path(args.workdir) / f"rss_{args.child}.tif", args.batch)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "rss_after_warmup_bytes": loaded,
                      "accumulator_bytes": summary["accumulator_bytes"], "windows": summary["windows"],
                      "seconds": summary["seconds"]}))
    return 0


def rss_vs_size(args, command: str, log) -> list[dict]:
    rows = []
    for size in args.rss_sizes:
        scene = write_synthetic_s2(Path(args.workdir) / f"s2_{size}.tif", size)
        cmd = [sys.executable, "-m", "tm_bench.scene", str(args.export_dir), "--child", command, "--scene", str(scene),
               "--batch", str(args.batch), "--workdir", str(args.workdir)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.task_export:
            cmd += ["--task-export", str(args.task_export)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = {"command": command, "size": size, **json.loads(result.stdout.strip().splitlines()[-1])}
        log(f"  {command} {size}^2: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"(after warm-up {row['rss_after_warmup_bytes'] / 2**20:.0f} MiB), {row['seconds']:.1f} s")
        rows.append(row)
    return rows


def on_ray(args, command: str, scene: Path, log) -> dict:
    """The scene on a local Ray cluster (``--ray-actors`` actors, one thread each), interleaved with
    local runs (``--threads``) so that the ratio holds under a changing load."""
    from tm_runtime.scene import RayExecutor, RuntimeFactory
    from tm_runtime.scene.ray_executor import ensure_ray

    start = time.perf_counter()
    ensure_ray(None, num_cpus=args.ray_actors, object_store_memory=512 * 2**20)
    init = time.perf_counter() - start
    factory = RuntimeFactory(_export_for(args, command), threads=1)
    local_rt = _runtime(args, command)
    out = Path(args.workdir) / f"ray_{command}_{args.size}.tif"
    ray_runs, local_runs = [], []
    for _ in range(args.repeats + 1):  # the first Ray run includes starting the actors: not counted
        ray_runs.append(_run(factory.describe(), command, scene, out, args.batch,
                             executor=RayExecutor(factory, actors=args.ray_actors)))
        local_runs.append(_run(local_rt, command, scene, out, args.batch))
    ray_s = statistics.median(r["seconds"] for r in ray_runs[1:])
    local_s = statistics.median(r["seconds"] for r in local_runs[1:])
    log(f"  ray {command}: init {init:.1f} s, runs {[round(r['seconds'], 1) for r in ray_runs]} s; "
        f"local {[round(r['seconds'], 1) for r in local_runs]} s")
    windows = ray_runs[0]["windows"]["total"]
    return {"command": command, "size": args.size, "actors": args.ray_actors, "ray_init_seconds": init,
            "ray_seconds": [r["seconds"] for r in ray_runs], "local_seconds": [r["seconds"] for r in local_runs],
            "windows": windows, "ray_windows_per_second": windows / ray_s, "local_windows_per_second": windows / local_s,
            "ratio_ray_over_local_seconds": ray_s / local_s}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tm-bench scene", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="directory written by tm-export (embed; predict too if it is a task export)")
    p.add_argument("--task-export", default=None, help="a fine-tuned task export taking S2L2A, for predict")
    p.add_argument("--size", type=int, default=2048, help="side of the end-to-end scene (default 2048)")
    p.add_argument("--commands", nargs="+", default=["embed", "predict"], choices=["embed", "predict"])
    p.add_argument("--batch", type=int, default=8, help="windows per model call (default 8)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="interleaved scene runs (default 3)")
    p.add_argument("--batch-iters", type=int, default=7, help="model calls per time-per-batch sample (default 7)")
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[], help="scene sides for peak RSS, e.g. 1024 8192")
    p.add_argument("--ray", action="store_true", help="also run the commands on a local Ray cluster")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end vs model measurement")
    p.add_argument("--ray-actors", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/tm-scene-bench", help="scenes and outputs (default /tmp/tm-scene-bench)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scene", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    result = {"machine": machine_info(), "versions": versions(), "args": vars(args) | {"json": str(args.json)},
              "end_to_end": [], "rss": [], "ray": []}
    import rasterio

    result["versions"]["rasterio"] = rasterio.__version__
    result["versions"]["gdal"] = rasterio.__gdal_version__
    scene = write_synthetic_s2(Path(args.workdir) / f"s2_{args.size}.tif", args.size)
    for command in [] if args.no_end_to_end else args.commands:
        log(f"end to end vs model, {command}:")
        result["end_to_end"].append(end_to_end(args, command, scene, log))
    for command in args.commands if args.rss_sizes else []:
        log(f"peak RSS vs scene size, {command}:")
        result["rss"].extend(rss_vs_size(args, command, log))
    if args.ray:
        import ray

        result["versions"]["ray"] = ray.__version__
        for command in args.commands:
            log(f"on Ray, {command}:")
            result["ray"].append(on_ray(args, command, scene, log))
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    for row in result["end_to_end"]:
        print(f"{row['command']} {row['size']}^2, batch {row['batch']}: scene {row['scene_seconds_median']:.2f} s, "
              f"model alone {row['model_only_seconds']:.2f} s, ratio {row['ratio_end_to_end_over_model']:.3f}, "
              f"{row['windows_per_second']:.2f} windows/s")
    for row in result["rss"]:
        print(f"{row['command']} {row['size']}^2: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB")
    for row in result["ray"]:
        print(f"ray {row['command']} {row['size']}^2 ({row['actors']} actors): {row['ray_windows_per_second']:.2f} "
              f"windows/s, local {row['local_windows_per_second']:.2f}, time ray/local "
              f"{row['ratio_ray_over_local_seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
