"""Accuracy gates of a reduced-precision path (bf16 on OpenVINO, an int8 export, ...) against fp32.

Both paths run the same standardised inputs through the runtime's public API:

* ``token_cosine``: per token and per encoder layer, the cosine between the two embeddings; gated
  on the worst layer's minimum and the worst layer's mean;
* ``argmax_agreement``: per generation target, how often the decoder logits pick the same token;
* ``psnr_db``: diffusion targets, images decoded from the *same* tokens (fp32's argmax) and the
  *same* noise by both paths, PSNR over the fp32 image's value range;
* ``lulc_agreement``: the LULC decoder's class map from the same tokens.

Random weights flatter reduced precision: activations of a random network are well spread and have
few outliers, while trained transformers grow outlier channels that int8 scales clip. The gates are
therefore cheap to rerun on real checkpoints: ``tm-bench accuracy EXPORT ...`` (a few seconds for
tiny with small tokenizers; one generate's worth of graph calls per tile otherwise).

Numpy only (plus tifffile to read tiles, imported when tiles are read).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .modalities import COORDS

# Default thresholds (issue 8): a path passes when every figure is at least its threshold.
GATES: dict[str, float] = {"token_cosine_min": 0.99, "token_cosine_mean": 0.999, "argmax_agreement": 0.98,
                           "psnr_db": 30.0, "lulc_agreement": 0.98}
# TerraMesh has S1RTC tiles but no S1GRD: both are Sentinel-1 VV/VH backscatter in dB, so an export
# with S1GRD reads the S1RTC tiles (said in the report).
TILE_FALLBACK = {"S1GRD": "S1RTC"}


def token_cosines(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine per token of (..., D) arrays, in float64."""
    a = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    b = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-30)


def psnr_db(candidate: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of ``candidate`` against ``reference`` over the reference's value range."""
    mse = float(np.mean((candidate.astype(np.float64) - reference.astype(np.float64)) ** 2))
    span = float(reference.max() - reference.min())
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(span ** 2 / mse)) if span > 0 else float("-inf")


def argmax_agreement(candidate: np.ndarray, reference: np.ndarray, axis: int = -1) -> float:
    return float((candidate.argmax(axis) == reference.argmax(axis)).mean())


@dataclass(frozen=True)
class Gate:
    name: str
    value: float
    threshold: float

    @property
    def passed(self) -> bool:
        return bool(self.value >= self.threshold)  # NaN fails

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "threshold": self.threshold, "passed": self.passed}


def load_tiles(data_dir: str | Path, modalities: list[str], limit: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """TerraMesh-layout tiles (``DIR/<MODALITY>/*.tif``, same file names across modalities) as
    {modality: (N, C, H, W) float32} in raw units, and where they came from."""
    import tifffile

    root = Path(data_dir)
    folders = {m: root / m if (root / m).is_dir() or m not in TILE_FALLBACK else root / TILE_FALLBACK[m]
               for m in modalities}
    names = None
    for m, folder in folders.items():
        found = {p.name for p in folder.glob("*.tif")}
        if not found:
            raise FileNotFoundError(f"no tiles for {m} in {folder} (expected {root}/<MODALITY>/*.tif)")
        names = found if names is None else names & found
    names = sorted(names or ())
    if not names:
        raise FileNotFoundError(f"no tile name is present for every one of {', '.join(modalities)} under {root}")
    names = names[:limit] if limit else names
    tiles = {}
    for m, folder in folders.items():
        arrays = []
        for n in names:
            a = tifffile.imread(folder / n).astype(np.float32)
            arrays.append(a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0))
        tiles[m] = np.stack(arrays)
    source = {"dir": str(root), "tiles": names,
              "folders": {m: f.name for m, f in folders.items()},
              "substituted": {m: f.name for m, f in folders.items() if f.name != m}}
    return tiles, source


def accuracy_report(reference: Any, candidate: Any, inputs: Mapping[str, np.ndarray], targets: list[str] | None = None,
                    timesteps: int = 10, seed: int = 0, thresholds: Mapping[str, float] | None = None,
                    batch: int = 1) -> dict[str, Any]:
    """Every gate of ``candidate`` (a TerraMindRuntime on a reduced-precision path) against
    ``reference`` (the same export, or its fp32 twin, in fp32) on ``inputs`` (raw units: both
    standardise them), ``batch`` tiles per call."""
    return compare_to_reference(candidate, reference_outputs(reference, inputs, targets, timesteps, seed, batch),
                                thresholds)


@dataclass
class ReferenceOutputs:
    """What the gates compare a candidate with, computed by the reference runtime alone (so that
    its sessions can be released before the candidate's are created: the int8 export's gates then
    hold one export's graphs in memory, not two)."""
    chunks: list[dict[str, np.ndarray]]
    timesteps: int
    seed: int
    batch: int
    embeddings: list[list[np.ndarray]]  # per chunk, every layer
    # target -> (tokenizer decoder kind, per chunk: (logits, tokens decoded, noise, decoded image))
    targets: dict[str, tuple[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]]
    coords_logits: list[np.ndarray] | None  # per chunk, the first coords token's logits


def reference_outputs(reference: Any, inputs: Mapping[str, np.ndarray], targets: list[str] | None = None,
                      timesteps: int = 10, seed: int = 0, batch: int = 1) -> ReferenceOutputs:
    """Run ``reference`` on every gate's inputs (``inputs`` in raw units, ``batch`` tiles per call)."""
    count = len(next(iter(inputs.values())))
    chunks = [{m: a[i:i + batch] for m, a in inputs.items()} for i in range(0, count, batch)]
    embeddings = [reference.embed(chunk, merge_method=None, layers="all", standardize=True) for chunk in chunks]
    outputs: dict[str, tuple[str, list]] = {}
    names = [t for t in (targets if targets is not None else reference.manifest.targets) if t != "coords"]
    for target in names:
        entry = reference.manifest.targets[target]
        rows = []
        for k, chunk in enumerate(chunks):
            logits = reference.logits(chunk, target, standardize=True)
            grid = reference.grid
            tokens = logits.argmax(-1).reshape(-1, grid, grid)
            noise = np.random.default_rng([seed, k]).standard_normal(
                (tokens.shape[0], entry.channels, reference.manifest.image_size, reference.manifest.image_size),
                dtype=np.float32)
            rows.append((logits, tokens, noise, reference.decode_tokens(target, tokens, timesteps, noise=noise)))
        outputs[target] = (entry.tokenizer_decoder, rows)
    coords_logits = None
    coords = reference.manifest.coords
    if coords is not None and coords.output and (targets is None or "coords" in targets):
        # The causal coords decoder: the logits of its first token ([S_1] given).
        coords_logits = []
        for chunk in chunks:
            start = np.full((len(next(iter(chunk.values()))), 1), COORDS.start_id, dtype=np.int64)
            coords_logits.append(reference.coords_logits(chunk, start, standardize=True))
    return ReferenceOutputs(chunks, timesteps, seed, batch, embeddings, outputs, coords_logits)


def compare_to_reference(candidate: Any, ref: ReferenceOutputs,
                         thresholds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Every gate of ``candidate`` against the reference's outputs ``ref`` (same inputs, tokens and noise)."""
    limits = {**GATES, **(thresholds or {})}
    layers = {}
    for chunk, expected in zip(ref.chunks, ref.embeddings):
        got = candidate.embed(chunk, merge_method=None, layers="all", standardize=True)
        for i, (r, g) in enumerate(zip(expected, got)):
            layers.setdefault(i, []).append(token_cosines(g, r))
    per_layer = [{"layer": i, "min": float(np.concatenate(c).min()), "mean": float(np.concatenate(c).mean())}
                 for i, c in sorted(layers.items())]
    gates = [Gate("token_cosine_min", min(x["min"] for x in per_layer), limits["token_cosine_min"]),
             Gate("token_cosine_mean", min(x["mean"] for x in per_layer), limits["token_cosine_mean"])]
    count = sum(len(next(iter(c.values()))) for c in ref.chunks)
    report: dict[str, Any] = {"tiles": count, "batch": ref.batch, "timesteps": ref.timesteps, "seed": ref.seed,
                              "token_cosine_per_layer": per_layer, "targets": {}}
    for target, (decoder, rows) in ref.targets.items():
        agreements, psnrs, classes = [], [], []
        for chunk, (ref_logits, tokens, noise, ref_img) in zip(ref.chunks, rows):
            agreements.append(argmax_agreement(candidate.logits(chunk, target, standardize=True), ref_logits))
            got_img = candidate.decode_tokens(target, tokens, ref.timesteps, noise=noise)
            if decoder == "vit":
                classes.append(argmax_agreement(got_img, ref_img, axis=1))
            else:
                psnrs.append(psnr_db(got_img, ref_img))
        row: dict[str, Any] = {"argmax_agreement": float(np.mean(agreements))}
        gates.append(Gate(f"argmax_agreement[{target}]", row["argmax_agreement"], limits["argmax_agreement"]))
        if psnrs:
            row["psnr_db_min"] = float(min(psnrs))
            gates.append(Gate(f"psnr_db[{target}]", row["psnr_db_min"], limits["psnr_db"]))
        if classes:
            row["class_agreement"] = float(np.mean(classes))
            gates.append(Gate(f"lulc_agreement[{target}]", row["class_agreement"], limits["lulc_agreement"]))
        report["targets"][target] = row
    if ref.coords_logits is not None:
        agreements = []
        for chunk, expected in zip(ref.chunks, ref.coords_logits):
            start = np.full((len(next(iter(chunk.values()))), 1), COORDS.start_id, dtype=np.int64)
            agreements.append(argmax_agreement(candidate.coords_logits(chunk, start, standardize=True), expected))
        report["targets"]["coords"] = {"argmax_agreement": float(np.mean(agreements))}
        gates.append(Gate("argmax_agreement[coords]", float(np.mean(agreements)), limits["argmax_agreement"]))
    report["gates"] = {g.name: g.to_json() for g in gates}
    report["passed"] = all(g.passed for g in gates)
    return report


def format_report(report: Mapping[str, Any]) -> str:
    steps = f", T={report['timesteps']}" if report.get("timesteps") else ""
    lines = [f"accuracy vs fp32 on {report['tiles']} tile(s){steps}:"]
    for row in report["token_cosine_per_layer"]:
        lines.append(f"  layer {row['layer']:>2}: token cosine min {row['min']:.6f}  mean {row['mean']:.6f}")
    for name, g in report["gates"].items():
        lines.append(f"  {name:<32} {g['value']:>12.6f}  >= {g['threshold']:<8g} {'PASS' if g['passed'] else 'FAIL'}")
    lines.append(f"  all gates: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)
