"""``tm-export --precision int8``: int8 MatMul/Gemm/Conv weights for ONNX Runtime, accuracy-gated.

Runs after every graph was exported and validated in fp32 (in the export's work directory):

1. **Calibration** (``static`` only). The fp32 export runs, through the runtime's public API, on real tiles
   (``--calibration-data DIR``, TerraMesh layout ``DIR/<MODALITY>/*.tif``, standardised with the
   pretraining statistics as ``standardize=True`` does): ``embed`` and, when there are generation
   targets, ``generate`` (temperature 0, ``gate_timesteps`` diffusion steps). A proxy around the
   backend records the feeds every graph receives, so the encoder sees real token sequences, the
   decoders real encoder outputs and the UNet real ``x_t`` at every step of the schedule.
2. **Quantisation** (onnxruntime.quantization; graphs of MatMuls only are written by ``dynamic_int8``:
   the same int8 graph, without onnxruntime's copies of the float one). ``dynamic`` (default): weights int8 per tensor,
   activation ranges computed per call, so no calibration error; on the tiny test export it is
   more accurate than static (UNet PSNR 30.8 vs 26.2 dB, encoder token cosine min 0.99992 vs
   0.99984) and, on this project's AVX2 machine, no slower on the encoder (static QDQ ran 0.9x of
   fp32). Its convolutions become ``ConvInteger``, which ONNX Runtime runs slowly: the int8 UNet step
   was 1.8x *slower* than fp32 here (BENCHMARKS.md), so for generation on such a CPU keep the UNet
   fp32 (``--int8-graphs encoder decoders``). ``static``: QDQ, weights int8 per output
   channel in a 7-bit range (``reduce_range``: AVX2/AVX-512 without VNNI saturate u8 x s8 products in
   int16 otherwise), activations uint8 per tensor with MinMax ranges from step 1 (the calibration
   data matter only here). Only MatMul, Gemm and Conv *with a constant
   weight* are quantised, except the projection that produces a graph output directly (the
   decoders' vocabulary projection, the UNet's last convolution): on random weights the decoder
   logits are nearly flat (median top-1/top-2 gap 0.15 of their std), and quantising that one
   projection alone took the DEM decoder's argmax agreement from 0.98 to 0.94. The SwiGLU MLPs'
   down projections (``fc2``, fed the product of two activations: the longest-tailed input of all)
   are the riskiest and a third of the encoder's MatMul work: ``--int8-fc2 auto`` (default) quantises
   them too and, when a gate fails, quantises everything again with them fp32. On the base backbone
   (random weights) fc2 in int8 passes (token cosine min 0.9993) and takes the encoder from 117 to 72 ms
   on an AMX Xeon; on the base sen1floods11 task with every terratorch parameter random it fails (token
   cosine mean 0.9985, gate 0.999; 0.9991 with fc2 fp32; 0.9988 keeping qkv, proj or fc1+fc3
   instead; per-channel weights: 0.9980). Attention's
   activation products (q k^T, p v), LayerNorm/GroupNorm, softmax, GELU and the residual adds stay fp32, as do the FSQ tokenizer
   encoders (their ids must match fp32 exactly), the embedding graphs (gathers and one small patch
   projection: no time to gain, error added to every token) and the LULC ViT decoder.
3. **Gates** (``tm_runtime.accuracy``): the int8 export against its fp32 graphs on the tiles of
   ``--gate-data`` (default: the calibration tiles). A failed gate fails the export: nothing is
   written at ``--out``. The manifest records the precision of every graph, the calibration data
   and the gate figures.

A fine-tuned task export (``--task-config``) runs ``predict`` instead of embed/generate in steps 1
and 3 (``tm_runtime.task_accuracy``: its bands, dates and standardisation); its ``head`` graph (necks,
decoder: convolutions) is quantised only when asked (``--int8-graphs ... head``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tm_runtime.accuracy import compare_to_reference, format_report, load_tiles, reference_outputs
from tm_runtime.backends.openvino import keeps_fp32
from tm_runtime.manifest import MANIFEST_NAME, sha256_file

from . import dynamic_int8
from .memory import release_memory, step

INT8_OPS = ("MatMul", "Gemm", "Conv")
INT8_METHODS = ("dynamic", "static")
INT8_FC2 = ("auto", "int8", "fp32")
INT8_FAMILIES = ("encoder", "decoders", "unet", "head")
# What --precision int8 quantises unless --int8-graphs says otherwise. A task model's head (necks,
# UNet decoder) is mostly convolutions, which dynamic quantisation turns into ConvInteger: slower
# than fp32 on ONNX Runtime CPU (see the UNet note above), so it is opt-in.
DEFAULT_FAMILIES = ("encoder", "decoders", "unet")
# Graphs that stay fp32 in an int8 export, by manifest role (besides the patch-embedding graphs).
KEEP_FP32_ROLES = ("tokenizer_encoder", "token_embedding", "sequence_embedding", "tokenizer_decoder",
                   "decoder_queries", "decoder_head")
REFERENCE_DIR = ".fp32-reference"


class QuantizationError(ValueError):
    """Bad int8 options (no or missing calibration data, unknown method) or a graph without feeds."""


def check_int8_config(config: Any) -> None:
    """Fail before anything is traced: the calibration/gate folders must exist."""
    families = DEFAULT_FAMILIES if config.int8_graphs is None else config.int8_graphs
    unknown = sorted(set(families) - set(INT8_FAMILIES))
    if unknown or not families:
        raise QuantizationError(f"--int8-graphs takes {', '.join(INT8_FAMILIES)}, got {', '.join(families)}")
    if config.int8_method not in INT8_METHODS:
        raise QuantizationError(f"int8 method must be one of {', '.join(INT8_METHODS)}, got {config.int8_method!r}")
    if config.int8_fc2 not in INT8_FC2:
        raise QuantizationError(f"--int8-fc2 takes {', '.join(INT8_FC2)}, got {config.int8_fc2!r}")
    if config.calibration_data is None and (config.int8_method == "static" or config.gate_data is None):
        needs = "--calibration-data DIR" if config.int8_method == "static" else "--gate-data DIR or --calibration-data DIR"
        raise QuantizationError(f"--precision int8 needs {needs} (tiles as DIR/<MODALITY>/*.tif, e.g. the TerraMesh "
                                "examples) for the calibration and/or the accuracy gates")
    for flag, folder in (("--calibration-data", config.calibration_data), ("--gate-data", config.gate_data)):
        if folder is not None and not Path(folder).is_dir():
            raise QuantizationError(f"{flag} {folder} is not a directory")


def graph_family(name: str, manifest: dict[str, Any]) -> str | None:
    """'encoder' (the fine-tuned one in a task export), 'unet' (diffusion steps), 'head' (a task
    model's necks + decoder + head), 'decoders' (every other graph with weights worth quantising:
    the shared decoder transformer whatever its name, and a TiM model's generation graphs) or None (stays fp32: embeddings,
    decoder queries and heads, tokenizer encoders, the LULC ViT decoder)."""
    entry = manifest["graphs"][name]
    if name in {m["graph"] for m in manifest["modalities"].values()}:
        return None
    if entry.get("role") in KEEP_FP32_ROLES or keeps_fp32(entry):
        return None
    if name == manifest["encoder"]["graph"]:
        return "encoder"
    if entry.get("role") == "task_head":
        return "head"
    return "unet" if entry.get("role") == "diffusion_step" else "decoders"


def int8_graphs(manifest: dict[str, Any], families: tuple[str, ...] | list[str] = DEFAULT_FAMILIES) -> list[str]:
    """The graphs an int8 export quantises (by default the encoder, the decoders and the UNets)."""
    return [name for name in manifest["graphs"] if graph_family(name, manifest) in families]


# Ops a graph output may pass through after its last projection (bias adds, reshapes).
_PASS_THROUGH = ("Add", "Reshape", "Transpose", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")


def _constant_names(model: Any) -> set[str]:
    """Initializers and Constant-node outputs: the tensors no input changes."""
    constants = {t.name for t in model.graph.initializer}
    return constants | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def weight_nodes(model: Any) -> list[str]:
    """MatMul/Gemm/Conv nodes with a constant weight (activation x activation products, such as
    q @ k^T in attention, stay fp32: their ranges move with every input)."""
    constants = _constant_names(model)
    return [n.name for n in model.graph.node
            if n.op_type in INT8_OPS and len(n.input) > 1 and n.input[1] in constants]


def output_projections(model: Any) -> list[str]:
    """The projections that produce a graph output directly (the decoders' vocabulary projection,
    the UNet's last convolution): kept fp32, since their error lands on the result unmixed. An
    output behind a residual add or a norm (the encoder layers) has none."""
    constants = _constant_names(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in _PASS_THROUGH:
            moving = [i for i in node.input if i and i not in constants]
            if node.op_type == "Add" and len(moving) != 1:
                node = None  # a residual add: the output is not one projection's
                break
            node = producer.get(moving[0]) if moving else None
        if node is not None and node.op_type in INT8_OPS:
            found.append(node.name)
    return list(dict.fromkeys(found))


def gated_projections(model: Any) -> list[str]:
    """The MLP down projections (``fc2``) of TerraMind's SwiGLU blocks: their input is the product
    ``silu(fc1(x)) * fc3(x)`` of two activations, whose tail is far longer than any other MatMul
    input's, and a per-tensor uint8 range over it costs the most accuracy. Found by shape, not by
    name: a weight MatMul fed by a Mul of two non-constant tensors."""
    constants = _constant_names(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    found = []
    for name in weight_nodes(model):
        feed = producer.get(by_name[name].input[0])
        if feed is not None and feed.op_type == "Mul" and not any(i in constants for i in feed.input):
            found.append(name)
    return found


class _Recorder:
    """Backend proxy keeping a copy of every feed of the wanted graphs."""

    def __init__(self, inner: Any, wanted: set[str]) -> None:
        self.inner, self.wanted = inner, wanted
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)

    def run(self, name: str, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
        if name in self.wanted:
            self.feeds[name].append({k: np.array(v) for k, v in feeds.items()})
        return self.inner.run(name, feeds, outputs)


def collect_calibration(export_dir: Path, tiles: dict[str, np.ndarray], graphs: list[str],
                        workload: "GateWorkload") -> dict[str, list[dict[str, np.ndarray]]]:
    """Feeds of ``graphs`` while the fp32 export runs ``workload.calibrate`` on every tile (batch 1)."""
    from tm_runtime import TerraMindRuntime

    rt = TerraMindRuntime(export_dir, verify=False)
    recorder = _Recorder(rt.backend, set(graphs))
    rt.backend = recorder
    count = len(next(iter(tiles.values())))
    for i in range(count):
        workload.calibrate(rt, {m: a[i:i + 1] for m, a in tiles.items()}, i)
    return dict(recorder.feeds)


@dataclass
class GateWorkload:
    """What the int8 step runs on tiles, for one kind of export: how the tiles are read, the
    calibration pass (static), and the gates' reference and comparison."""
    load: Callable[[Path], tuple[dict[str, np.ndarray], dict[str, Any]]]
    calibrate: Callable[[Any, dict[str, np.ndarray], int], None]  # (runtime, one tile, its index)
    reference: Callable[[Any, dict[str, np.ndarray]], Any]
    compare: Callable[[Any, Any, dict[str, float] | None], dict[str, Any]]


def foundation_workload(manifest: dict[str, Any], timesteps: int, seed: int) -> GateWorkload:
    """A backbone/generation export: embed and generate (tm_runtime.accuracy's gates)."""
    inputs = list(manifest["modalities"])

    def calibrate(rt: Any, tile: dict[str, np.ndarray], i: int) -> None:
        rt.embed(tile, standardize=True)
        if rt.output_modalities:  # coords included: its causal decoder is calibrated too
            # Unchained: every output straight from the inputs (no token-embedding graph needed).
            rt.generate(tile, rt.output_modalities, timesteps=timesteps, seed=seed + i, temperature=0.0,
                        chained=False)

    return GateWorkload(
        load=lambda folder: load_tiles(folder, inputs), calibrate=calibrate,
        reference=lambda rt, tiles: reference_outputs(rt, tiles, timesteps=timesteps, seed=seed),
        compare=compare_to_reference)


def task_workload(manifest: dict[str, Any], seed: int, tile_scale: dict[str, float] | None = None) -> GateWorkload:
    """A fine-tuned task export: predict on the task's bands, standardised by its config
    (tm_runtime.task_accuracy's gates); a TiM step runs at temperature 0."""
    from tm_runtime.task import TaskInfo
    from tm_runtime.task_accuracy import compare_task, task_reference, task_tiles

    info = TaskInfo.from_manifest(manifest["task"])

    def calibrate(rt: Any, tile: dict[str, np.ndarray], i: int) -> None:
        rt.predict(tile, standardize=True, **({"tim_temperature": 0.0, "seed": seed} if rt.tim is not None else {}))

    return GateWorkload(
        load=lambda folder: task_tiles(folder, info, scale=tile_scale), calibrate=calibrate,
        reference=lambda rt, tiles: task_reference(rt, tiles, seed=seed), compare=compare_task)


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # not needed by MinMax; part of the protocol in newer versions
        pass


def quantize_graph(src: Path, dst: Path, method: str, feeds: list[dict[str, np.ndarray]] | None,
                   fc2_int8: bool = False) -> dict[str, Any]:
    """Write the int8 version of ``src`` to ``dst``; returns how it was quantised. ``fc2_int8``: the
    SwiGLU down projections (``gated_projections``) too."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    # onnxruntime logs a pre-processing hint per graph at WARNING level.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    kept = output_projections(model)
    found = [n for n in gated_projections(model) if n not in kept]
    gated = [] if fc2_int8 else found
    nodes = [n for n in weight_nodes(model) if n not in kept and n not in gated]
    facts = {"ops": list(INT8_OPS), "quantised_nodes": len(nodes), "fp32_output_projections": kept,
             "fp32_gated_projections": len(gated), "int8_gated_projections": len(found) - len(gated)}
    if not nodes:  # onnxruntime reads an empty nodes_to_quantize as "every node"
        raise QuantizationError(f"{src.name}: no MatMul/Gemm/Conv with a constant weight to quantise")
    if method == "dynamic":
        if dynamic_int8.supported(model, nodes):
            # MatMuls only: the graph onnxruntime would write, without its copies of it. The model
            # read above is reused (a graph under 2 GB is one file: it holds its weights already).
            onnx.load_external_data_for_model(model, str(src.parent))
            dynamic_int8.quantize_matmuls(model, dst, nodes)
            writer = "tm_export.dynamic_int8"
        else:
            del model  # onnxruntime reads the file itself
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS),
                             nodes_to_quantize=nodes)
            writer = "onnxruntime.quantization"
        return {"method": "dynamic", "weights": "int8 per tensor", "activations": "uint8, range per call",
                "written_by": writer, **facts}
    del model  # onnxruntime reads the file itself
    if not feeds:
        raise QuantizationError(f"{src.name}: no calibration feeds were recorded for it")
    quantize_static(str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(INT8_OPS), nodes_to_quantize=nodes, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    # 7-bit weights: x86 without VNNI multiplies u8 x s8 pairs into int16
                    # (vpmaddubsw), which saturates with full-range per-channel weights (token cosine
                    # min 0.9991 -> 0.9998 on the tiny encoder with the range reduced).
                    reduce_range=True,
                    weight_type=QuantType.QInt8)
    # (MinMax keeps only per-tensor ReduceMin/ReduceMax per sample, so memory stays small. Its
    # CalibMaxIntermediateOutputs option is avoided: onnxruntime 1.32 drops the samples it flushes.)
    return {"method": "static QDQ", "weights": "int8 per output channel (symmetric, 7-bit range)",
            "activations": "uint8 per tensor (MinMax calibration)", "calibration_samples": len(feeds), **facts}


def _link_reference(workdir: Path, manifest: dict[str, Any]) -> Path:
    """A view of the fp32 export (hard links: no copy) that survives the graphs being replaced."""
    ref = workdir / REFERENCE_DIR
    ref.mkdir()
    files = [MANIFEST_NAME] + [f for g in manifest["graphs"].values()
                               for f in [g["file"]] + [e["file"] for e in g.get("external_data", [])]]
    files += [f["file"] for f in manifest.get("files", {}).values()]
    for f in files:
        _link_or_copy(workdir / f, ref / f)
    return ref


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def quantize_export(workdir: Path, calibration_data: Path | None, gate_data: Path | None = None,
                    method: str = "dynamic", timesteps: int = 10, seed: int = 0,
                    families: tuple[str, ...] | list[str] | None = None,
                    thresholds: dict[str, float] | None = None, log: Callable[[str], None] = print,
                    tiles_override: dict[str, np.ndarray] | None = None,
                    tile_scale: dict[str, float] | None = None, fc2: str = "auto") -> dict[str, Any]:
    """Turn the fp32 export in ``workdir`` into the int8 export and gate it; returns the manifest.
    Raises ``tm_export.export.ValidationFailed`` when a gate fails (the caller removes ``workdir``).
    A task export (manifest ``task``) is calibrated and gated through ``predict``, any other through
    embed and generate. ``families``: None = DEFAULT_FAMILIES. ``tiles_override``: static
    calibration tiles given as arrays instead of read from a folder. ``tile_scale``: per modality,
    a factor for the tiles (units; task exports). ``fc2``: the SwiGLU down projections in "int8",
    "fp32", or "auto" (int8 unless that fails a gate: then everything is quantised again with them fp32)."""
    from tm_runtime import TerraMindRuntime

    from .export import ValidationFailed

    if fc2 not in INT8_FC2:
        raise QuantizationError(f"--int8-fc2 takes {', '.join(INT8_FC2)}, got {fc2!r}")

    if method not in INT8_METHODS:
        raise QuantizationError(f"int8 method must be one of {', '.join(INT8_METHODS)}, got {method!r}")
    if method == "static" and calibration_data is None and tiles_override is None:
        raise QuantizationError("--int8-method static needs --calibration-data DIR (tiles as DIR/<MODALITY>/*.tif, "
                                "e.g. the TerraMesh examples)")
    gate_dir = gate_data or calibration_data
    if gate_dir is None:
        raise QuantizationError("--precision int8 needs --gate-data DIR or --calibration-data DIR (tiles as "
                                "DIR/<MODALITY>/*.tif, e.g. the TerraMesh examples) for the accuracy gates")
    manifest = json.loads((workdir / MANIFEST_NAME).read_text())
    families = tuple(families or DEFAULT_FAMILIES)
    workload = (task_workload(manifest, seed, tile_scale) if manifest.get("task")
                else foundation_workload(manifest, timesteps, seed))
    chosen = int8_graphs(manifest, families)
    if not chosen:
        raise QuantizationError(f"--int8-graphs {' '.join(families)}: this export has no such graph to quantise "
                                "(a task export has encoder, head and, with TiM, decoders)")
    calibration: dict[str, Any] = {"used": False, "why": "dynamic quantisation computes activation ranges per call"}
    feeds: dict[str, list] = {}
    if method == "static":
        if tiles_override is not None:
            calib, source = tiles_override, {"dir": None, "tiles": "given as arrays"}
        else:
            calib, source = workload.load(calibration_data)
        log(f"calibrating {', '.join(chosen)} on {len(next(iter(calib.values())))} tile(s) from {source['dir']}")
        feeds = collect_calibration(workdir, calib, chosen, workload)
        calibration = {"used": True, **source, "standardized": True, "timesteps": timesteps,
                       "samples_per_graph": {n: len(v) for n, v in feeds.items()}}
    gate_tiles, gate_source = workload.load(gate_dir)
    log(f"int8 ({method}): {', '.join(chosen)}")
    ref_dir = _link_reference(workdir, manifest)
    fp32_graphs = copy.deepcopy(manifest["graphs"])
    # fc2 "auto": int8 first; when a gate fails, once more with fc2 fp32 (the files back from ref_dir).
    attempts = {"auto": [True, False], "int8": [True], "fp32": [False]}[fc2]
    failed_gates: dict[str, Any] = {}
    fc2_error: Exception | None = None
    try:
        # The fp32 figures, once for every attempt; one runtime at a time: the fp32 one's sessions are gone
        # before an int8 one loads its graphs (both at once held two exports, over the export memory bound).
        with step("int8 gates: fp32 reference", graph="-"):
            expected = workload.reference(TerraMindRuntime(ref_dir, verify=False), gate_tiles)
            release_memory(collect=True)
        for attempt, fc2_int8 in enumerate(attempts):
            if attempt:
                manifest["graphs"] = copy.deepcopy(fp32_graphs)
                for name in chosen:
                    target = workdir / manifest["graphs"][name]["file"]
                    target.unlink()
                    _link_or_copy(ref_dir / target.name, target)
            try:
                report = _quantise_and_gate(workdir, ref_dir, manifest, chosen, method, feeds, fc2_int8, workload,
                                            gate_tiles, expected, thresholds, log)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - auto: a failure of the fc2-int8 attempt means fc2 fp32
                if fc2_error is not None:
                    raise exc from fc2_error  # it failed without fc2 int8 too: not fc2's fault; both shown
                if not (fc2_int8 and attempt + 1 < len(attempts)):
                    raise
                fc2_error = exc
                failed_gates = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"fc2 (the SwiGLU down projections) in int8 failed ({failed_gates['error']}): "
                    "quantising again with fc2 in fp32")
                release_memory(collect=True)  # whatever the failed attempt's runtime held
                continue
            report["data"] = gate_source
            manifest["quantization"].update(calibration=calibration, families=list(families))
            if attempt:
                manifest["quantization"]["fc2_int8_failed"] = failed_gates
            manifest["accuracy"] = {"int8_vs_fp32": report}
            manifest.setdefault("validation", {})["accuracy_gates_passed"] = report["passed"]
            (workdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
            log(format_report(report))
            if report["passed"]:
                break
            failed_gates = {n: g["value"] for n, g in report["gates"].items() if not g["passed"]}
            if not any(manifest["graphs"][n]["quantization"]["int8_gated_projections"] for n in chosen):
                break  # no fc2 was int8: another attempt would write the same graphs
            if attempt + 1 < len(attempts):
                log(f"fc2 (the SwiGLU down projections) in int8 failed {', '.join(failed_gates)}: "
                    "quantising again with fc2 in fp32")
        if not report["passed"]:
            failed = [n for n, g in report["gates"].items() if not g["passed"]]
            raise ValidationFailed(f"int8 accuracy gate(s) failed: {', '.join(failed)}")
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)
    return manifest


def _quantise_and_gate(workdir: Path, ref_dir: Path, manifest: dict[str, Any], chosen: list[str], method: str,
                       feeds: dict[str, list], fc2_int8: bool, workload: Any, gate_tiles: dict[str, np.ndarray],
                       expected: Any, thresholds: dict[str, float] | None,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """Quantise the ``chosen`` graphs of ``workdir`` in place (the fp32 files stay in ``ref_dir``),
    record them in ``manifest`` and return the gate report against the fp32 figures ``expected``."""
    from tm_runtime import TerraMindRuntime

    for name, entry in manifest["graphs"].items():
        if name not in chosen:
            entry["precision"] = "fp32"
            continue
        path = workdir / entry["file"]
        tmp = path.with_suffix(".int8.onnx")
        try:
            with step("int8 quantise", graph=name):
                info = quantize_graph(path, tmp, method, feeds.get(name), fc2_int8)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never shipped in the export, whatever happens next
            raise
        os.replace(tmp, path)  # the fp32 file lives on under REFERENCE_DIR (hard link)
        before = (ref_dir / entry["file"]).stat().st_size
        entry.update(precision="int8", sha256=sha256_file(path),
                     quantization={**info, "fp32_sha256": entry["sha256"], "fp32_bytes": before,
                                   "int8_bytes": path.stat().st_size})
        entry["validation_note"] = ("'validation' checked the fp32 graph against PyTorch before quantisation; "
                                    "the int8 graph is checked by the manifest's accuracy gates")
        log(f"  {name}: int8{'' if fc2_int8 else ' (fc2 fp32)'}, {before / 1e6:.1f} MB -> {path.stat().st_size / 1e6:.1f} MB")
    manifest["precision"] = "int8"
    manifest["quantization"] = {
        "method": method, "ops": list(INT8_OPS), "graphs": chosen,
        "fc2": "int8" if fc2_int8 else "fp32",
        "kept_fp32": {n: _why_fp32(n, g, manifest) for n, g in manifest["graphs"].items() if n not in chosen},
    }
    (workdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"accuracy gates on {len(next(iter(gate_tiles.values())))} tile(s) ({'fc2 int8' if fc2_int8 else 'fc2 fp32'})")
    with step("int8 gates: int8", graph="-"):
        report = workload.compare(TerraMindRuntime(workdir, verify=False), expected, thresholds)
    report["reference"] = "the same export's fp32 graphs (validated against PyTorch), ONNX Runtime CPU"
    return report


def _why_fp32(name: str, entry: dict[str, Any], manifest: dict[str, Any]) -> str:
    family = graph_family(name, manifest)
    if family is not None:
        return f"--int8-graphs left out {family}"
    role = entry.get("role")
    if role == "tokenizer_encoder" or keeps_fp32(entry):
        return "FSQ tokenizer encoder: its ids must match fp32 exactly"
    if role == "tokenizer_decoder":
        return "LULC ViT decoder: kept fp32 (small share of generate time)"
    if role == "decoder_queries":
        return "decoder queries: a table lookup, nothing to quantise"
    if role == "decoder_head":
        return "decoder head: the vocabulary projection, whose error lands on the logits unmixed"
    return "embedding graph: gathers and a small patch projection, nothing to gain"
