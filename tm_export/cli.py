"""tm-export: trace TerraMind into separate ONNX graphs, validate them, write a manifest."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tm_runtime.cli_args import modality_factor
from tm_runtime.modalities import INPUT_MODALITIES, TARGETS

# What `pip install 'tm-deploy[export]'` adds to the runtime-only install (see pyproject.toml).
EXPORT_MODULES = ("torch", "onnx", "onnxslim", "huggingface_hub", "safetensors", "tokenizers", "yaml")
MODEL_SIZES = ("tiny", "small", "base", "large")  # tm_export.reference.terramind.VARIANTS


def parse_paths(items: list[str]) -> dict[str, Path]:
    """``["LULC=/x/TerraMind_Tokenizer_LULC.pt"]`` -> ``{"LULC": Path(...)}``."""
    from tm_runtime.modalities import COORDS, get_target, is_coords

    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--tokenizer-ckpt takes MODALITY=PATH, got {item!r}")
        name = name.strip()
        out[COORDS.name if is_coords(name) else get_target(name).name] = Path(path)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tm-export", description=__doc__)
    p.add_argument("--task-config", type=Path, metavar="CONFIG.yaml",
                   help="a fine-tuned model: the terratorch config it was trained with (terratorch fit -c CONFIG); "
                        "--ckpt is then the checkpoint terratorch fit wrote. Replaces --model/--modalities/--bands")
    p.add_argument("--model", choices=list(MODEL_SIZES), help="TerraMind v1 size")
    p.add_argument("--modalities", nargs="+", metavar="MOD",
                   help=f"input modalities to export ({', '.join(INPUT_MODALITIES)}, coords; LULC and NDVI go "
                        "through their tokenizer, coords through the coords tokenizer file)")
    p.add_argument("--output-modalities", nargs="+", default=[], metavar="MOD",
                   help=f"generation targets ({' '.join(TARGETS)} coords): each adds its decoder query and head "
                        "graphs and its tokenizer graphs; the decoder itself is stored once")
    p.add_argument("--tim-modalities", nargs="+", default=[], metavar="MOD",
                   help="a Thinking-in-Modalities backbone (terramind_v1_<size>_tim): embed first generates these "
                        "modalities' tokens (e.g. LULC) and encodes them with the inputs; exports their decoders, "
                        "not their tokenizers")
    p.add_argument("--tokenizer-ckpt", nargs="+", default=[], metavar="MOD=PATH",
                   help="tokenizer weights (TerraMind_Tokenizer_<MOD>.pt) per output modality, and coords=PATH "
                        "for the coords tokenizer's config.json; default: the HF hub")
    p.add_argument("--small-tokenizers", action="store_true",
                   help="with --random-init: shrunken tokenizer architectures (fast tests and demos)")
    p.add_argument("--out", required=True, type=Path, help="export directory (written atomically)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--ckpt", type=Path, help="TerraMind_v1_<size>.pt (or .safetensors); default: the HF hub. "
                   "With --tim-modalities also a TiM backbone's state_dict (its own sampler.model.* weights); with "
                   "--task-config the fine-tuned checkpoint (.ckpt or a state_dict)")
    w.add_argument("--random-init", action="store_true", help="random weights, for tests and benchmarks")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument("--bands", nargs="+", default=[], metavar="MOD=B1,B2",
                   help="band subsets, e.g. S2L2A=BLUE,GREEN,RED,NIR_NARROW,SWIR_1,SWIR_2")
    p.add_argument("--image-size", type=int, default=224, help="input size in pixels (positions resized bicubically)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "bf16"],
                   help="fp16: fp16 weights and math, fp32 for norms/softmax and the tokenizer encoders; "
                        "float32 inputs/outputs. int8: int8 MatMul/Gemm/Conv in the encoder, decoders and UNets "
                        "for ONNX Runtime, calibrated and accuracy-gated on --calibration-data (bf16: run fp32 "
                        "graphs on OpenVINO with precision bf16 instead)")
    p.add_argument("--calibration-data", type=Path, default=None, metavar="DIR",
                   help="--precision int8: tiles as DIR/<MODALITY>/*.tif (e.g. the TerraMesh examples) to "
                        "calibrate on and, without --gate-data, to gate on")
    p.add_argument("--gate-data", type=Path, default=None, metavar="DIR",
                   help="--precision int8: tiles for the accuracy gates (default: --calibration-data)")
    p.add_argument("--int8-method", choices=["dynamic", "static"], default="dynamic",
                   help="dynamic: activation ranges per call (default); static: QDQ with activation ranges "
                        "calibrated on --calibration-data")
    p.add_argument("--int8-graphs", nargs="+", choices=["encoder", "decoders", "unet", "head"], default=None,
                   help="which graphs --precision int8 quantises (default: encoder decoders unet; head = a task "
                        "model's necks + decoder + head, opt-in; the rest stay fp32)")
    p.add_argument("--int8-fc2", choices=["auto", "int8", "fp32"], default="auto",
                   help="--precision int8: the SwiGLU MLPs' down projections (fc2, the longest-tailed inputs). "
                        "auto (default): int8 when every gate passes with them, else quantised again with them "
                        "fp32; int8 / fp32: that, gated as usual")
    p.add_argument("--tile-scale", nargs="+", default=[], metavar="MOD=FACTOR", type=modality_factor,
                   help="--task-config with --precision int8: multiply the calibration/gate tiles of MOD by FACTOR "
                        "to reach the units of the config's statistics (e.g. S2L2A=0.0001: TerraMesh's digital "
                        "numbers to reflectance)")
    p.add_argument("--winograd", type=int, nargs="?", const=4, default=0, choices=[2, 4], metavar="M",
                   help="trace the tokenizer UNets' (with --task-config: the task head's) 3x3 convolutions as "
                        "Winograd F(MxM,3x3) (default M=4): ~1.4x faster UNet steps and ~1.6x faster UNetDecoder "
                        "heads on ONNX Runtime CPU, ~4x larger files for those graphs; fp32 only, not for GPU exports")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--rtol", type=float, default=None, help="override the fp32 relative tolerance (1e-4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task_config is None and (args.model is None or not args.modalities):
        parser.error("--model and --modalities are required (or --task-config for a fine-tuned model)")
    try:
        from .bands import parse_bands
        from .export import ExportConfig, ExportError, export
        from .tim import TimSettings
        from .task.checkpoint import CheckpointError
        from .weights import WeightsError
    except ModuleNotFoundError as exc:  # a runtime-only install: no torch, onnx, ...
        if (exc.name or "").split(".")[0] not in EXPORT_MODULES:
            raise
        print(f"tm-export: error: the exporter needs the export extras (no module named {exc.name!r}): "
              "pip install 'tm-deploy[export]'", file=sys.stderr)
        return 1
    try:
        if args.task_config is not None:
            from .task.cli import run_task_export

            run_task_export(args)
            return 0
        if args.tile_scale:
            raise ValueError("--tile-scale is for --task-config exports (a config whose statistics are in other "
                             "units than the tiles); a backbone export standardises tiles with the pretraining "
                             "statistics, in TerraMesh's units")
        config = ExportConfig(
            size=args.model, modalities=args.modalities, out=args.out, output_modalities=args.output_modalities,
            tokenizer_ckpts=parse_paths(args.tokenizer_ckpt),
            tokenizer_size="small" if args.small_tokenizers else "official", ckpt=args.ckpt,
            random_init=args.random_init, seed=args.seed, bands=parse_bands(args.bands),
            image_size=args.image_size, opset=args.opset, simplify=not args.no_simplify,
            validate=not args.no_validate, max_rel_error=args.rtol, overwrite=args.overwrite,
            precision=args.precision, winograd=args.winograd, calibration_data=args.calibration_data,
            gate_data=args.gate_data, int8_method=args.int8_method, int8_graphs=args.int8_graphs,
            int8_fc2=args.int8_fc2,
            tim=TimSettings(tuple(args.tim_modalities)) if args.tim_modalities else None,
        )
        export(config, log=lambda s: print(s, flush=True))
    except (ExportError, WeightsError, ValueError, CheckpointError) as exc:
        print(f"tm-export: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
