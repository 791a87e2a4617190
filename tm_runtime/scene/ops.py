"""What runs on a batch of windows: embed, predict, generate, through the runtime's public API only.

An op knows the inputs it needs (band names, fill values), the outputs it accumulates (channels,
band descriptions, how they are written) and how a batch of windows turns into per-window
outputs in output units. Pure numpy; the runtime object can be a ``TerraMindRuntime`` or anything
with the same public methods.

Blending happens on what the model returns, and the written product is derived afterwards, as
terratorch does: segmentation blends logits, then takes the argmax (classes) or the softmax
(probabilities); generated LULC blends the decoder's class logits, then takes the argmax.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..modalities import get_modality, get_target, is_coords
from .specs import LULC_CLASS_NAMES, LULC_COLORS, ModalitySpec, class_colors
from .tiling import Window

PATCH = 16


@dataclass(frozen=True)
class OutputSpec:
    """One output map: what is accumulated (``channels``) and how it is written."""

    name: str
    channels: int
    bands: tuple[str, ...]  # descriptions of the written bands
    kind: str  # "classes" (argmax -> uint8), "probabilities" (softmax), "values" (as blended)
    dtype: str = "float32"
    class_names: tuple[str, ...] | None = None
    colors: tuple[tuple[int, int, int], ...] | None = None
    quicklook: str = "values"  # s2 | s1 | dem | ndvi | classes | embedding | values

    @property
    def count(self) -> int:
        return 1 if self.kind == "classes" else self.channels

    @property
    def nodata(self) -> float:
        return 255 if self.kind == "classes" else float("nan")

    def finalize(self, values: np.ndarray, valid: np.ndarray, rows: int = 32) -> np.ndarray:
        """Blended (K, n, W) -> the written (count, n, W) array, nodata where not ``valid``; done
        ``rows`` rows at a time so that temporaries (argmax indices, exponentials) stay small."""
        out = np.empty((self.count, *values.shape[1:]), self.dtype)
        for r in range(0, values.shape[1], rows):
            part = values[:, r:r + rows]
            if self.kind == "classes":
                done = part.argmax(axis=0)[None]
            elif self.kind == "probabilities":
                shifted = part - part.max(axis=0, keepdims=True)
                np.exp(shifted, out=shifted)
                done = shifted / shifted.sum(axis=0, keepdims=True)
            else:
                done = part
            out[:, r:r + rows] = done
        out[:, ~valid] = self.nodata
        return out


def _modality_spec(rt, name: str, task_bands: Mapping[str, Sequence[str]] | None = None, standardize: bool = True,
                   means: Mapping[str, Sequence[float]] | None = None) -> ModalitySpec:
    """Band names, the complete band list and the nodata fill of one input, from the export.

    The fill is what standardises to zero: the mean the runtime subtracts (``means``: a task
    config's statistics; else the export's pretraining means), or 0 for standardised inputs."""
    entry = getattr(getattr(rt, "manifest", None), "modalities", {}).get(name)
    table = get_modality(name)
    bands = tuple(task_bands[name]) if task_bands and name in task_bands else tuple(
        entry.bands if entry is not None else table.bands)
    if not standardize:
        return ModalitySpec(name, bands, table.bands, tuple(0.0 for _ in bands))
    if means is not None and name in means and np.shape(means[name]) == (len(bands),):
        return ModalitySpec(name, bands, table.bands, tuple(float(v) for v in means[name]))
    if means is not None and name in means and np.ndim(means[name]) == 2 and np.shape(means[name])[0] == len(bands):
        per_date = np.asarray(means[name], dtype=float)  # (C, T): a temporal model's statistics per date
        return ModalitySpec(name, bands, table.bands, tuple(float(v) for v in per_date.mean(axis=1)),
                            tuple(tuple(float(v) for v in per_date[:, t]) for t in range(per_date.shape[1])))
    by_band = dict(zip(table.bands, table.mean))
    if entry is not None:
        by_band.update(zip(entry.bands, entry.mean))
    return ModalitySpec(name, bands, table.bands, tuple(float(by_band.get(b, 0.0)) for b in bands))


def window_size(rt) -> int:
    manifest = getattr(rt, "manifest", None)
    if manifest is not None:
        return int(manifest.image_size)
    return int(getattr(getattr(rt, "task", None), "image_size", 224))


def to_runtime_inputs(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Class maps (LULC) go to the runtime as integer ids, which it one-hot encodes."""
    return {name: (a.astype(np.int64) if name == "LULC" else a) for name, a in arrays.items()}


def window_seed(seed: int, window: Window) -> int:
    """A window's own seed: from the scene seed and the window's place in the window grid, so it
    does not depend on batching, order or which worker runs it."""
    return int(np.random.SeedSequence([int(seed), *window.grid]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class SceneOp:
    """Base: ``scale`` output pixels per input pixel side; ``inputs``: modality -> spec."""

    scale: int = field(init=False, default=1)

    def input_specs(self, rt, names: Sequence[str]) -> dict:
        raise NotImplementedError

    def outputs(self, rt) -> list[OutputSpec]:
        raise NotImplementedError

    def run(self, rt, arrays: dict[str, np.ndarray], windows: list[Window]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def default_tiling(self, rt) -> dict:
        """Tiling settings this op's model asks for (terratorch's names), before the caller's."""
        return {}

    def check_dates(self, rt, dates: Mapping[str, int]) -> None:
        """``dates``: how many dates (rasters) each input modality was given. One, unless the op
        runs a multi-temporal model."""
        several = {name: t for name, t in dates.items() if t != 1}
        if several:
            command = type(self).__name__.removesuffix("Op").lower()
            why = ("this task model is not multi-temporal" if command == "predict"
                   else "several dates are for multi-temporal task models: tm-run predict")
            raise ValueError(f"{command} takes one raster per modality; "
                             + ", ".join(f"{n} was given {t} dates" for n, t in several.items()) + f" ({why})")

    def describe(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _check_exported(rt, names: Sequence[str]) -> list[str]:
    exported = list(getattr(rt, "modalities", []))
    canon = []
    for name in names:
        if is_coords(name):
            raise ValueError("coords is not a raster: scenes take image modalities only")
        canonical = get_modality(name).name
        if exported and canonical not in exported:
            raise ValueError(f"unknown modality {name!r} for this export; exported modalities: {', '.join(exported)}")
        canon.append(canonical)
    return canon


@dataclass
class EmbedOp(SceneOp):
    """A coarse map: one pixel per 16 x 16 patch, the merged last-layer (or ``layer``) token."""

    merge_method: str = "mean"
    layer: int = -1
    standardize: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.scale = PATCH
        if self.merge_method not in ("mean", "max", "concat"):
            raise ValueError(f"embed: merge_method must be 'mean', 'max' or 'concat' for a map, got {self.merge_method!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"embed: dtype must be float32 or float16, got {self.dtype!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)):
            raise ValueError(f"embed: layer must be one integer for a map, got {self.layer!r}")

    def input_specs(self, rt, names):
        return {n: _modality_spec(rt, n, standardize=self.standardize) for n in _check_exported(rt, names)}

    def outputs(self, rt) -> list[OutputSpec]:
        dim = int(rt.manifest.model["dim"])
        if self.merge_method == "concat":
            names = list(rt.manifest.modalities)
            bands = tuple(f"{m}_{i:04d}" for m in names for i in range(dim))
        else:
            bands = tuple(f"embedding_{i:04d}" for i in range(dim))
        return [OutputSpec("embedding", len(bands), bands, "values", self.dtype, quicklook="embedding")]

    def run(self, rt, arrays, windows):
        emb = rt.embed(to_runtime_inputs(arrays), merge_method=self.merge_method, layers=int(self.layer),
                       standardize=self.standardize)
        batch, tokens, dim = emb.shape
        side = int(round(tokens ** 0.5))
        if side * side != tokens:
            raise ValueError(f"embed: expected a square grid of patch tokens, got {tokens}")
        return {"embedding": np.ascontiguousarray(emb.reshape(batch, side, side, dim).transpose(0, 3, 1, 2))}


@dataclass
class PredictOp(SceneOp):
    """A fine-tuned task model (``rt.predict``, ``rt.task``): logits blended, then classes or
    probabilities; regression models write their blended values.

    TiM task models sample their TiM tokens: each window with its own seed (``window_seed``), one
    call per window, as ``GenerateOp``; with ``tim_temperature=0`` (argmax) windows are batched.
    ``seed=None`` draws a scene seed (reported)."""

    output: str | None = None  # classes | probabilities | logits (default: classes, or values for regression)
    standardize: bool = True
    seed: int | None = None
    tim_temperature: float | None = None
    tim_top_p: float | None = None
    tim_top_k: int | None = None
    _dates: dict[str, int] | None = field(init=False, default=None, repr=False)  # temporal models: dates per modality

    def _tim_options(self) -> dict:
        return {k: v for k, v in (("tim_temperature", self.tim_temperature), ("tim_top_p", self.tim_top_p),
                                  ("tim_top_k", self.tim_top_k)) if v is not None}

    def _task(self, rt):
        task = getattr(rt, "task", None)
        if task is None:
            raise ValueError("predict needs a fine-tuned task export (rt.task is None); export one with "
                             "tm-export --task-config CONFIG.yaml --ckpt CHECKPOINT")
        return task

    def _regression(self, rt) -> bool:
        return "regression" in str(getattr(self._task(rt), "type", "")).lower()

    def _kind(self, rt) -> str:
        regression = self._regression(rt)
        output = self.output or ("logits" if regression else "classes")
        if output not in ("classes", "probabilities", "logits"):
            raise ValueError(f"predict: output must be 'classes', 'probabilities' or 'logits', got {output!r}")
        if regression and output != "logits":
            raise ValueError(f"predict: a regression task writes its values; use output='logits', not {output!r}")
        return {"classes": "classes", "probabilities": "probabilities", "logits": "values"}[output]

    def default_tiling(self, rt) -> dict:
        """The task config's ``tiled_inference_parameters`` (what ``terratorch predict`` would use)."""
        return dict(getattr(self._task(rt), "tiled_inference", None) or {})

    def input_specs(self, rt, names):
        task = self._task(rt)
        wanted = [get_modality(m).name for m in task.modalities]
        given = [get_modality(m).name for m in names]
        merge = getattr(task, "merge_method", "mean")
        unknown = [m for m in given if m not in wanted]
        if unknown or not given or (merge == "concat" and sorted(wanted) != sorted(given)):
            need = "all of" if merge == "concat" else "one or more of"
            raise ValueError(f"predict: this task model takes {need} {', '.join(wanted)} (merge_method {merge!r}), "
                             f"got inputs {', '.join(given) or 'none'}")
        if getattr(rt, "tim", None) is None:
            if self._tim_options():
                raise ValueError(f"predict: {', '.join(self._tim_options())} given, but this task model has no TiM "
                                 "backbone")
        elif self.seed is None:
            self.seed = int(np.random.SeedSequence().generate_state(1)[0])  # drawn once, reported
        stats = getattr(task, "standardization", None) or {}
        means = {m: mean for m, (mean, _) in stats.items()}
        return {n: _modality_spec(rt, n, getattr(task, "bands", None), self.standardize, means) for n in given}

    def check_dates(self, rt, dates: Mapping[str, int]) -> None:
        """A multi-temporal task model takes the same number of dates for every modality, as its
        temporal pooling allows (the runtime's own rules); any other model one date."""
        task = self._task(rt)
        temporal = getattr(task, "temporal", None)
        self._dates = None
        if temporal is None:
            return super().check_dates(rt, dates)
        steps = None
        stats = (getattr(task, "standardization", None) or {}) if self.standardize else {}
        for name, t in dates.items():
            steps = temporal.check_dates(name, t, steps)
            mean = stats.get(name, (None, None))[0]
            if mean is not None and np.ndim(mean) == 2 and np.shape(mean)[1] != t:
                raise ValueError(f"{name}: {t} dates, but the task config's statistics are per date, for "
                                 f"{np.shape(mean)[1]} dates")
        self._dates = dict(dates)

    def outputs(self, rt) -> list[OutputSpec]:
        task = self._task(rt)
        kind = self._kind(rt)
        k = int(getattr(task, "num_channels", None) or task.num_classes)
        default = "output" if self._regression(rt) else "class"
        names = tuple(str(n) for n in (getattr(task, "class_names", None) or [f"{default}_{i}" for i in range(k)]))
        if kind == "classes" and k > 255:
            raise ValueError(f"predict: {k} classes do not fit a uint8 class map (at most 255; 255 is nodata)")
        return [OutputSpec("prediction", k, ("classes",) if kind == "classes" else names, kind,
                           "uint8" if kind == "classes" else "float32", names,
                           tuple(getattr(task, "colors", None) or class_colors(k)),
                           "classes" if kind == "classes" else "values")]

    def run(self, rt, arrays, windows):
        inputs = to_runtime_inputs(arrays)
        dates = self._dates
        if dates is not None:  # (B, C * T, H, W), band-major (DateStackReader) -> (B, C, T, H, W)
            inputs = {m: a.reshape(a.shape[0], -1, dates[m], *a.shape[2:]) for m, a in inputs.items()}
        tim = getattr(rt, "tim", None)
        temperature = self.tim_temperature if self.tim_temperature is not None else getattr(tim, "temperature", 0)
        if tim is None or temperature == 0:
            logits = rt.predict(inputs, standardize=self.standardize, output="logits", **self._tim_options())
            return {"prediction": np.asarray(logits, dtype=np.float32)}
        parts = [rt.predict({m: a[i:i + 1] for m, a in inputs.items()}, standardize=self.standardize, output="logits",
                            seed=window_seed(self.seed, window), **self._tim_options())
                 for i, window in enumerate(windows)]
        return {"prediction": np.concatenate(parts, axis=0).astype(np.float32, copy=False)}


_QUICKLOOK = {"S2L2A": "s2", "S1GRD": "s1", "S1RTC": "s1", "DEM": "dem", "NDVI": "ndvi", "LULC": "classes"}


@dataclass
class GenerateOp(SceneOp):
    """Generated modalities in physical units; each window with its own seed (see ``window_seed``).

    ``rt.generate`` draws a whole batch from one Generator, so batching windows in one call would
    tie a window's draws to its batch-mates: windows are generated one by one within a batch.
    """

    output_modalities: Sequence[str] = ()
    timesteps: int = 10
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.8
    top_k: int = 0
    chained: bool = True

    def __post_init__(self) -> None:
        if not self.output_modalities:
            raise ValueError("generate: name at least one output modality, e.g. --output S1GRD=s1.tif")
        names = []
        for m in self.output_modalities:
            if is_coords(m):
                raise ValueError("generate: coords is not a raster output; scenes write image modalities")
            names.append(get_target(m).name)
        if len(set(names)) != len(names):
            raise ValueError(f"generate: an output modality is listed twice: {list(self.output_modalities)}")
        self.output_modalities = tuple(names)

    def input_specs(self, rt, names):
        specs = {n: _modality_spec(rt, n) for n in _check_exported(rt, names)}
        clash = [n for n in self.output_modalities if n in specs]
        if clash:
            raise ValueError(f"generate: {', '.join(clash)} is both an input and an output")
        return specs

    def outputs(self, rt) -> list[OutputSpec]:
        exported = list(getattr(rt, "output_modalities", []))
        specs = []
        for name in self.output_modalities:
            if name not in exported:
                raise ValueError(f"generate: output modality {name} was not exported (exported targets: "
                                 f"{', '.join(exported) or 'none'}); re-export with --output-modalities {name}")
            target = rt.manifest.targets[name]
            if name == "LULC":
                specs.append(OutputSpec(name, target.channels, ("classes",), "classes", "uint8", LULC_CLASS_NAMES,
                                        LULC_COLORS, "classes"))
            else:
                bands = get_modality(name).bands if name != "NDVI" else ("NDVI",)
                if len(bands) != target.channels:
                    bands = tuple(f"{name}_{i}" for i in range(target.channels))
                specs.append(OutputSpec(name, target.channels, tuple(bands), "values", "float32",
                                        quicklook=_QUICKLOOK.get(name, "values")))
        return specs

    def run(self, rt, arrays, windows):
        inputs = to_runtime_inputs(arrays)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_modalities}
        for i, window in enumerate(windows):
            out = rt.generate({m: a[i:i + 1] for m, a in inputs.items()}, list(self.output_modalities),
                              timesteps=self.timesteps, seed=window_seed(self.seed, window),
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, standardize=True,
                              chained=self.chained)
            for name in self.output_modalities:
                parts[name].append(np.asarray(out[name], dtype=np.float32))
        return {name: np.concatenate(p, axis=0) for name, p in parts.items()}

