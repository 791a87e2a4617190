"""tm-run: TerraMind over whole scenes, GeoTIFF in, georeferenced GeoTIFF out.

    tm-run predict  EXPORT --input S2L2A=scene.tif [--input S1GRD=s1.tif] --out map.tif
                    [--output classes|probabilities|logits]
                    (multi-temporal models: --input S2L2A=march.tif --input S2L2A=june.tif ..., in date order)
    tm-run generate EXPORT --input S2L2A=scene.tif --output LULC=lulc.tif --output S1GRD=s1.tif
                    [--timesteps 10] [--seed 0]
    tm-run embed    EXPORT --input S2L2A=scene.tif --out emb.tif [--merge-method mean] [--float16]

Windows (terratorch's tiled inference, same defaults): --crop 224 --stride 192 --delta 8
--no-blend --no-average --padding reflect --batch 16. Scale-out: --ray [--ray-address ADDR].
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ..cli_args import non_negative_int as _non_negative
from ..cli_args import positive_int as _positive

SUBCOMMANDS = ("predict", "generate", "embed")


def _split(item: str, what: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"{what} must look like NAME=VALUE, got {item!r}")
    return key, value


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, value = _split(item, what)
        if key in out:
            raise ValueError(f"{what}: {key} given twice")
        out[key] = value
    return out


def _inputs(items: list[str]) -> dict[str, str | list[str]]:
    """--input MOD=PATH, repeated; a modality given several times (under any of its names) lists
    its dates, in order."""
    from ..modalities import get_modality

    out: dict[str, str | list[str]] = {}
    for item in items:
        key, value = _split(item, "--input")
        try:
            key = get_modality(key).name
        except (KeyError, ValueError):
            pass  # not a modality: the command's own check names it
        if key in out:
            before = out[key]
            out[key] = [*(before if isinstance(before, list) else [before]), value]
        else:
            out[key] = value
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", type=Path, help="directory written by tm-export")
    p.add_argument("--input", action="append", required=True, metavar="MOD=PATH",
                   help="an input modality and its GeoTIFF/COG (repeat; the first one's grid is the output grid); "
                        "a multi-temporal task model takes one file per date: repeat MOD=PATH in date order")
    p.add_argument("--bands", action="append", metavar="MOD=B1,B2,...",
                   help="bands to read, by name (file band descriptions, e.g. B02 or BLUE) or 1-based index")
    p.add_argument("--nodata", action="append", metavar="MOD=VALUE", help="treat VALUE as nodata (overrides the file)")
    p.add_argument("--resampling", action="append", metavar="MOD=METHOD",
                   help="resampling onto the first input's grid (default bilinear; nearest for class maps)")
    t = p.add_argument_group("windows (terratorch's tiled inference and defaults; predict: the task config's "
                             "tiled_inference_parameters first)")
    t.add_argument("--crop", type=_positive, default=None, help="window size in pixels (default 224 = the export's)")
    t.add_argument("--stride", type=_positive, default=None, help="step between windows (default 192)")
    t.add_argument("--delta", type=_non_negative, default=None, help="pixels dropped at each window edge (default 8)")
    t.add_argument("--no-blend", action="store_true", help="no cosine weighting of the overlaps (blend_overlaps=False)")
    t.add_argument("--no-average", action="store_true",
                   help="no averaging of overlaps: the last window in terratorch's order wins (average_patches=False)")
    t.add_argument("--padding", default=None, help="reflect | replicate | constant | none (default reflect)")
    t.add_argument("--batch", type=_positive, default=None, help="windows per model call (default 16)")
    o = p.add_argument_group("outputs")
    o.add_argument("--cog", action="store_true", help="write Cloud-Optimized GeoTIFFs (with overviews)")
    o.add_argument("--quicklook", nargs="?", const=True, default=False, metavar="PNG",
                   help="also write a PNG quicklook (default: next to each output, .png)")
    o.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    o.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write a JSON summary to FILE (or stdout)")
    prog = o.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    r = p.add_argument_group("runtime")
    r.add_argument("--backend", default="ort", help="ort (default), ort-cuda, tensorrt, or another tm_runtime backend")
    r.add_argument("--precision", default=None, help="passed to the backend (e.g. fp16, bf16)")
    r.add_argument("--backend-option", action="append", metavar="KEY=VALUE", help="more backend options")
    r.add_argument("--threads", type=_positive, default=None, help="ONNX Runtime intra-op threads")
    r.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the graph files")
    r.add_argument("--prefetch", type=_positive, default=1, help="batches read ahead of the model (default 1)")
    s = p.add_argument_group("scale-out (pip install 'tm-deploy[ray]')")
    s.add_argument("--ray", action="store_true", help="spread the windows over Ray Data actors")
    s.add_argument("--ray-address", default=None, help="an existing cluster ('auto', 'ray://HOST:10001'); "
                                                       "default: start a local one")
    s.add_argument("--ray-actors", type=_positive, default=None, help="actors (default: cluster CPUs / per-actor CPUs)")
    s.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    s.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tm-run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="a fine-tuned task model over a scene")
    _common(p)
    p.add_argument("--out", required=True, type=Path, help="output GeoTIFF")
    p.add_argument("--output", choices=("classes", "probabilities", "logits"), default=None,
                   help="classes (uint8 + colour table; default), probabilities or logits (float32)")
    p.add_argument("--no-standardize", action="store_true", help="inputs are already standardised")
    p.add_argument("--seed", type=int, default=None, help="TiM task models: scene seed (default: drawn, reported)")
    p.add_argument("--tim-temperature", type=float, default=None, help="TiM task models (default: the export's)")
    p.add_argument("--tim-top-p", type=float, default=None)
    p.add_argument("--tim-top-k", type=int, default=None)
    g = sub.add_parser("generate", help="generate modalities over a scene")
    _common(g)
    g.add_argument("--output", action="append", required=True, metavar="MOD=PATH",
                   help="an output modality and its GeoTIFF (repeat; generated in this order, chained)")
    g.add_argument("--timesteps", type=_positive, default=10, help="diffusion steps (default 10)")
    g.add_argument("--seed", type=int, default=None, help="scene seed (default: drawn, and reported)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--no-chained", action="store_true", help="outputs independent given the inputs")
    e = sub.add_parser("embed", help="an embedding map: one pixel per 16x16 patch")
    _common(e)
    e.add_argument("--out", required=True, type=Path, help="output GeoTIFF")
    e.add_argument("--merge-method", default="mean", choices=("mean", "max", "concat"))
    e.add_argument("--layer", type=int, default=-1, help="encoder layer (default -1: the normed last one)")
    e.add_argument("--float16", action="store_true", help="write float16 instead of float32")
    e.add_argument("--no-standardize", action="store_true", help="inputs are already standardised")
    return parser


def _bands(items) -> dict[str, list[str]]:
    return {k: [b.strip() for b in v.split(",") if b.strip()] for k, v in _pairs(items, "--bands").items()}


def run(args: argparse.Namespace) -> dict:
    from .pipeline import embed_scene, generate_scene, predict_scene
    from .ray_executor import RayExecutor, RuntimeFactory

    tiling = {key: value for key, value in (("crop", args.crop), ("stride", args.stride), ("delta", args.delta),
                                            ("batch_size", args.batch)) if value is not None}
    if args.padding is not None:
        tiling["padding"] = None if args.padding.lower() in ("none", "false") else args.padding
    if args.no_blend:
        tiling["blend_overlaps"] = False
    if args.no_average:
        tiling["average_patches"] = False
    options = _pairs(args.backend_option, "--backend-option")
    if args.precision:
        if args.backend == "ort":
            raise ValueError("--precision applies to a GPU or OpenVINO backend (--backend ...); the default 'ort' "
                             "backend runs the export's own precision")
        options["precision"] = args.precision
    factory = RuntimeFactory(str(args.export_dir), args.backend, options or None, args.threads, not args.no_verify)
    inputs = _inputs(args.input)
    common = dict(tiling=tiling, bands=_bands(args.bands),
                  nodata={k: float(v) for k, v in _pairs(args.nodata, "--nodata").items()},
                  resampling=_pairs(args.resampling, "--resampling"), cog=args.cog, overwrite=args.overwrite,
                  quicklook=str(args.quicklook) if isinstance(args.quicklook, str) else args.quicklook,
                  progress=args.progress)
    if args.ray:
        runtime = factory.describe()
        common["executor"] = RayExecutor(factory, actors=args.ray_actors, address=args.ray_address,
                                         num_cpus=args.ray_cpus_per_actor, num_gpus=args.ray_gpus_per_actor)
    else:
        from .executor import LocalExecutor

        runtime = factory()
        common["executor"] = LocalExecutor(runtime, prefetch=args.prefetch)
    if args.command == "predict":
        return predict_scene(runtime, inputs, args.out, output=args.output, standardize=not args.no_standardize,
                             seed=args.seed, tim_temperature=args.tim_temperature, tim_top_p=args.tim_top_p,
                             tim_top_k=args.tim_top_k, **common)
    if args.command == "embed":
        return embed_scene(runtime, inputs, args.out, merge_method=args.merge_method, layer=args.layer,
                           standardize=not args.no_standardize, dtype="float16" if args.float16 else "float32",
                           **common)
    outputs = _pairs(args.output, "--output")
    return generate_scene(runtime, inputs, outputs, timesteps=args.timesteps, seed=args.seed,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          chained=not args.no_chained, **common)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *rest: f"tm-run: warning: {message}\n"
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print("tm-run: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        print(f"tm-run: error: {error}", file=sys.stderr)
        return 1
    text = json.dumps(summary, indent=2, default=str)
    if args.json == "-":
        print(text)
    elif args.json:
        Path(args.json).write_text(text + "\n")
    else:
        for name, info in summary["outputs"].items():
            print(f"{name}: {info['path']} ({info['width']} x {info['height']}, {info['count']} x {info['dtype']})",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
