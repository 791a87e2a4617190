"""Accuracy gates of a reduced-precision path on a fine-tuned task export (an int8 export, OpenVINO
bf16) against the same model in fp32.

What a task model's user receives is ``predict``'s output, so that is what is gated, on real tiles
through the task config's own standardisation (``data:`` means/stds):

* ``token_cosine_min`` / ``token_cosine_mean``: per token, the cosine between the two paths'
  encoder layers that the head reads (after the TiM step, before modalities are merged);
* ``class_agreement`` (segmentation): the share of pixels given the same class;
* ``psnr_db``: PSNR of the logits (regression: the predictions) over the fp32 ones' value range.
  Segmentation needs it too: a random-weight head often gives one class everywhere, and class
  agreement is then 1.0 whatever the error (the report gives the fp32 classes' largest share).

The largest logit difference relative to the fp32 logits' spread is reported, not gated. A TiM
task model runs its TiM step at temperature 0 in both paths (argmax: the same thought unless the
reduced-precision generation picks other tokens, which the gates then see). Random weights flatter
reduced precision (see ``tm_runtime.accuracy``): rerun ``tm-bench accuracy`` on a real checkpoint.

The gate tiles are TerraMesh-layout folders (``DIR/<MODALITY>/*.tif``, every band of the
modality in pretraining order); the task's band subset is picked by name. Tiles whose units differ
from the config's statistics (TerraMesh's Sentinel-2 digital numbers vs a config trained on
reflectance) are refused unless a per-modality ``scale`` converts them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .accuracy import GATES, Gate, load_tiles, psnr_db, token_cosines
from .modalities import get_modality
from .task import TaskInfo, TaskPipeline

if TYPE_CHECKING:
    from .runtime import TerraMindRuntime

TASK_GATES: dict[str, float] = {"token_cosine_min": GATES["token_cosine_min"],
                                "token_cosine_mean": GATES["token_cosine_mean"],
                                "class_agreement": 0.98, "psnr_db": GATES["psnr_db"]}
# Standardised tiles whose median |z| exceeds this are in other units than the config's statistics.
UNITS_LIMIT = 50.0


def dates_needed(info: TaskInfo) -> int | None:
    """How many dates a temporal model's gate inputs carry (None: not temporal)."""
    t = info.temporal
    if t is None:
        return None
    if t.n_timestamps:
        return t.n_timestamps
    if t.subset_lengths:
        return sum(t.subset_lengths)
    return 2 if t.pooling == "diff" else 3


def task_tiles(data_dir: str | Path, info: TaskInfo, limit: int | None = None,
               scale: Mapping[str, float] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The task's raw inputs from TerraMesh-layout tiles: {modality: (N, C, H, W)} with the task's
    bands, or (N, C, T, H, W) for a temporal model (date t of sample i is tile i + t, wrapping:
    real scenes of other places stand in for other dates). ``scale``: per modality, a factor the
    tiles are multiplied by (units); the result is checked against the config's statistics."""
    scale = dict(scale or {})
    unknown = sorted(set(scale) - set(info.modalities))
    if unknown:
        raise ValueError(f"tile scale given for {', '.join(unknown)}, which this task model does not take "
                         f"(it takes {', '.join(info.modalities)})")
    tiles, source = load_tiles(data_dir, list(info.modalities), limit=limit)
    steps = dates_needed(info)
    out = {}
    for name, array in tiles.items():
        pretrained = get_modality(name).bands
        if array.shape[1] != len(pretrained):
            raise ValueError(f"{name}: the tiles in {source['folders'][name]} have {array.shape[1]} bands, expected "
                             f"every {name} band in pretraining order ({len(pretrained)}: {', '.join(pretrained)})")
        array = array[:, [pretrained.index(b) for b in info.bands[name]]] * np.float32(scale.get(name, 1.0))
        _check_units(name, array, info, name in scale)
        if steps is not None:
            array = np.stack([np.roll(array, -t, axis=0) for t in range(steps)], axis=2)
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out, {**source, "scale": scale, "dates": steps}


def _check_units(name: str, array: np.ndarray, info: TaskInfo, scaled: bool) -> None:
    stats = (info.standardization or {}).get(name)
    if stats is None:
        return
    mean, std = (s if s.ndim == 1 else s.mean(axis=1) for s in stats)
    z = np.median(np.abs((array - mean[None, :, None, None]) / std[None, :, None, None]))
    if z > UNITS_LIMIT:
        hint = "" if scaled else (f"; give a scale (tm-export --tile-scale {name}=FACTOR, e.g. 0.0001 for Sentinel-2 "
                                  "digital numbers against reflectance statistics)")
        raise ValueError(f"{name}: the tiles are not in the units of the task config's statistics (median |z| "
                         f"{z:.0f} after standardising, expected about 1; tile mean {float(array.mean()):.4g} vs "
                         f"config mean {float(mean.mean()):.4g}){hint}")


@dataclass
class TaskReference:
    """The fp32 path's encoder layers and logits per tile (computed before the candidate loads)."""
    chunks: list[dict[str, np.ndarray]]
    layers: list[list[np.ndarray]]
    logits: list[np.ndarray]
    seed: int


def _run(rt: "TerraMindRuntime", chunk: Mapping[str, np.ndarray], seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The encoder layers the head reads and the logits, for one chunk (TiM at temperature 0): one
    pass, as ``predict`` runs it."""
    pipeline = TaskPipeline(rt, rt.task)
    tim = pipeline.tim_options(0.0 if rt.tim is not None else None, None, None, None, seed)
    arrays, batch = pipeline.prepare(chunk, standardize=True, check_finite=True)
    layers, logits = pipeline.forward(arrays, batch, tim)
    return layers, pipeline.finish(logits, "logits")


def task_reference(reference: "TerraMindRuntime", inputs: Mapping[str, np.ndarray], seed: int = 0) -> TaskReference:
    """Run the fp32 ``reference`` on every tile of ``inputs`` (raw units), one tile per call."""
    if reference.task is None:
        raise ValueError("this export has no task section: its gates are tm_runtime.accuracy's")
    count = len(next(iter(inputs.values())))
    chunks = [{m: a[i:i + 1] for m, a in inputs.items()} for i in range(count)]
    runs = [_run(reference, chunk, seed) for chunk in chunks]
    return TaskReference(chunks, [r[0] for r in runs], [r[1] for r in runs], seed)


def compare_task(candidate: "TerraMindRuntime", ref: TaskReference,
                 thresholds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Every task gate of ``candidate`` against ``ref`` (same tiles, same TiM seed)."""
    limits = {**TASK_GATES, **(thresholds or {})}
    info: TaskInfo = candidate.task
    cosines: dict[int, list[np.ndarray]] = {}
    agreements, psnrs, spreads, counts = [], [], [], 0
    for chunk, expected_layers, expected in zip(ref.chunks, ref.layers, ref.logits):
        layers, logits = _run(candidate, chunk, ref.seed)
        for layer, got, want in zip(info.layers, layers, expected_layers):
            cosines.setdefault(layer, []).append(token_cosines(got, want))
        spreads.append(float(np.abs(logits - expected).max() / max(float(expected.std()), 1e-30)))
        psnrs.append(psnr_db(logits, expected))
        if info.type == "segmentation":
            agreements.append(float((logits.argmax(1) == expected.argmax(1)).mean()))
            counts = counts + np.bincount(expected.argmax(1).ravel(), minlength=expected.shape[1])
    per_layer = [{"layer": i, "min": float(np.concatenate(c).min()), "mean": float(np.concatenate(c).mean())}
                 for i, c in sorted(cosines.items())]
    gates = [Gate("token_cosine_min", min(x["min"] for x in per_layer), limits["token_cosine_min"]),
             Gate("token_cosine_mean", min(x["mean"] for x in per_layer), limits["token_cosine_mean"])]
    task: dict[str, Any] = {"type": info.type, "logits_max_diff_over_std": max(spreads)}
    if agreements:
        task["class_agreement"] = float(np.mean(agreements))
        task["class_agreement_min_tile"] = float(min(agreements))
        task["largest_class_share"] = float(counts.max() / counts.sum())
        gates.append(Gate("class_agreement", task["class_agreement"], limits["class_agreement"]))
    task["psnr_db_min"] = float(min(psnrs))
    gates.append(Gate("psnr_db[logits]" if info.type == "segmentation" else "psnr_db", task["psnr_db_min"],
                      limits["psnr_db"]))
    return {"tiles": len(ref.chunks), "batch": 1, "timesteps": None, "seed": ref.seed,
            "token_cosine_per_layer": per_layer, "task": task,
            "gates": {g.name: g.to_json() for g in gates}, "passed": all(g.passed for g in gates)}


def task_accuracy_report(reference: "TerraMindRuntime", candidate: "TerraMindRuntime",
                         inputs: Mapping[str, np.ndarray], seed: int = 0,
                         thresholds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Every task gate of ``candidate`` against ``reference`` (fp32) on ``inputs`` (raw units)."""
    return compare_task(candidate, task_reference(reference, inputs, seed), thresholds)
