"""tm-bench: latency, throughput and memory of a tm-deploy export.

    tm-bench embed DIR [--batch 1 8] [--warmup 3] [--iters 20] [--threads N]
                       [--modalities ...] [--json FILE] [--compare-torch] [--ckpt PATH]
                       [--backend ort-cpu|ort-cuda|tensorrt|openvino] [--precision fp32|bf16|fp16]
    tm-bench generate DIR --outputs S1GRD LULC [--timesteps 10] [--compare-torch]
                       [--backend ort-cpu|ort-cuda|tensorrt|openvino] [--precision fp32|bf16|fp16]
    tm-bench accuracy DIR [--backend openvino --precision bf16] [--reference FP32_DIR] [--data TILES_DIR]
    tm-bench memory DIR [--outputs S1GRD LULC] [--workloads load embed generate] [--json FILE]
    tm-bench predict DIR [--batch 1 8] [--compare-torch --ckpt CKPT] [--backend ...] [--precision ...]
    tm-bench scene DIR [--size 2048] [--rss-sizes 1024 8192] [--ray]   (whole scenes: tm_bench/scene.py)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tm_runtime.cli_args import modality_factor
from tm_runtime.cli_args import non_negative_int as _non_negative
from tm_runtime.cli_args import positive_int as _positive
from tm_runtime.manifest import ManifestError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tm-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="per-graph and end-to-end embed latency")
    e.add_argument("export_dir", type=Path, help="directory written by tm-export")
    e.add_argument("--batch", type=_positive, nargs="+", default=[1], help="batch sizes (default 1)")
    e.add_argument("--warmup", type=_non_negative, default=3, help="untimed iterations first (default 3)")
    e.add_argument("--iters", type=_positive, default=20, help="timed iterations (default 20)")
    e.add_argument("--threads", type=_positive, default=None,
                   help="threads for ORT intra-op, torch and the sgemm probe (default: usable cores)")
    e.add_argument("--modalities", nargs="+", default=None, help="subset of the exported modalities")
    e.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    e.add_argument("--json", type=Path, default=None, help="write every number here")
    e.add_argument("--gap-ms", type=float, default=50.0,
                   help="idle gap before each interleaved call, so spinning threads of the previous "
                        "contender are asleep (default 50)")
    e.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown here")
    e.add_argument("--compare-torch", action="store_true",
                   help="also time the PyTorch reference and terratorch eager (needs torch), interleaved")
    e.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint of a non-random export, for --compare-torch")
    g = sub.add_parser("generate", help="per-stage and end-to-end generate latency")
    g.add_argument("export_dir", type=Path, help="directory written by tm-export with --output-modalities")
    g.add_argument("--outputs", nargs="+", required=True, help="output modalities, e.g. S1GRD LULC")
    g.add_argument("--timesteps", type=_positive, default=10, help="diffusion steps (default 10)")
    g.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    g.add_argument("--warmup", type=_non_negative, default=1, help="untimed runs first (default 1)")
    g.add_argument("--iters", type=_positive, default=3, help="timed runs (default 3)")
    g.add_argument("--threads", type=_positive, default=None, help="threads for ORT, torch and the sgemm probe")
    g.add_argument("--seed", type=int, default=0, help="seed of the inputs and the generation")
    g.add_argument("--json", type=Path, default=None, help="write every number here")
    g.add_argument("--compare-torch", action="store_true",
                   help="also time the PyTorch reference and terratorch's *_generate, interleaved (temperature 0)")
    a = sub.add_parser("accuracy", help="accuracy gates of a reduced-precision path against fp32 on real tiles")
    a.add_argument("export_dir", type=Path, help="export to check (an int8 export, or fp32 graphs for OpenVINO bf16)")
    a.add_argument("--reference", type=Path, default=None,
                   help="fp32 export to compare with (default: the same export on ONNX Runtime CPU; required "
                        "for an int8 export)")
    a.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="tiles as DIR/<MODALITY>/*.tif, standardised before use (default: ../shared/data/"
                        "terramesh_examples when it exists)")
    a.add_argument("--tiles", type=_positive, default=None, help="use the first N tiles only")
    a.add_argument("--tile-scale", nargs="+", default=[], metavar="MOD=FACTOR", type=modality_factor,
                   help="task exports: multiply the tiles of MOD by FACTOR to reach the units of the config's "
                        "statistics (e.g. S2L2A=0.0001: digital numbers to reflectance)")
    a.add_argument("--timesteps", type=_positive, default=10, help="diffusion steps of the PSNR check (default 10)")
    a.add_argument("--threads", type=_positive, default=None)
    a.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise")
    a.add_argument("--json", type=Path, default=None, help="write the report here")
    m = sub.add_parser("memory", help="RSS of a loaded export: load / embed / generate, each in a fresh process")
    m.add_argument("export_dir", type=Path, help="directory written by tm-export")
    m.add_argument("--outputs", nargs="+", default=None, help="generate these (default: every exported output)")
    m.add_argument("--timesteps", type=_positive, default=2, help="diffusion steps of the generate run (default 2)")
    m.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    m.add_argument("--threads", type=_positive, default=None, help="ORT intra-op threads")
    m.add_argument("--lean-memory", action="store_true",
                   help="run with backend_options={'lean_memory': True}: no per-session CPU arenas, no pre-packed "
                        "weight copies")
    m.add_argument("--workloads", nargs="+", choices=["load", "embed", "generate"], default=None,
                   help="default: all three (generate only with outputs)")
    m.add_argument("--json", type=Path, default=None, help="write every number here")
    t = sub.add_parser("predict", help="per-stage and end-to-end predict latency of a fine-tuned task export")
    t.add_argument("export_dir", type=Path, help="directory written by tm-export --task-config")
    t.add_argument("--batch", type=_positive, nargs="+", default=[1], help="batch sizes (default 1)")
    t.add_argument("--warmup", type=_non_negative, default=2, help="untimed calls first (default 2)")
    t.add_argument("--iters", type=_positive, default=10, help="timed calls (default 10)")
    t.add_argument("--threads", type=_positive, default=None, help="threads for ORT and torch")
    t.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    t.add_argument("--json", type=Path, default=None, help="write every number here")
    t.add_argument("--compare-torch", action="store_true",
                   help="also time terratorch's task model on the same checkpoint, interleaved (fp32 and as "
                        "imported)")
    t.add_argument("--ckpt", type=Path, default=None, help="the checkpoint the export was made from (--compare-torch)")
    for sp in (e, g, a, t):
        sp.add_argument("--backend", choices=["ort-cpu", "ort-cuda", "tensorrt", "openvino"], default="ort-cpu",
                        help="ort-cpu (default); ort-cuda (onnxruntime-gpu, IO binding) or tensorrt (engines "
                             "from tm-build-engines' cache) add a per-graph H2D / compute / D2H breakdown; "
                             "openvino runs the same ONNX files on OpenVINO (pip install 'tm-deploy[openvino]')")
        if sp is not a:
            sp.add_argument("--ort-spinning", action="store_true",
                            help="ort-cpu: backend_options={'spinning': True}, intra-op threads spin-wait within a "
                                 "run and stop at its end (off by default: it costs when other processes share "
                                 "the cores)")
        sp.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="with --backend openvino: its inference precision (bf16 needs AVX512_BF16 or AMX; "
                             "the FSQ tokenizer encoders stay fp32)")
    return p


def _accuracy(args) -> int:
    from .accuracy import run_accuracy

    report = run_accuracy(args.export_dir, backend=args.backend, precision=args.precision, reference=args.reference,
                          data=args.data, tiles=args.tiles, timesteps=args.timesteps, threads=args.threads,
                          seed=args.seed, log=lambda s: print(s, file=sys.stderr, flush=True),
                          tile_scale=dict(args.tile_scale))
    from tm_runtime.accuracy import format_report

    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["passed"] else 3


def _generate(args) -> int:
    from .generate import GenerateBenchConfig, format_generate_report, run_generate_benchmark

    config = GenerateBenchConfig(args.export_dir, args.outputs, timesteps=args.timesteps, batch=args.batch,
                                 warmup=args.warmup, iters=args.iters, threads=args.threads,
                                 compare_torch=args.compare_torch, seed=args.seed, backend=args.backend,
                                 precision=args.precision, ort_spinning=args.ort_spinning)
    result = run_generate_benchmark(config, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_generate_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _memory(args) -> int:
    from .memory import WORKLOADS, MemoryBenchConfig, format_memory_report, run_memory_benchmark

    config = MemoryBenchConfig(args.export_dir, args.outputs, timesteps=args.timesteps, batch=args.batch,
                               threads=args.threads, workloads=tuple(args.workloads or WORKLOADS),
                               lean_memory=args.lean_memory)
    result = run_memory_benchmark(config, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_memory_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _predict(args) -> int:
    from .predict import PredictBenchConfig, format_predict_report, run_predict_benchmark

    config = PredictBenchConfig(args.export_dir, batches=args.batch, warmup=args.warmup, iters=args.iters,
                                threads=args.threads, compare_torch=args.compare_torch, ckpt=args.ckpt,
                                seed=args.seed, backend=args.backend, precision=args.precision,
                                ort_spinning=args.ort_spinning)
    result = run_predict_benchmark(config, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_predict_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scene"]:  # whole scenes through tm-run's pipeline; parses its own options
        from .scene import main as scene_main

        return scene_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "predict":
        try:
            return _predict(args)
        except (ManifestError, ValueError, RuntimeError, ImportError) as exc:
            print(f"tm-bench: error: {exc}", file=sys.stderr)
            return 2
    if args.command in ("accuracy", "memory"):
        try:
            return _accuracy(args) if args.command == "accuracy" else _memory(args)
        except (ManifestError, ValueError, RuntimeError, ImportError, FileNotFoundError) as exc:
            print(f"tm-bench: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "generate":
        try:
            return _generate(args)
        except (ManifestError, ValueError, RuntimeError, ImportError) as exc:
            print(f"tm-bench: error: {exc}", file=sys.stderr)
            return 2
    from .embed import EmbedBenchConfig, run_embed_benchmark
    from .report import format_markdown, format_report

    config = EmbedBenchConfig(
        export_dir=args.export_dir, batches=args.batch, warmup=args.warmup, iters=args.iters,
        threads=args.threads, modalities=args.modalities, compare_torch=args.compare_torch,
        ckpt=args.ckpt, seed=args.seed, ort_spinning=args.ort_spinning,
        gap_s=args.gap_ms / 1e3, backend=args.backend, precision=args.precision,
    )
    try:
        result = run_embed_benchmark(config, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (ManifestError, ValueError, RuntimeError, ImportError) as exc:
        print(f"tm-bench: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
