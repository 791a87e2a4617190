"""``tm-export --precision int8``: int8 MatMul/Gemm/Conv weights for ONNX Runtime, accuracy-gated.

Runs after every graph was exported and validated in fp32 (in the export's work directory):

1. **Calibration.** The fp32 export runs, through the runtime's public API, on real tiles
   (``--calibration-data DIR``, TerraMesh layout ``DIR/<MODALITY>/*.tif``, standardised with the
   pretraining statistics as ``standardize=True`` does): ``embed`` and, when there are generation
   targets, ``generate`` (temperature 0, ``gate_timesteps`` diffusion steps). A proxy around the
   backend records the feeds every graph receives, so the encoder sees real token sequences, the
   decoders real encoder outputs and the UNet real ``x_t`` at every step of the schedule.
2. **Quantisation** (onnxruntime.quantization). ``static`` (default): QDQ, weights int8 per output
   channel in a 7-bit range (``reduce_range``: AVX2/AVX-512 without VNNI saturate u8 x s8 products in
   int16 otherwise), activations uint8 per tensor with MinMax ranges from step 1. ``dynamic``: weights int8,
   activation ranges computed per call (no calibration). Only MatMul, Gemm and Conv are quantised:
   LayerNorm/GroupNorm, softmax, GELU and the residual adds stay fp32, as do the FSQ tokenizer
   encoders (their ids must match fp32 exactly), the embedding graphs (gathers and one small patch
   projection: no time to gain, error added to every token) and the LULC ViT decoder.
3. **Gates** (``tm_runtime.accuracy``): the int8 export against its fp32 graphs on the tiles of
   ``--gate-data`` (default: the calibration tiles). A failed gate fails the export: nothing is
   written at ``--out``. The manifest records the precision of every graph, the calibration data
   and the gate figures.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tm_runtime.accuracy import accuracy_report, format_report, load_tiles
from tm_runtime.backends.openvino import keeps_fp32
from tm_runtime.manifest import MANIFEST_NAME, sha256_file

INT8_OPS = ("MatMul", "Gemm", "Conv")
INT8_METHODS = ("static", "dynamic")
# Graphs that stay fp32 in an int8 export, by manifest role (besides the patch-embedding graphs).
KEEP_FP32_ROLES = ("tokenizer_encoder", "token_embedding", "sequence_embedding", "tokenizer_decoder")
REFERENCE_DIR = ".fp32-reference"


class QuantizationError(RuntimeError):
    pass


def int8_graphs(manifest: dict[str, Any]) -> list[str]:
    """The graphs an int8 export quantises: the encoder, the decoders and the diffusion UNets
    (every graph that is not an embedding, a tokenizer encoder or the LULC ViT decoder)."""
    embeddings = {m["graph"] for m in manifest["modalities"].values()}
    return [name for name, g in manifest["graphs"].items()
            if name not in embeddings and g.get("role") not in KEEP_FP32_ROLES and not keeps_fp32(g)]


class _Recorder:
    """Backend proxy keeping a copy of every feed of the wanted graphs."""

    def __init__(self, inner: Any, wanted: set[str]) -> None:
        self.inner, self.wanted = inner, wanted
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)

    def run(self, name: str, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
        if name in self.wanted:
            self.feeds[name].append({k: np.array(v) for k, v in feeds.items()})
        return self.inner.run(name, feeds, outputs)


def collect_calibration(export_dir: Path, tiles: dict[str, np.ndarray], graphs: list[str], timesteps: int,
                        seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Feeds of ``graphs`` while the fp32 export embeds and generates from every tile (batch 1)."""
    from tm_runtime import TerraMindRuntime

    rt = TerraMindRuntime(export_dir, verify=False)
    recorder = _Recorder(rt.backend, set(graphs))
    rt.backend = recorder
    targets = rt.output_modalities  # coords included: its causal decoder is calibrated too
    count = len(next(iter(tiles.values())))
    for i in range(count):
        tile = {m: a[i:i + 1] for m, a in tiles.items()}
        rt.embed(tile, standardize=True)
        if targets:
            # Unchained: every output straight from the inputs (no token-embedding graph needed).
            rt.generate(tile, targets, timesteps=timesteps, seed=seed + i, temperature=0.0, chained=False)
    return dict(recorder.feeds)


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # not needed by MinMax; part of the protocol in newer versions
        pass


def quantize_graph(src: Path, dst: Path, method: str, feeds: list[dict[str, np.ndarray]] | None) -> dict[str, Any]:
    """Write the int8 version of ``src`` to ``dst``; returns how it was quantised."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    # onnxruntime logs a pre-processing hint per graph at WARNING level.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    if method == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS))
        return {"method": "dynamic", "weights": "int8 per tensor", "activations": "uint8, range per call",
                "ops": list(INT8_OPS)}
    if not feeds:
        raise QuantizationError(f"{src.name}: no calibration feeds were recorded for it")
    quantize_static(str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(INT8_OPS), per_channel=True, activation_type=QuantType.QUInt8,
                    # 7-bit weights: x86 without VNNI multiplies u8 x s8 pairs into int16
                    # (vpmaddubsw), which saturates with full-range per-channel weights (token cosine
                    # min 0.9991 -> 0.9998 on the tiny encoder with the range reduced).
                    reduce_range=True,
                    weight_type=QuantType.QInt8)
    # (MinMax keeps only per-tensor ReduceMin/ReduceMax per sample, so memory stays small. Its
    # CalibMaxIntermediateOutputs option is avoided: onnxruntime 1.32 drops the samples it flushes.)
    return {"method": "static QDQ", "weights": "int8 per output channel (symmetric, 7-bit range)",
            "activations": "uint8 per tensor (MinMax calibration)", "ops": list(INT8_OPS),
            "calibration_samples": len(feeds)}


def _link_reference(workdir: Path, manifest: dict[str, Any]) -> Path:
    """A view of the fp32 export (hard links: no copy) that survives the graphs being replaced."""
    ref = workdir / REFERENCE_DIR
    ref.mkdir()
    files = [MANIFEST_NAME] + [f for g in manifest["graphs"].values()
                               for f in [g["file"]] + [e["file"] for e in g.get("external_data", [])]]
    files += [f["file"] for f in manifest.get("files", {}).values()]
    for f in files:
        try:
            os.link(workdir / f, ref / f)
        except OSError:
            shutil.copyfile(workdir / f, ref / f)
    return ref


def quantize_export(workdir: Path, calibration_data: Path | None, gate_data: Path | None = None,
                    method: str = "static", timesteps: int = 10, seed: int = 0,
                    thresholds: dict[str, float] | None = None, log: Callable[[str], None] = print,
                    tiles_override: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Turn the fp32 export in ``workdir`` into the int8 export and gate it; returns the manifest.
    Raises ``tm_export.export.ValidationFailed`` when a gate fails (the caller removes ``workdir``).
    ``tiles_override`` (tests): calibration tiles given as arrays instead of read from a folder."""
    from tm_runtime import TerraMindRuntime

    from .export import ValidationFailed

    if method not in INT8_METHODS:
        raise QuantizationError(f"int8 method must be one of {', '.join(INT8_METHODS)}, got {method!r}")
    if calibration_data is None and tiles_override is None:
        raise QuantizationError("--precision int8 needs --calibration-data DIR (tiles as DIR/<MODALITY>/*.tif, e.g. "
                                "the TerraMesh examples) for the calibration and the accuracy gates")
    manifest = json.loads((workdir / MANIFEST_NAME).read_text())
    inputs = list(manifest["modalities"])
    if tiles_override is not None:
        calib, calib_source = tiles_override, {"dir": None, "tiles": "given as arrays"}
    else:
        calib, calib_source = load_tiles(calibration_data, inputs)
    gate_dir = gate_data or calibration_data
    gate_tiles, gate_source = load_tiles(gate_dir, inputs) if gate_dir else (calib, calib_source)
    chosen = int8_graphs(manifest)
    log(f"int8 ({method}): {', '.join(chosen)}; calibration on {len(next(iter(calib.values())))} tile(s) "
        f"from {calib_source['dir']}")
    feeds = collect_calibration(workdir, calib, chosen, timesteps, seed) if method == "static" else {}
    ref_dir = _link_reference(workdir, manifest)
    try:
        for name, entry in manifest["graphs"].items():
            if name not in chosen:
                entry["precision"] = "fp32"
                continue
            path = workdir / entry["file"]
            tmp = path.with_suffix(".int8.onnx")
            info = quantize_graph(path, tmp, method, feeds.get(name))
            os.replace(tmp, path)  # the fp32 file lives on under REFERENCE_DIR (hard link)
            before = (ref_dir / entry["file"]).stat().st_size
            entry.update(precision="int8", sha256=sha256_file(path),
                         quantization={**info, "fp32_sha256": entry["sha256"], "fp32_bytes": before,
                                       "int8_bytes": path.stat().st_size})
            entry["validation_note"] = ("'validation' checked the fp32 graph against PyTorch before quantisation; "
                                        "the int8 graph is checked by the manifest's accuracy gates")
            log(f"  {name}: int8, {before / 1e6:.1f} MB -> {path.stat().st_size / 1e6:.1f} MB")
        manifest["precision"] = "int8"
        manifest["quantization"] = {
            "method": method, "ops": list(INT8_OPS), "graphs": chosen,
            "calibration": {**calib_source, "standardized": True, "timesteps": timesteps,
                            "samples_per_graph": {n: len(v) for n, v in feeds.items()}},
            "kept_fp32": {n: _why_fp32(n, g, manifest) for n, g in manifest["graphs"].items() if n not in chosen},
        }
        (workdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        log(f"accuracy gates on {len(next(iter(gate_tiles.values())))} tile(s) from {gate_source['dir']}")
        report = accuracy_report(TerraMindRuntime(ref_dir, verify=False), TerraMindRuntime(workdir, verify=False),
                                 gate_tiles, timesteps=timesteps, seed=seed, thresholds=thresholds)
        report["data"] = gate_source
        report["reference"] = "the same export's fp32 graphs (validated against PyTorch), ONNX Runtime CPU"
        manifest["accuracy"] = {"int8_vs_fp32": report}
        manifest.setdefault("validation", {})["accuracy_gates_passed"] = report["passed"]
        (workdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        log(format_report(report))
        if not report["passed"]:
            failed = [n for n, g in report["gates"].items() if not g["passed"]]
            raise ValidationFailed(f"int8 accuracy gate(s) failed: {', '.join(failed)}")
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)
    return manifest


def _why_fp32(name: str, entry: dict[str, Any], manifest: dict[str, Any]) -> str:
    role = entry.get("role")
    if role == "tokenizer_encoder" or keeps_fp32(entry):
        return "FSQ tokenizer encoder: its ids must match fp32 exactly"
    if role == "tokenizer_decoder":
        return "LULC ViT decoder: kept fp32 (small share of generate time)"
    return "embedding graph: gathers and a small patch projection, nothing to gain"
