"""Read a terratorch CLI config (``terratorch fit -c CONFIG.yaml``) into a ``TaskSpec``.

Only the ``model:`` section (the task class and its ``model_args`` for ``EncoderDecoderFactory``)
and the ``data:`` section's standardisation count. Anything the exporter cannot reproduce exactly
is refused with the config key that asked for it, e.g.
``model.init_args.model_args.decoder: 'SMPDecoder' is not supported``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tm_runtime.modalities import INPUT_MODALITIES, canonical_name, get_modality, is_coords

from ..reference.terramind import VARIANTS
from ..tim import TimSettings, check_tim_inputs

MODEL_ARGS = "model.init_args.model_args"
DATA_ARGS = "data.init_args"

TASK_CLASSES = {"SemanticSegmentationTask": "segmentation", "PixelwiseRegressionTask": "regression"}
MERGE_METHODS = ("mean", "max", "concat")
TEMPORAL_POOLINGS = ("mean", "max", "concat", "diff")
DECODERS = ("UNetDecoder", "UperNetDecoder", "FCNDecoder", "IdentityDecoder")
NECKS = ("SelectIndices", "ReshapeTokensToImage", "LearnedInterpolateToPyramidal", "InterpolateToPyramidal",
         "MaxpoolToPyramidal", "AddBottleneckLayer", "PermuteDims")

# Keyword arguments each decoder / head / neck takes (terratorch's signatures); a config key
# outside these is refused rather than silently ignored.
DECODER_ARGS = {
    "UNetDecoder": {"channels", "use_batchnorm", "attention_type"},
    "UperNetDecoder": {"pool_scales", "channels", "align_corners", "scale_modules"},
    "FCNDecoder": {"channels", "num_convs", "in_index"},
    "IdentityDecoder": {"out_index"},
}
HEAD_ARGS = {
    "segmentation": {"dropout", "channel_list"},
    "regression": {"dropout", "channel_list", "final_act", "learned_upscale_layers", "batch_norm"},
}
NECK_ARGS = {
    "SelectIndices": {"indices"},
    "ReshapeTokensToImage": {"remove_cls_token", "effective_time_dim", "h", "temporal_inputs"},
    "LearnedInterpolateToPyramidal": set(),
    "InterpolateToPyramidal": {"scale_factor", "mode"},
    "MaxpoolToPyramidal": {"kernel_size"},
    "AddBottleneckLayer": set(),
    "PermuteDims": {"new_order"},
}
# Regression heads: final activations by the names a config may give (no arbitrary imports).
FINAL_ACTIVATIONS = {"ReLU", "Sigmoid", "Tanh", "Softplus", "Identity"}

# Backbone arguments that only matter for training or pretrained-weight loading: the fine-tuned
# checkpoint holds the weights, and dropout / drop-path / modality dropout are off at inference.
IGNORED_BACKBONE_ARGS = {"pretrained", "ckpt_path", "drop_path_rate", "drop_rate", "attn_drop_rate",
                         "modality_drop_rate"}
TIM_BACKBONE_ARGS = {"tim_modalities", "tim_decoding_steps", "tim_temps", "tim_top_p", "tim_top_k",
                     "tim_chained_generations"}
# Task arguments about training, logging and metrics; none changes what the model computes.
TRAINING_TASK_ARGS = {
    "loss", "aux_loss", "class_weights", "var_weights", "ignore_index", "lr", "optimizer", "optimizer_hparams",
    "scheduler", "scheduler_hparams", "freeze_backbone", "freeze_decoder", "freeze_head", "plot_on_val",
    "test_dataloaders_names", "lr_overrides", "output_on_inference", "output_most_probable",
    "path_to_record_metrics", "tiled_inference_on_testing", "tiled_inference_on_validation", "custom_loss",
    "custom_loss_kwargs", "tiled_inference_parameters", "class_names",
}

# Datamodules whose standardisation is built in rather than given in ``data:`` (statistics per
# band, as terratorch's datamodule module defines them; the datamodule picks its ``bands``).
BUILTIN_STATS: dict[str, dict[str, tuple[float, float]]] = {
    # terratorch.datamodules.multi_temporal_crop_classification (MEANS / STDS)
    "MultiTemporalCropClassificationDataModule": {
        "BLUE": (494.905781, 284.925432), "GREEN": (815.239594, 357.84876), "RED": (924.335066, 575.566823),
        "NIR_NARROW": (2968.881459, 896.601013), "SWIR_1": (2634.621962, 951.900334),
        "SWIR_2": (1739.579917, 921.407808),
    },
}


class TaskConfigError(ValueError):
    """The config is not a terratorch task config this exporter supports; names the key."""


@dataclass(frozen=True)
class NeckSpec:
    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TemporalSpec:
    """terratorch's ``TemporalWrapper`` around the backbone: (B, C, T, H, W) inputs run as B*T
    images through the backbone; each layer's tokens are then pooled over T."""

    pooling: str  # mean | max | concat | diff
    n_timestamps: int | None = None  # required by concat (the head's channels are T * D)
    subset_lengths: tuple[int, ...] | None = None  # average within these groups of dates first

    @property
    def pooled_steps(self) -> int | None:
        """How many temporal entries the pooling sees (after subset averaging)."""
        return len(self.subset_lengths) if self.subset_lengths else self.n_timestamps

    def to_json(self) -> dict:
        return {"pooling": self.pooling, "n_timestamps": self.n_timestamps,
                "subset_lengths": list(self.subset_lengths) if self.subset_lengths else None}


@dataclass(frozen=True)
class Standardization:
    """(x - mean) / std per modality, from the config's ``data:`` section (or the datamodule's
    built-in statistics). ``mean[m]`` is per channel, or per channel and date (C, T)."""

    mean: dict[str, list]
    std: dict[str, list]
    source: str

    def to_json(self) -> dict:
        return {"source": self.source,
                "modalities": {m: {"mean": self.mean[m], "std": self.std[m]} for m in self.mean}}


@dataclass(frozen=True)
class TaskSpec:
    task_type: str  # segmentation | regression
    task_class: str
    backbone: str  # terratorch's name, e.g. terramind_v1_base
    size: str  # tiny | small | base | large
    modalities: tuple[str, ...]  # canonical names, in the config's order
    bands: dict[str, list[str]]  # band subsets (backbone_bands)
    merge_method: str
    necks: tuple[NeckSpec, ...]
    decoder: str
    decoder_args: dict[str, Any]
    head_args: dict[str, Any]
    num_classes: int | None  # segmentation
    num_outputs: int | None  # regression
    class_names: tuple[str, ...] | None = None
    temporal: TemporalSpec | None = None
    tim: TimSettings | None = None  # a ``_tim`` backbone's TiM step (its backbone_tim_* arguments)
    rescale: bool = True
    image_size_out: tuple[int, int] | None = None
    standardization: Standardization | None = None
    tiled_inference: dict[str, Any] | None = None
    source: str = ""

    @property
    def num_channels_out(self) -> int:
        return self.num_classes if self.task_type == "segmentation" else self.num_outputs


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TaskConfigError(f"task config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise TaskConfigError(f"{path} is not a terratorch config: expected a mapping with 'model:' and 'data:', "
                              f"got {type(data).__name__}")
    return data


def _short(class_path: object) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def _mapping(value: object, key: str) -> dict:
    if not isinstance(value, dict):
        raise TaskConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1  # YAML's true is no count


def int_list(value: object, key: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in value):
        raise TaskConfigError(f"{key}: expected a non-empty list of integers, got {value!r}")
    return list(value)


def parse_task_config(data: dict, source: str = "") -> TaskSpec:
    """A terratorch CLI config (already read from YAML) -> TaskSpec, or TaskConfigError naming the key."""
    if "model" not in data:
        raise TaskConfigError("not a terratorch task config: it has no 'model:' section "
                              f"(top-level keys: {', '.join(map(str, data)) or 'none'})")
    model = _mapping(data["model"], "model")
    class_path = model.get("class_path")
    task_type = TASK_CLASSES.get(_short(class_path))
    if task_type is None:
        raise TaskConfigError(f"model.class_path: {class_path!r} is not supported; tm-export reads "
                              f"terratorch.tasks.{' / '.join(TASK_CLASSES)} configs")
    init = _mapping(model.get("init_args", {}), "model.init_args")
    if init.get("model") is not None:
        raise TaskConfigError("model.init_args.model: a custom model object cannot be exported; use "
                              "model_factory: EncoderDecoderFactory with model_args")
    factory = init.get("model_factory")
    if _short(factory) != "EncoderDecoderFactory":
        raise TaskConfigError(f"model.init_args.model_factory: {factory!r} is not supported (only EncoderDecoderFactory)")
    if init.get("aux_heads"):
        raise TaskConfigError("model.init_args.aux_heads: auxiliary heads are not supported (they are training-only "
                              "outputs; drop them from the config for the export)")
    unknown = sorted(set(init) - TRAINING_TASK_ARGS - {"model_args", "model_factory", "model", "aux_heads"})
    if unknown:
        raise TaskConfigError(f"model.init_args.{unknown[0]}: unknown task argument (not supported by tm-export)")
    args = dict(_mapping(init.get("model_args"), "model.init_args.model_args"))
    spec = _parse_model_args(args, task_type, _short(class_path))
    names = init.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise TaskConfigError(f"model.init_args.class_names: expected a list of names, got {names!r}")
        if task_type == "segmentation" and len(names) != spec["num_classes"]:
            raise TaskConfigError(f"model.init_args.class_names: {len(names)} names for num_classes="
                                  f"{spec['num_classes']}")
        spec["class_names"] = tuple(str(n) for n in names)
    tiled = init.get("tiled_inference_parameters")
    spec["tiled_inference"] = dict(tiled) if isinstance(tiled, dict) else None
    spec["standardization"] = _parse_standardization(data.get("data"), spec["modalities"], spec["bands"],
                                                     spec["temporal"])
    return TaskSpec(**spec, source=source)


def _parse_model_args(args: dict, task_type: str, task_class: str) -> dict:
    where = MODEL_ARGS
    backbone = args.pop("backbone", None)
    if not isinstance(backbone, str):
        raise TaskConfigError(f"{where}.backbone: expected a TerraMind backbone name, got {backbone!r}")
    name = backbone.removeprefix("terratorch_")
    parts = name.split("_")
    tim = name.endswith("_tim")
    if not (name.startswith("terramind_v1_") and len(parts) in (3, 4) and parts[2] in VARIANTS
            and (len(parts) == 3 or tim)):
        raise TaskConfigError(f"{where}.backbone: {backbone!r} is not supported; tm-export reads "
                              f"terramind_v1_{{{','.join(VARIANTS)}}} and their _tim variants")
    size = parts[2]
    backbone_args = {k[len("backbone_"):]: args.pop(k) for k in [k for k in args if k.startswith("backbone_")]}
    decoder_args = {k[len("decoder_"):]: args.pop(k) for k in [k for k in args if k.startswith("decoder_")]}
    head_args = {k[len("head_"):]: args.pop(k) for k in [k for k in args if k.startswith("head_")]}

    modalities, bands = _parse_modalities(backbone_args)
    merge = backbone_args.pop("merge_method", "mean")
    if merge not in MERGE_METHODS:
        raise TaskConfigError(f"{where}.backbone_merge_method: {merge!r} is not supported for task models "
                              f"(choose one of {', '.join(MERGE_METHODS)}; 'dict' and None give no image features)")
    temporal = _parse_temporal(backbone_args)
    tim_args = {k: backbone_args.pop(k) for k in list(backbone_args) if k in TIM_BACKBONE_ARGS}
    if tim_args and not tim:
        raise TaskConfigError(f"{where}.backbone_{next(iter(tim_args))}: only _tim backbones take TiM arguments")
    tim_spec = _parse_tim(tim_args, modalities, bands) if tim else None
    for key, value in list(backbone_args.items()):
        if key in IGNORED_BACKBONE_ARGS:
            backbone_args.pop(key)
        elif key == "img_size" and value == 224 or key == "patch_size" and value == 16:
            backbone_args.pop(key)
        elif key == "num_register_tokens" and value == 0 or key == "encoder_norm" and value is True:
            backbone_args.pop(key)
    if backbone_args:
        key = next(iter(backbone_args))
        raise TaskConfigError(f"{where}.backbone_{key}: {backbone_args[key]!r} is not supported by tm-export")

    necks = _parse_necks(args.pop("necks", None))
    decoder = args.pop("decoder", "FCNDecoder")
    if decoder not in DECODERS:
        raise TaskConfigError(f"{where}.decoder: {decoder!r} is not supported; tm-export exports "
                              f"{', '.join(DECODERS)}")
    unknown = sorted(set(decoder_args) - DECODER_ARGS[decoder])
    if unknown:
        raise TaskConfigError(f"{where}.decoder_{unknown[0]}: {decoder} takes no argument {unknown[0]!r}")
    if decoder == "UNetDecoder" and "channels" not in decoder_args:
        raise TaskConfigError(f"{where}.decoder_channels: UNetDecoder needs decoder_channels")
    unknown = sorted(set(head_args) - HEAD_ARGS[task_type])
    if unknown:
        raise TaskConfigError(f"{where}.head_{unknown[0]}: the {task_type} head takes no argument {unknown[0]!r}")
    if head_args.get("channel_list") is not None:
        int_list(head_args["channel_list"], f"{where}.head_channel_list")
    if task_type == "regression" and head_args.get("final_act") is not None:
        act = _short(head_args["final_act"])
        if act not in FINAL_ACTIVATIONS:
            raise TaskConfigError(f"{where}.head_final_act: {head_args['final_act']!r} is not supported "
                                  f"(torch.nn.{', torch.nn.'.join(sorted(FINAL_ACTIVATIONS))})")
        head_args["final_act"] = act

    num_classes = args.pop("num_classes", None)
    num_outputs = args.pop("num_outputs", None)
    if task_type == "segmentation":
        if not is_positive_int(num_classes):
            raise TaskConfigError(f"{where}.num_classes: a segmentation task needs a positive integer, got "
                                  f"{num_classes!r}")
        if num_outputs is not None:
            raise TaskConfigError(f"{where}.num_outputs: a segmentation task takes num_classes, not num_outputs")
    else:
        if num_classes is not None:
            raise TaskConfigError(f"{where}.num_classes: a regression task takes num_outputs, not num_classes")
        num_outputs = 1 if num_outputs is None else num_outputs
        if not is_positive_int(num_outputs):
            raise TaskConfigError(f"{where}.num_outputs: expected a positive integer, got {num_outputs!r}")
    rescale = args.pop("rescale", True)
    if not isinstance(rescale, bool):
        raise TaskConfigError(f"{where}.rescale: expected true or false, got {rescale!r}")
    size_out = args.pop("image_size_out", None)
    if size_out is not None:
        size_out = tuple(int_list(size_out, f"{where}.image_size_out"))
        if len(size_out) != 2:
            raise TaskConfigError(f"{where}.image_size_out: expected [height, width], got {list(size_out)}")
    for key in ("peft_config", "aux_decoders"):
        if args.get(key):
            raise TaskConfigError(f"{where}.{key}: not supported by tm-export")
        args.pop(key, None)
    if args:
        key = next(iter(args))
        raise TaskConfigError(f"{where}.{key}: unknown model argument (not supported by tm-export)")
    return {"task_type": task_type, "task_class": task_class, "backbone": name, "size": size,
            "modalities": modalities, "bands": bands, "merge_method": merge, "necks": necks,
            "decoder": decoder, "decoder_args": decoder_args, "head_args": head_args,
            "num_classes": num_classes, "num_outputs": num_outputs, "temporal": temporal, "tim": tim_spec,
            "rescale": bool(rescale), "image_size_out": size_out}


def _parse_tim(tim_args: dict, modalities: tuple[str, ...], bands: dict[str, list[str]]) -> TimSettings:
    """A ``_tim`` backbone's TiM step from its backbone_tim_* arguments (terratorch's defaults
    for the others: LULC, chained, temperature 1, top-p 0.8, top-k 0, one decoding step)."""
    if bands:
        raise TaskConfigError(f"{MODEL_ARGS}.backbone_bands: TiM backbones take no band subsets (terratorch refuses "
                              "them: the frozen TiM generation model reads the pretrained bands)")
    listed = tim_args.get("tim_modalities")
    if listed is not None and (not isinstance(listed, list) or not all(isinstance(m, str) for m in listed)):
        raise TaskConfigError(f"{MODEL_ARGS}.backbone_tim_modalities: expected a list of modality names, e.g. "
                              f"[LULC], got {listed!r}")
    for raw in listed or ():
        try:
            clash = canonical_name(raw) in modalities
        except ValueError:
            clash = False  # a target-only name (LULC, NDVI): TimSettings checks it
        if clash:
            raise TaskConfigError(f"{MODEL_ARGS}.backbone_tim_modalities: {raw} is also among backbone_modalities; "
                                  "TiM generates modalities that are not inputs (terratorch refuses this too)")
    kinds = {"tim_temps": (int, float), "tim_top_p": (int, float), "tim_top_k": (int,), "tim_decoding_steps": (int,),
             "tim_chained_generations": (bool,)}
    for key, types in kinds.items():
        value = tim_args.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise TaskConfigError(f"{MODEL_ARGS}.backbone_{key}: expected {' or '.join(t.__name__ for t in types)}, "
                                  f"got {value!r}")
    try:
        settings = TimSettings.from_backbone_kwargs(tim_args)
        check_tim_inputs(settings, list(modalities), {})
    except (TypeError, ValueError) as exc:
        # Name the argument the message is about (the sampling check names all three it reads).
        named = [k for k in tim_args if k in str(exc)]
        key = named[0] if len(named) == 1 else "tim_modalities" if "modalit" in str(exc) or not tim_args \
            else "/".join(sorted(named or tim_args))
        raise TaskConfigError(f"{MODEL_ARGS}.backbone_{key}: {exc}") from None
    return settings


def _parse_modalities(backbone_args: dict) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    key = f"{MODEL_ARGS}.backbone_modalities"
    listed = backbone_args.pop("modalities", None)
    if listed is None:
        raise TaskConfigError(f"{key}: missing (TerraMind task models name their input modalities)")
    if not isinstance(listed, list) or not listed:
        raise TaskConfigError(f"{key}: expected a non-empty list of modality names, got {listed!r}")
    names = []
    for item in listed:
        if not isinstance(item, str):
            raise TaskConfigError(f"{key}: {item!r} is not supported (new modalities given as {{name: channels}} "
                                  "have no pretrained embedding to export)")
        if is_coords(item):
            raise TaskConfigError(f"{key}: {item!r} (a sequence modality) is not supported in task models")
        try:
            name = canonical_name(item)
        except ValueError:
            raise TaskConfigError(f"{key}: unknown modality {item!r}; known: {', '.join(INPUT_MODALITIES)}") from None
        if get_modality(name).tokenized:
            raise TaskConfigError(f"{key}: {item!r} is a tokenised input (its tokenizer runs inside the backbone); "
                                  "task models with LULC/NDVI inputs are not supported")
        if name in names:
            raise TaskConfigError(f"{key}: {name} is listed twice")
        names.append(name)
    bands: dict[str, list[str]] = {}
    chosen = backbone_args.pop("bands", None) or {}
    bkey = f"{MODEL_ARGS}.backbone_bands"
    for mod, mod_bands in _mapping(chosen, bkey).items():
        try:
            name = canonical_name(mod)
        except ValueError:
            raise TaskConfigError(f"{bkey}: unknown modality {mod!r}") from None
        if name not in names:
            raise TaskConfigError(f"{bkey}: {mod!r} is not among backbone_modalities {names}")
        if not isinstance(mod_bands, list) or not mod_bands:
            raise TaskConfigError(f"{bkey}.{mod}: expected a non-empty list of band names, got {mod_bands!r}")
        known = get_modality(name).bands
        unknown = [b for b in mod_bands if b not in known]
        if unknown:
            # Upstream gives unknown bands fresh columns; the fine-tuned checkpoint has them, but
            # without pretraining statistics or names the runtime could check them.
            raise TaskConfigError(f"{bkey}.{mod}: band(s) {', '.join(map(str, unknown))} are not pretrained "
                                  f"{name} bands ({', '.join(known)}); not supported")
        if len(set(mod_bands)) != len(mod_bands):
            raise TaskConfigError(f"{bkey}.{mod}: a band is listed twice")
        bands[name] = list(mod_bands)
    return tuple(names), bands


def _parse_temporal(backbone_args: dict) -> TemporalSpec | None:
    where = f"{MODEL_ARGS}.backbone_temporal"
    use = backbone_args.pop("use_temporal", False)
    pooling = backbone_args.pop("temporal_pooling", "mean")
    concat = backbone_args.pop("temporal_concat", None)
    n = backbone_args.pop("temporal_n_timestamps", None)
    subsets = backbone_args.pop("temporal_subset_lengths", None)
    permute = backbone_args.pop("temporal_features_permute_op", None)
    if not use:
        return None
    if permute is not None:
        raise TaskConfigError(f"{where}_features_permute_op: not supported (TerraMind's features are (B, L, C))")
    if concat:  # deprecated spelling of pooling='concat'
        pooling = "concat"
    if pooling not in TEMPORAL_POOLINGS:
        raise TaskConfigError(f"{where}_pooling: {pooling!r} is not supported (choose one of "
                              f"{', '.join(TEMPORAL_POOLINGS)}; 'keep' returns 5-D features no decoder here takes)")
    if n is not None and not is_positive_int(n):
        raise TaskConfigError(f"{where}_n_timestamps: expected a positive integer, got {n!r}")
    if subsets is not None:
        subsets = tuple(int_list(subsets, f"{where}_subset_lengths"))
        if n is not None and sum(subsets) != n:
            raise TaskConfigError(f"{where}_subset_lengths: they sum to {sum(subsets)}, n_timestamps is {n}")
        if pooling == "diff" and len(subsets) != 2:
            raise TaskConfigError(f"{where}_subset_lengths: diff pooling needs exactly two subsets, got {len(subsets)}")
    if pooling == "concat" and subsets is not None:
        # terratorch sizes the head for n_timestamps dates, but the pooled features then have one
        # entry per subset: such a model cannot have been trained.
        raise TaskConfigError(f"{where}_subset_lengths: concat pooling with subset_lengths is not supported")
    if pooling == "concat" and n is None:
        raise TaskConfigError(f"{where}_n_timestamps: concat pooling needs n_timestamps (the head's channels are "
                              "n_timestamps x the backbone's)")
    return TemporalSpec(pooling, n, subsets)


def _parse_necks(necks: object) -> tuple[NeckSpec, ...]:
    key = f"{MODEL_ARGS}.necks"
    if necks is None:
        return ()
    if not isinstance(necks, list):
        raise TaskConfigError(f"{key}: expected a list of {{name: ..., args}} entries, got {type(necks).__name__}")
    out = []
    for i, entry in enumerate(necks):
        entry = dict(_mapping(entry, f"{key}[{i}]"))
        name = entry.pop("name", None)
        if name not in NECKS:
            raise TaskConfigError(f"{key}[{i}].name: {name!r} is not supported; tm-export exports {', '.join(NECKS)}")
        unknown = sorted(set(entry) - NECK_ARGS[name])
        if unknown:
            raise TaskConfigError(f"{key}[{i}].{unknown[0]}: {name} takes no argument {unknown[0]!r}")
        out.append(NeckSpec(name, entry))
    return tuple(out)


def _parse_standardization(data: object, modalities: tuple[str, ...], bands: dict[str, list[str]],
                           temporal: TemporalSpec | None) -> Standardization | None:
    """Per-modality mean/std from ``data:``; None when the config gives none (predict then needs
    standardised inputs, and says so)."""
    if not isinstance(data, dict):
        return None
    init = data.get("init_args") or {}
    if not isinstance(init, dict):
        return None
    means, stds = init.get("means"), init.get("stds")
    datamodule = _short(data.get("class_path", ""))
    if means is None and stds is None:
        table = BUILTIN_STATS.get(datamodule)
        if table is None or len(modalities) != 1:
            return None
        mod = modalities[0]
        chosen = init.get("bands") or list(table)  # the datamodule's default: all its bands, in this order
        missing = [b for b in chosen if b not in table]
        if missing:
            raise TaskConfigError(f"{DATA_ARGS}.bands: {datamodule} has no statistics for {missing}")
        channels = len(bands.get(mod, get_modality(mod).bands))
        if len(chosen) != channels:
            raise TaskConfigError(f"{DATA_ARGS}.bands: {datamodule} delivers {len(chosen)} bands, the backbone "
                                  f"reads {channels} {mod} channels")
        return Standardization({mod: [table[b][0] for b in chosen]}, {mod: [table[b][1] for b in chosen]},
                               f"{datamodule} (built-in statistics)")
    if means is None or stds is None:
        missing = "stds" if stds is None else "means"
        raise TaskConfigError(f"{DATA_ARGS}.{missing}: missing while {DATA_ARGS}."
                              f"{'means' if missing == 'stds' else 'stds'} is given")
    if isinstance(means, str) or isinstance(stds, str):
        raise TaskConfigError(f"{DATA_ARGS}.means/stds: statistics read from a file are not supported; "
                              "write the values into the config")
    if isinstance(means, dict) != isinstance(stds, dict):
        raise TaskConfigError(f"{DATA_ARGS}.means/stds: one is per modality, the other is not")
    if not isinstance(means, dict):
        if len(modalities) != 1:
            raise TaskConfigError(f"{DATA_ARGS}.means: a single list for {len(modalities)} modalities; give them "
                                  "per modality ({S2L2A: [...], S1GRD: [...]})")
        means, stds = {modalities[0]: means}, {modalities[0]: stds}
    out_mean, out_std = {}, {}
    by_name, not_modalities = {}, []
    for key in means:
        try:
            by_name[canonical_name(str(key))] = key
        except ValueError:
            not_modalities.append(key)  # another datamodule's key, or a misspelt modality
    lacking = [mod for mod in modalities if mod not in by_name]
    if lacking and not_modalities:
        raise TaskConfigError(f"{DATA_ARGS}.means.{not_modalities[0]}: not a modality name, and the model's "
                              f"{', '.join(lacking)} has no statistics (misspelt?)")
    for mod in modalities:
        if mod not in by_name:
            continue  # predict(standardize=True) names the modality without statistics
        key = by_name[mod]
        channels = len(bands.get(mod, get_modality(mod).bands))
        m, s = means[key], stds.get(key)
        where = f"{DATA_ARGS}.means.{key}" if len(means) > 1 or len(modalities) > 1 else f"{DATA_ARGS}.means"
        for name, values in (("means", m), ("stds", s)):
            if not _stat_shape_ok(values, channels, temporal):
                raise TaskConfigError(f"{where.replace('.means', '.' + name)}: expected {channels} values (one per "
                                      f"channel{' or per channel and date' if temporal else ''}), got {values!r}")
        flat = [v for row in s for v in (row if isinstance(row, list) else [row])]
        if any(not math.isfinite(v) or v == 0 for v in flat):
            raise TaskConfigError(f"{where.replace('.means', '.stds')}: standard deviations must be finite and "
                                  "non-zero")
        out_mean[mod], out_std[mod] = m, s
    if not out_mean:
        return None
    return Standardization(out_mean, out_std, f"{DATA_ARGS}.means/stds")


def _stat_shape_ok(values: object, channels: int, temporal: TemporalSpec | None) -> bool:
    if not isinstance(values, list) or len(values) != channels:
        return False
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return True
    # terratorch's Normalize also takes (C, T) statistics for temporal inputs.
    return temporal is not None and all(
        isinstance(row, list) and row and all(isinstance(v, (int, float)) for v in row) for row in values) \
        and len({len(row) for row in values}) == 1
