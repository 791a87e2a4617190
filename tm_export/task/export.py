"""``tm-export --task-config CONFIG.yaml --ckpt CHECKPOINT --out DIR``: a fine-tuned terratorch
task model as graphs.

Graphs: ``embed_<modality>`` and ``encoder`` exactly as a backbone export has them (so ``embed``
works on a fine-tuned export, with the fine-tuned weights), plus ``head``: necks, decoder and
head in one graph, fed the selected encoder layers after the host has merged modalities and
pooled dates. The manifest's ``task`` section holds what ``predict`` needs (see
``tm_runtime.task``). Written through the same temp-dir-then-rename path as every export.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tm_runtime.manifest import sha256_file
from tm_runtime.modalities import get_modality

from ..export import ExportConfig, ExportError, _manifest, write_export
from ..graphs import BATCH, GraphSpec, TensorDecl, embedding_specs, encoder_spec
from ..precision import check_precision
from ..tim import mark_tim_only_targets, tim_manifest
from ..winograd import TILE_SIZES, winograd_copy
from .checkpoint import TRAINING_ARGS, CheckpointError, read_task_checkpoint
from .config import TaskConfigError, TaskSpec, load_yaml, parse_task_config
from .model import TaskModel, build_task_model, load_task_state, randomize_task_model
from .tim import tim_graph_specs
from .training_args import check_config_matches_training

HEAD_GRAPH = "head"
TASK_CONFIG_FILE = "task_config.yaml"
FORMAT = "tm-deploy-task"
FORMAT_VERSION = 1


@dataclass
class TaskExportConfig:
    task_config: Path
    out: Path
    ckpt: Path | None = None
    random_init: bool = False  # seeded random weights instead of --ckpt (tests, benchmarks)
    seed: int = 0
    image_size: int = 224
    opset: int = 17
    precision: str = "fp32"
    simplify: bool = True
    validate: bool = True
    max_rel_error: float | None = None
    overwrite: bool = False
    # --precision int8 (tm_export.quantize; gated through predict, tm_runtime.task_accuracy)
    calibration_data: Path | None = None
    gate_data: Path | None = None
    int8_method: str = "dynamic"
    int8_graphs: list[str] | None = None
    int8_fc2: str = "auto"
    tile_scale: dict[str, float] = field(default_factory=dict)
    winograd: int = 0  # 2 or 4: the head's 3x3 convolutions as Winograd F(m x m, 3 x 3) (ONNX Runtime CPU)

    def graph_config(self, spec: TaskSpec) -> ExportConfig:
        """The settings ``export_graph`` and the base manifest read."""
        return ExportConfig(size=spec.size, modalities=list(spec.modalities), out=Path(self.out),
                            bands=dict(spec.bands), image_size=self.image_size, opset=self.opset,
                            precision=self.precision, simplify=self.simplify, validate=self.validate,
                            max_rel_error=self.max_rel_error, overwrite=self.overwrite,
                            random_init=self.random_init, seed=self.seed, ckpt=self.ckpt, tim=spec.tim,
                            calibration_data=self.calibration_data, gate_data=self.gate_data,
                            int8_method=self.int8_method, int8_graphs=self.int8_graphs, int8_fc2=self.int8_fc2,
                            tile_scale=self.tile_scale)


def head_output_name(spec: TaskSpec) -> str:
    return "logits" if spec.task_type == "segmentation" else "values"


def head_spec(model: TaskModel, winograd: int = 0) -> GraphSpec:
    """The necks + decoder + head graph; ``winograd`` (2 or 4) traces its 3x3 convolutions as
    Winograd F(m x m, 3 x 3), BatchNorms folded in, validated against the direct convolutions."""
    head = model.head
    tokens = head.grid[0] * head.grid[1]
    channels = head.input_channels

    def sample(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(batch, tokens, c, generator=gen) for c in channels)

    module, extra = head, {}
    if winograd:
        module, count = winograd_copy(head, winograd, sample(1, torch.Generator().manual_seed(0)))
        extra = {"winograd": {"tile": winograd, "convolutions": count}}
    seg = model.spec.task_type == "segmentation"
    return GraphSpec(
        name=HEAD_GRAPH, module=module, reference=head if winograd else None,
        inputs=[TensorDecl(f"features_{i}", "float32", (BATCH, tokens, c)) for i, c in enumerate(channels)],
        outputs=[TensorDecl(head_output_name(model.spec), "float32", (BATCH, *head.output_shape))],
        sample=sample,
        extra={"role": "task_head", "layers": list(head.layers), **({"argmax_axis": 1} if seg else {}), **extra},
    )


def check_winograd(config: TaskExportConfig) -> None:
    """Winograd is an fp32 rewrite for ONNX Runtime CPU: the head must stay fp32 (an int8 export
    whose head is quantised cannot take it)."""
    if config.winograd not in (0,) + TILE_SIZES:
        raise ExportError(f"--winograd tile must be one of {TILE_SIZES}, got {config.winograd}")
    if not config.winograd:
        return
    if config.precision not in ("fp32", "int8"):
        raise ExportError(f"--winograd is for fp32 graphs on ONNX Runtime CPU, not --precision {config.precision} "
                          "(GPU runtimes choose Winograd kernels themselves)")
    if config.precision == "int8" and "head" in (config.int8_graphs or []):
        raise ExportError("--winograd rewrites the head's convolutions in fp32: it cannot be combined with "
                          "--int8-graphs head")


def task_section(spec: TaskSpec, model: TaskModel, image_size: int, tim_section: dict | None = None) -> dict:
    """The manifest's ``task``: everything ``predict`` needs beyond the graphs."""
    bands = {m: list(spec.bands.get(m, get_modality(m).bands)) for m in spec.modalities}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "type": spec.task_type, "task_class": spec.task_class,
        "num_classes": spec.num_classes, "num_outputs": spec.num_outputs,
        "class_names": list(spec.class_names) if spec.class_names else None,
        "modalities": list(spec.modalities), "bands": bands,
        "merge_method": spec.merge_method,
        "layers": list(model.layers),
        "encoder_graph": "encoder", "head_graph": HEAD_GRAPH,
        "head_inputs": [f"features_{i}" for i in range(len(model.layers))],
        "head_output": head_output_name(spec), "output_shape": list(model.head.output_shape),
        "image_size": image_size,
        "standardization": spec.standardization.to_json() if spec.standardization else None,
        "temporal": spec.temporal.to_json() if spec.temporal else None,
        # A TiM backbone's step (the manifest's top-level ``tim``: modalities, sampling defaults and
        # the frozen generation model's graphs); ``encoder_graph`` is the fine-tuned encoder.
        "tim": tim_section,
        "tiled_inference": spec.tiled_inference,
        "config": {"file": TASK_CONFIG_FILE, "backbone": spec.backbone, "necks": [n.name for n in spec.necks],
                   "decoder": spec.decoder, "decoder_args": spec.decoder_args, "head_args": spec.head_args,
                   "rescale": spec.rescale, "image_size_out": list(spec.image_size_out) if spec.image_size_out
                   else None},
    }


def prepare_task_model(config: TaskExportConfig, log: Callable[[str], None] = print) -> tuple[TaskModel, dict]:
    """Parse the config, build the reference and load the weights (or randomise them)."""
    raw_config = load_yaml(config.task_config)
    spec = parse_task_config(raw_config, source=str(config.task_config))
    if config.random_init:
        model = build_task_model(spec, config.image_size, seed=config.seed)
        randomize_task_model(model, config.seed)
        log(f"WARNING: RANDOM WEIGHTS (--random-init --seed {config.seed}): outputs are meaningless; "
            "for tests and benchmarks only")
        return model, {"random_init": True, "seed": config.seed, "source": "random-init"}
    if config.ckpt is None:
        raise ExportError("--task-config needs --ckpt CHECKPOINT (what terratorch fit wrote), or --random-init")
    log(f"weights: {config.ckpt}")
    state, facts = read_task_checkpoint(config.ckpt)
    trained = facts.pop(TRAINING_ARGS, None)
    source = str(config.ckpt)
    try:
        if spec.tim is not None:  # the TiM backbone loads as it is built (both of its models)
            model = build_task_model(spec, config.image_size, tim_state=state, source=source)
        else:
            model = build_task_model(spec, config.image_size)
        load_task_state(model, state, source)
    except (TaskConfigError, CheckpointError):
        # The weights do not fit the config. Where the checkpoint records how it was trained, the
        # setting that differs (another backbone, modality or temporal wrapper) says more than the
        # first odd key; without such a record, or if none differs, the key's error stands.
        check_config_matches_training(raw_config, trained, source)
        raise
    # Same keys and shapes: settings that change no shape (layers, merge, pooling) can still differ.
    check_config_matches_training(raw_config, trained, source)
    return model, {"random_init": False, "source": "file", "file": Path(config.ckpt).name,
                   "sha256": sha256_file(config.ckpt), "task_checkpoint": facts}


def export_task(config: TaskExportConfig, log: Callable[[str], None] = print) -> dict:
    """Export the task model of ``config.task_config`` into ``config.out``; returns the manifest."""
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    check_precision(config.precision)
    check_winograd(config)
    if config.precision == "int8":  # calibrated and gated through predict (tm_runtime.task_accuracy)
        from ..quantize import check_int8_config
        check_int8_config(config)
    elif config.tile_scale:
        raise ExportError("--tile-scale scales the tiles of --precision int8's calibration and gates")
    start = time.perf_counter()
    model, weights = prepare_task_model(config, log)
    spec = model.spec
    stats = spec.standardization.mean if spec.standardization else {}
    lacking = [mod for mod in spec.modalities if mod not in stats]
    if lacking:  # not an error: standardised inputs with standardize=False still work
        log(f"WARNING: the config's data: section gives no means/stds for {', '.join(lacking)}: "
            "predict(standardize=True), the default, will refuse them; pass standardised arrays with "
            "standardize=False, or add the statistics to the config and export again")
    unknown = sorted(set(config.tile_scale) - set(spec.modalities))
    if unknown:
        raise ExportError(f"--tile-scale names {', '.join(unknown)}, which the task config does not take "
                          f"(backbone_modalities: {', '.join(spec.modalities)})")
    graph_config = config.graph_config(spec)
    renames: dict[str, str] = {}
    if spec.tim is not None:
        backbone, renames = tim_graph_specs(model)
    else:
        backbone = embedding_specs(model.encoder) + [encoder_spec(model.encoder)]
    specs = backbone + [head_spec(model, config.winograd)]

    def make_manifest(graphs: dict, files: dict) -> dict:
        manifest = _manifest(graph_config, model.encoder, weights, graphs, None, files)
        tim_section = None
        if spec.tim is not None:  # as a TiM backbone export has it: embed runs the fine-tuned TiM backbone
            tim_section = manifest["tim"] = tim_manifest(spec.tim, renames, model.generation is not None)
            mark_tim_only_targets(manifest["targets"], spec.tim, [], graphs)
        manifest["task"] = task_section(spec, model, config.image_size, tim_section)
        return manifest

    log(f"{spec.task_type} task, {spec.backbone}: {len(specs)} graphs")
    return write_export(out, specs, graph_config, make_manifest, log,
                        {"task_config": (Path(config.task_config), TASK_CONFIG_FILE)}, started=start)
