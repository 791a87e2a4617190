"""``predict`` for fine-tuned task models (exports made with ``tm-export --task-config``).

A small pipeline over the runtime's public pieces, in the order terratorch's PixelWiseModel runs:

    raw arrays -> checks -> the config's standardisation (``data:`` means/stds)
      -> [temporal: (B, C, T, H, W) -> B*T images] -> patch-embedding graphs -> token parts
      -> encoder graph (the selected layers) -> merge modalities (numpy) -> [pool dates (numpy)]
      -> head graph (necks + decoder + head) -> logits | probabilities | classes

(The patch embeddings and the encoder run as ``tm_runtime.embed_chain``'s chain: one model on OpenVINO.)

A Thinking-in-Modalities task model adds the generated modalities' token parts in
``token_parts`` (``tm_runtime.tim``: the frozen generation model, whose graphs differ from the
fine-tuned ones where fine-tuning changed the weights); ``task.encoder_graph`` is the fine-tuned
encoder.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .inputs import resolve_names
from .embed_chain import embed_chain, run_embed_chain
from .merge import merge_tokens
from .tim import TimOptions, tim_parts

if TYPE_CHECKING:
    from .runtime import TerraMindRuntime

OUTPUTS = ("logits", "probabilities", "classes")
TASK_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TemporalInfo:
    """terratorch's TemporalWrapper: dates run as a batch through the backbone, then are pooled."""

    pooling: str  # mean | max | concat | diff
    n_timestamps: int | None
    subset_lengths: tuple[int, ...] | None

    def check_dates(self, name: str, t: int, steps: int | None = None) -> int:
        """Raise ValueError unless ``t`` dates of modality ``name`` suit this model (``steps``: the
        dates another modality has, if any); returns ``t``."""
        if steps is not None and t != steps:
            raise ValueError(f"{name}: {t} dates, but another modality has {steps}; all need the same number")
        if self.pooling == "concat" and t != self.n_timestamps:
            raise ValueError(f"{name}: {t} dates, but this model concatenates exactly {self.n_timestamps} "
                             "(temporal pooling 'concat', n_timestamps)")
        if self.subset_lengths and sum(self.subset_lengths) != t:
            raise ValueError(f"{name}: {t} dates, but the model's subset_lengths {list(self.subset_lengths)} "
                             f"sum to {sum(self.subset_lengths)}")
        pooled = len(self.subset_lengths) if self.subset_lengths else t
        if self.pooling == "diff" and pooled != 2:
            raise ValueError(f"{name}: 'diff' pooling needs exactly 2 dates (after subsets), got {pooled}")
        return t


@dataclass(frozen=True)
class TaskInfo:
    """What a fine-tuned export predicts and how (``rt.task``)."""

    type: str  # "segmentation" | "regression"
    num_classes: int | None  # segmentation; None for regression
    num_outputs: int | None  # regression; None for segmentation
    class_names: tuple[str, ...] | None
    modalities: tuple[str, ...]
    bands: dict[str, tuple[str, ...]]
    merge_method: str
    layers: tuple[int, ...]  # encoder layers feeding the head
    standardization: dict[str, tuple[np.ndarray, np.ndarray]] | None  # per modality (mean, std)
    standardization_source: str | None
    temporal: TemporalInfo | None
    output_shape: tuple[int, ...]  # (K, H, W)
    encoder_graph: str
    head_graph: str
    head_inputs: tuple[str, ...]
    head_output: str
    tim: dict[str, Any] | None
    tiled_inference: dict[str, Any] | None
    task_class: str

    @property
    def num_channels(self) -> int:
        """K, the channels of ``predict``'s logits: classes or regression outputs."""
        return self.output_shape[0]

    @classmethod
    def from_manifest(cls, task: dict[str, Any]) -> "TaskInfo":
        version = task.get("format_version")
        if version != TASK_FORMAT_VERSION:
            raise ValueError(f"task section format version {version} is not supported by this runtime "
                             f"(it reads {TASK_FORMAT_VERSION}); re-export or upgrade tm-deploy")
        stats = task.get("standardization")
        standardization = None
        if stats:
            standardization = {m: (np.asarray(s["mean"], dtype=np.float32), np.asarray(s["std"], dtype=np.float32))
                               for m, s in stats["modalities"].items()}
        temporal = task.get("temporal")
        return cls(
            type=task["type"], num_classes=task.get("num_classes"), num_outputs=task.get("num_outputs"),
            class_names=tuple(task["class_names"]) if task.get("class_names") else None,
            modalities=tuple(task["modalities"]), bands={m: tuple(b) for m, b in task["bands"].items()},
            merge_method=task["merge_method"], layers=tuple(task["layers"]),
            standardization=standardization, standardization_source=stats["source"] if stats else None,
            temporal=TemporalInfo(temporal["pooling"], temporal.get("n_timestamps"),
                                  tuple(temporal["subset_lengths"]) if temporal.get("subset_lengths") else None)
            if temporal else None,
            output_shape=tuple(task["output_shape"]), encoder_graph=task["encoder_graph"],
            head_graph=task["head_graph"], head_inputs=tuple(task["head_inputs"]), head_output=task["head_output"],
            tim=task.get("tim"), tiled_inference=task.get("tiled_inference"), task_class=task.get("task_class", ""),
        )


def pool_dates(tokens: np.ndarray, batch: int, temporal: TemporalInfo) -> np.ndarray:
    """(B*T, N, C) tokens, dates fastest -> (B, N, C') pooled as terratorch's TemporalWrapper does;
    concat lays the dates out along channels, date-major (channel t*C + c)."""
    steps = tokens.shape[0] // batch
    x = tokens.reshape(batch, steps, *tokens.shape[1:])
    if temporal.subset_lengths:
        bounds = np.cumsum((0,) + temporal.subset_lengths)
        x = np.stack([x[:, a:b].mean(axis=1, dtype=np.float32) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
    if temporal.pooling == "mean":
        return x.mean(axis=1, dtype=np.float32)
    if temporal.pooling == "max":
        return x.max(axis=1)
    if temporal.pooling == "diff":
        return x[:, 0] - x[:, 1]
    if temporal.pooling == "concat":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(batch, x.shape[2], -1))
    raise ValueError(f"unknown temporal pooling {temporal.pooling!r}")


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


class TaskPipeline:
    """``predict`` over a ``TerraMindRuntime`` whose export has a ``task`` section."""

    def __init__(self, runtime: "TerraMindRuntime", info: TaskInfo) -> None:
        self.rt = runtime
        self.info = info

    def predict(self, inputs: Mapping[str, np.ndarray], standardize: bool = True, output: str = "logits",
                check_finite: bool = True, tim_temperature: float | None = None, tim_top_p: float | None = None,
                tim_top_k: int | None = None, tim_decoding_steps: int | None = None,
                seed: int | None = None) -> np.ndarray:
        """The task model's output for ``inputs``, as terratorch's ``task(inputs).output``.

        ``inputs``: {modality: (B, C, H, W)} — temporal models (B, C, T, H, W), as terratorch takes
        them — raw values as read from files when ``standardize`` (the config's ``data:`` means and
        stds are applied; integer arrays are accepted then), already standardised otherwise.
        ``output``: "logits" (B, K, H, W) float32; "probabilities" (softmax over K) float32;
        "classes" (B, H, W) uint8 (uint16 beyond 256 classes). Regression models give "logits"
        only: their (B, K, H, W) predictions.
        TiM task models (``rt.task.tim``) first generate their TiM modalities' tokens, as
        ``embed`` does: ``tim_temperature``, ``tim_top_p``, ``tim_top_k``, ``tim_decoding_steps``
        (None: the config's backbone_tim_* values, else upstream's defaults) and ``seed`` (None:
        fresh entropy) steer the sampling; temperature 0 is argmax, deterministic.
        """
        tim = self.tim_options(tim_temperature, tim_top_p, tim_top_k, tim_decoding_steps, seed)
        self.check_output(output)
        arrays, batch = self.prepare(inputs, standardize, check_finite)
        return self.finish(self.forward(arrays, batch, tim)[1], output)

    def forward(self, arrays: dict[str, np.ndarray], batch: int,
                tim: TimOptions | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """Prepared inputs (``prepare``) -> the encoder layers the head reads (before merging and
        pooling, as the encoder graph gives them) and the head's raw output."""
        outputs = self.encoder_outputs
        chain = None if self.rt.tim else embed_chain(self.rt.manifest, list(arrays), outputs, self.info.encoder_graph)
        if chain is not None:  # embed's chain (one model on OpenVINO); its context embeddings are not needed
            layers = run_embed_chain(self.rt.backend, chain, arrays, outputs)[:-1]
            layout = chain.layout
        else:
            parts = self.token_parts(arrays, tim)
            layers = self.encode(np.concatenate([t for _, t, _ in parts], axis=1))
            layout = [(name, t.shape[1], is_image) for name, t, is_image in parts]
        # Generated TiM modalities are never missing: only absent inputs are (concat fills them).
        missing = len(self.info.modalities) - len(arrays)
        features = []
        for layer in layers:
            merged = merge_tokens(layer, layout, self.info.merge_method, missing)
            features.append(pool_dates(merged, batch, self.info.temporal) if self.info.temporal else merged)
        return layers, self.head(features)

    # -- steps -------------------------------------------------------------------------------
    def check_output(self, output: str) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
        if self.info.type != "segmentation" and output != "logits":
            raise ValueError(f"output={output!r} is for segmentation; this {self.info.type} model gives its "
                             "predictions with output='logits'")

    def prepare(self, inputs: Mapping[str, np.ndarray], standardize: bool,
                check_finite: bool) -> tuple[dict[str, np.ndarray], int]:
        """Checked, standardised float32 images by modality, dates flattened into the batch
        ((B*T, C, H, W), date fastest, as terratorch flattens them); and B."""
        info = self.info
        available = {m: self.rt.manifest.modalities[m] for m in info.modalities}
        resolved = resolve_names(inputs, available, "the task config's backbone_modalities (and a model "
                                                    "fine-tuned on it)")
        if info.merge_method == "concat":
            absent = [m for m in info.modalities if m not in resolved]
            if absent:
                raise ValueError(f"this model merges modalities with 'concat' and needs all of "
                                 f"{', '.join(info.modalities)}; missing: {', '.join(absent)}")
            resolved = {m: resolved[m] for m in info.modalities}  # concat's channel order is the config's
        if standardize and info.standardization is None:
            raise ValueError("standardize=True, but this export has no standardisation: the task config's data: "
                             "section gives no means/stds. Pass standardised inputs with standardize=False, or "
                             "add means/stds to the config's data: section and re-export")
        arrays: dict[str, np.ndarray] = {}
        steps = None
        for name, value in resolved.items():
            array = self._check_array(name, value, standardize)
            if info.temporal is not None:
                steps = self._check_dates(name, array, steps)
            if standardize:
                array = self._standardize(name, array)
            if info.temporal is not None:
                b, c, t, h, w = array.shape
                array = array.transpose(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
            arrays[name] = array
        checked = self.rt.prepare(arrays, standardize=False, check_finite=check_finite)
        batch = next(iter(checked.values())).shape[0] // (steps or 1)
        return checked, batch

    def tim_options(self, temperature: float | None, top_p: float | None, top_k: int | None,
                    decoding_steps: int | None, seed: int | None) -> TimOptions | None:
        """The TiM step's sampling for this call; None for a model without TiM (which refuses
        ``tim_*`` arguments and ignores ``seed``, as ``embed`` does)."""
        if self.rt.tim is None:
            given = {"tim_temperature": temperature, "tim_top_p": top_p, "tim_top_k": top_k,
                     "tim_decoding_steps": decoding_steps}
            named = [k for k, v in given.items() if v is not None]
            if named:
                raise TypeError(f"predict() got {', '.join(named)}, but this task model has no TiM backbone "
                                "(its config's backbone is not a terramind_v1_<size>_tim)")
            return None
        return TimOptions.resolve(self.rt.tim, temperature, top_p, top_k, decoding_steps, seed)

    def token_parts(self, arrays: dict[str, np.ndarray],
                    tim: TimOptions | None = None) -> list[tuple[str, np.ndarray, bool]]:
        """(name, tokens (B', N, D), is an image modality) per encoder input part, in order: the
        inputs, then (TiM) the generated modalities, as terratorch's TerraMindTiM lays them out."""
        if self.rt.tim is None:
            return [(name, self.rt.patch_embed(name, image), True) for name, image in arrays.items()]
        order = list(arrays)
        parts = self.rt._input_parts(arrays, None, order)
        # The frozen generation model writes the TiM modalities' tokens (its own graphs where the
        # fine-tuned weights differ: manifest tim.generation_graphs); the fine-tuned encoder reads them.
        thought = tim_parts(self.rt, self.rt.tim, arrays, None, order, parts, tim)
        return [(name, tokens, True) for name, tokens, _ in parts + thought]

    @property
    def encoder_outputs(self) -> list[str]:
        """The encoder graph's outputs of the layers the head reads."""
        names = self.rt.manifest.data["encoder"]["outputs"]
        return [names[i] for i in self.info.layers]

    def encode(self, tokens: np.ndarray) -> list[np.ndarray]:
        """The selected layers of the task's (fine-tuned) encoder graph."""
        return self.rt.backend.run(self.info.encoder_graph, {"tokens": tokens}, self.encoder_outputs)

    def head(self, features: list[np.ndarray]) -> np.ndarray:
        feeds = {name: np.ascontiguousarray(f, dtype=np.float32) for name, f in zip(self.info.head_inputs, features)}
        return self.rt.backend.run(self.info.head_graph, feeds, [self.info.head_output])[0]

    def finish(self, logits: np.ndarray, output: str) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float32)
        if output == "logits":
            return logits
        if output == "probabilities":
            return softmax(logits, axis=1)
        dtype = np.uint8 if logits.shape[1] <= 256 else np.uint16
        return logits.argmax(axis=1).astype(dtype)

    # -- checks ------------------------------------------------------------------------------
    def _check_array(self, name: str, value: object, standardize: bool) -> np.ndarray:
        info = self.info
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
        integer = np.issubdtype(value.dtype, np.integer)
        if not (np.issubdtype(value.dtype, np.floating) or integer and standardize):
            raise TypeError(f"{name}: expected a floating-point array{' (or integers with standardize=True)' if not standardize else ''}, got dtype {value.dtype}")
        bands = info.bands[name]
        if info.temporal is not None:
            if value.ndim != 5:
                raise ValueError(f"{name}: this temporal model takes (batch, {len(bands)}, dates, H, W) arrays, "
                                 f"got shape {tuple(value.shape)}")
        elif value.ndim != 4:
            raise ValueError(f"{name}: expected a 4-D array (batch, {len(bands)}, H, W), got shape {tuple(value.shape)}")
        if value.shape[1] != len(bands):
            raise ValueError(f"{name}: expected {len(bands)} channels ({', '.join(bands)}), got {value.shape[1]} "
                             f"(shape {tuple(value.shape)})")
        return np.asarray(value, dtype=np.float32)

    def _check_dates(self, name: str, array: np.ndarray, steps: int | None) -> int:
        return self.info.temporal.check_dates(name, array.shape[2], steps)

    def _standardize(self, name: str, array: np.ndarray) -> np.ndarray:
        stats = self.info.standardization.get(name)
        if stats is None:
            raise ValueError(f"{name}: the task config's data: section has no means/stds for {name}; pass "
                             "standardised inputs with standardize=False")
        mean, std = stats
        shape = [1] * array.ndim
        shape[1] = mean.shape[0]
        if mean.ndim == 2:  # per channel and date (C, T), for (B, C, T, H, W) inputs
            if array.shape[2] != mean.shape[1]:
                raise ValueError(f"{name}: the standardisation has statistics for {mean.shape[1]} dates, the input "
                                 f"has {array.shape[2]}")
            shape[2] = mean.shape[1]
        return (array - mean.reshape(shape)) / std.reshape(shape)
