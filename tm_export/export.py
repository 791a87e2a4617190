"""specs -> trace -> simplify -> check dims -> validate -> manifest, in a temporary directory that is
renamed to ``--out`` only when everything succeeded."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch

from tm_runtime.coords import COORDS_TOKENIZER_FILE, MASKED_BIAS, CoordsTokenizer
from tm_runtime.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, sha256_file
from tm_runtime.modalities import COORDS, get_modality, get_target, is_coords

from . import tim
from . import weights as W
from .bands import select_bands
from . import streaming
from .graphs import DECODER_GRAPH, GraphSpec, all_specs, head_graph_name, query_graph_name
from .memory import PeakWindow, peak_rss_bytes, release_memory, step
from .precision import FP16_MAX_REL_ERROR, check_precision, to_fp16
from .reference.terramind import TerraMindModel, get_variant
from .reference.tokenizers import Tokenizer, TokenizerConfig, build_tokenizer, load_tokenizer, tokenizer_config
from .streaming import WeightlessModel
from .tim import TimSettings
from .tokenizer_graphs import tokenizer_specs
from .validate import summarize, validate_graph
from .winograd import TILE_SIZES

# A shrunken tokenizer architecture for tests and demos with random weights.
SMALL_TOKENIZER = {"encoder": {"dim": 64, "depth": 2, "num_heads": 4},
                   "vit_decoder": {"dim": 64, "depth": 2, "num_heads": 4},
                   "unet": {"model_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                            "attention_resolutions": (2, 4)}}

# Protobuf cannot serialise a single message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


class ExportError(RuntimeError):
    """The export could not be completed; nothing was written at the output path."""


class ValidationFailed(ExportError):
    pass


@dataclass
class ExportConfig:
    size: str
    modalities: list[str]
    out: Path
    output_modalities: list[str] = field(default_factory=list)
    tokenizer_ckpts: dict[str, Path] = field(default_factory=dict)
    # "official" (the checkpoints' architecture) or "small" (random-init only: fast tests/demos)
    tokenizer_size: str = "official"
    precision: str = "fp32"  # fp16: reduced-precision graphs (see precision.py), validated against fp32
    winograd: int = 0  # 2 or 4: the UNets' 3x3 convolutions as Winograd F(m x m, 3 x 3) (ONNX Runtime CPU)
    ckpt: Path | None = None
    random_init: bool = False
    seed: int = 0
    bands: dict[str, list[str]] = field(default_factory=dict)
    image_size: int = 224
    opset: int = 17
    simplify: bool = True
    validate: bool = True
    max_rel_error: float | None = None  # overrides every graph's fp32 tolerance
    overwrite: bool = False
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    tim: TimSettings | None = None  # a TiM backbone (terramind_v1_<size>_tim): see tim.py
    # --precision int8 (see quantize.py): calibration tiles, gate tiles (default: the same), method
    calibration_data: Path | None = None
    gate_data: Path | None = None
    int8_method: str = "dynamic"
    int8_graphs: list[str] | None = None  # None: quantize.DEFAULT_FAMILIES
    int8_fc2: str = "auto"  # the SwiGLU down projections: auto (int8 if the gates pass) | int8 | fp32
    tile_scale: dict[str, float] = field(default_factory=dict)  # task exports: units of the tiles, per modality


def _versions() -> dict[str, str]:
    import onnxruntime

    from tm_runtime import __version__

    out = {"tm_deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__,
           "exporter": "torch.onnx.export (TorchScript-based, dynamo=False)"}
    try:
        import onnxslim

        out["onnxslim"] = onnxslim.__version__
    except ImportError:
        pass
    return out


def build_reference(config: ExportConfig, log: Callable[[str], None] = print) -> tuple[TerraMindModel, dict]:
    """The reference model with its weights, and the manifest's description of where they came from."""
    model, _, info = build_models(config, log)
    return model, info


def build_models(config: ExportConfig, log: Callable[[str], None] = print, state: dict | None = None,
                 state_source: str = "the given state_dict") -> tuple[TerraMindModel, TerraMindModel | None, dict]:
    """The reference model, a TiM backbone's separate generation model (None when the weights are
    shared, see tim.py), and the manifest's description of where the weights came from.

    ``state``: weights already in memory (e.g. the backbone part of a fine-tuned task model; a TiM
    backbone's keys may keep their prefix, see ``tim.split_tim_state``) instead of ``config.ckpt``;
    ``state_source`` names them in errors.
    """
    variant = get_variant(config.size)
    if config.image_size % 16 or config.image_size < 16:
        raise ExportError(f"--image-size must be a positive multiple of 16, got {config.image_size}")
    names = [COORDS.name if is_coords(m) else get_modality(m).name for m in config.modalities]
    if len(set(names)) != len(names):
        raise ExportError(f"a modality is listed twice: {config.modalities}")
    targets = [COORDS.name if is_coords(t) else get_target(t).name for t in config.output_modalities]
    if len(set(targets)) != len(targets):
        raise ExportError(f"an output modality is listed twice: {config.output_modalities}")
    tim_feed = list(config.tim.modalities) if config.tim else []  # the embedding encoder reads their tokens
    if config.tim:
        tim.check_tim_inputs(config.tim, config.modalities, config.bands)
    path = generation_state = None
    if state is not None:
        state, generation_state = tim.checkpoint_states(state, config.tim, targets, state_source)
    elif not config.random_init:
        path = Path(config.ckpt) if config.ckpt else W.hub_checkpoint(config.size)
        log(f"weights: {path}")
        state, generation_state = tim.checkpoint_states(W.read_state_dict(path), config.tim, targets, str(path))
    targets += [t for t in tim_feed if t not in targets]  # TiM modalities: their decoders, no tokenizers
    # Generated outputs condition later ones through their encoder token embedding; the official
    # checkpoints have one for every target (a checkpoint without it can still generate, unchained).
    def key(t: str) -> str:
        return COORDS.key if t == COORDS.name else get_target(t).key

    conditioning = [t for t in targets if t in tim_feed or state is None
                    or f"encoder_embeddings.{key(t)}.token_emb.weight" in state]
    for t in sorted(set(targets) - set(conditioning)):
        log(f"note: the checkpoint has no encoder token embedding for {t}: it cannot condition other outputs")
    # Tokenised inputs (LULC, NDVI) enter the encoder through the same token embeddings; coords
    # is a sequence input with its own embedding.
    raw = [n for n in names if n == COORDS.name or not get_modality(n).tokenized]
    tokenized = [n for n in names if n != COORDS.name and get_modality(n).tokenized]
    conditioning += [n for n in tokenized if n not in conditioning]
    model = TerraMindModel(variant, raw, targets, image_size=config.image_size, conditioning=conditioning)
    generation = None
    if generation_state is not None:  # a TiM backbone's frozen enc-dec: its encoder side
        feed = (list(config.tim.modalities) if config.tim.chained else []) + tokenized
        generation = TerraMindModel(variant, raw, image_size=config.image_size, conditioning=feed).eval()
        W.load_needed(generation, generation_state, f"{path or state_source} (TiM generation model, sampler.model.*)")
    if state is not None and path is None:
        W.load_needed(model, state, state_source)
        info = {"random_init": False, "source": "state_dict"}  # the caller describes where it came from
    elif config.random_init:
        W.randomize(model, config.seed)
        info = {"random_init": True, "seed": config.seed, "source": "random-init"}
        log(f"WARNING: RANDOM WEIGHTS (--random-init --seed {config.seed}): outputs are meaningless; "
            "for tests and benchmarks only")
    else:
        W.load_needed(model, state, str(path))
        info = {"random_init": False, "source": "file" if config.ckpt else "huggingface_hub", "file": path.name,
                "sha256": sha256_file(path)}
        if not config.ckpt:
            info["repo_id"] = W.HUB_CHECKPOINTS[config.size][0]
    for name, chosen in config.bands.items():
        if name not in raw:
            raise ExportError(f"--bands names {name}, which is not among --modalities {' '.join(names)}")
        select_bands(model.embedding(name), get_modality(name).bands, chosen)
    return model.eval(), generation, info


def coords_tokenizer_path(config: ExportConfig, log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The coords tokenizer file (a vocabulary, not weights: --random-init needs it too)."""
    path = config.tokenizer_ckpts.get(COORDS.name)
    source = "file" if path else "huggingface_hub"
    path = Path(path) if path else W.hub_tokenizer(COORDS.name)
    log(f"tokenizer coords: {path}")
    if not path.is_file():
        raise W.WeightsError(f"coords tokenizer file {path} does not exist")
    info = {"source": source, "file": path.name, "sha256": sha256_file(path)}
    if source == "huggingface_hub":
        info["repo_id"] = W.HUB_TOKENIZERS[COORDS.name][0]
    return path, info


@dataclass
class TokenizerSource:
    """Where one tokenizer's weights come from: a checkpoint ``path``, or random with ``seed``."""
    name: str
    config: TokenizerConfig
    path: Path | None
    seed: int
    info: dict


def tokenizer_sources(config: ExportConfig, targets: list[str],
                      log: Callable[[str], None] = print) -> list[TokenizerSource]:
    """Check the tokenizer options and find every target's checkpoint (``--tokenizer-ckpt``, the HF
    hub) without reading it: the export loads one tokenizer at a time, when its graphs are due."""
    if config.tokenizer_size not in ("official", "small"):
        raise ExportError(f"tokenizer size must be 'official' or 'small', got {config.tokenizer_size!r}")
    if config.tokenizer_size == "small" and not config.random_init:
        raise ExportError("small tokenizers exist only with --random-init (no checkpoint has that shape)")
    targets = [t for t in targets if t != COORDS.name]  # coords' file: see coords_tokenizer_path
    unknown = sorted(set(config.tokenizer_ckpts) - set(targets) - {COORDS.name})
    if unknown:
        raise ExportError(f"--tokenizer-ckpt names {', '.join(unknown)}, which is neither an output modality "
                          "nor a tokenised input (LULC, NDVI, coords)")
    sources = []
    for i, name in enumerate(targets):
        changes = SMALL_TOKENIZER if config.tokenizer_size == "small" else {}
        cfg = tokenizer_config(name, image_size=config.image_size, **changes)
        path = config.tokenizer_ckpts.get(name)
        seed = config.seed * 1000 + 17 * (i + 1)
        if path is None and config.random_init:
            sources.append(TokenizerSource(name, cfg, None, seed, {"random_init": True, "size": config.tokenizer_size}))
            continue
        source = "file" if path else "huggingface_hub"
        path = Path(path) if path else W.hub_tokenizer(name)
        log(f"tokenizer {name}: {path}")
        if not path.is_file():
            raise W.WeightsError(f"checkpoint {path} does not exist")
        sources.append(TokenizerSource(name, cfg, path, seed, {"random_init": False, "source": source,
                                                                 "file": path.name, "sha256": sha256_file(path)}))
    return sources


def load_tokenizer_from(source: TokenizerSource) -> Tokenizer:
    if source.path is None:
        # Random values drawn straight into the built modules (what loading ``W.random_state``
        # would give, without a second copy of the weights).
        tok = build_tokenizer(source.config)
        with torch.no_grad():
            for tensor, value in W.random_values(tok.state_dict(), seed=source.seed):
                if value is not tensor:
                    tensor.copy_(value)
        return tok.eval()
    try:
        return load_tokenizer(source.name, W.read_state_dict(source.path), source.config).eval()
    except ValueError as exc:
        raise W.WeightsError(f"{source.path}: {exc}") from exc


def build_tokenizers(config: ExportConfig, targets: list[str],
                     log: Callable[[str], None] = print) -> tuple[dict[str, Tokenizer], dict]:
    """The tokenizer of every target, all at once: from --tokenizer-ckpt, the HF hub, or random
    (with --random-init)."""
    sources = tokenizer_sources(config, targets, log)
    return {s.name: load_tokenizer_from(s) for s in sources}, {s.name: s.info for s in sources}


def _trace(spec: GraphSpec, path: Path, opset: int) -> WeightlessModel:
    # Batch 2: the exporter may specialise a dimension of size 1 (and 0).
    dummy = spec.sample(2, torch.Generator().manual_seed(1))
    axes = {d.name: d.dynamic_axes() for d in spec.inputs + spec.outputs if d.dynamic_axes()}
    return streaming.trace(spec.module, dummy, path, input_names=[d.name for d in spec.inputs],
                           output_names=[d.name for d in spec.outputs], dynamic_axes=axes, opset_version=opset,
                           do_constant_folding=True)


def name_outputs(spec: GraphSpec, model: onnx.ModelProto) -> None:
    """Give every graph output its declared name.

    The exporter folds a constant output (e.g. the batch-independent ``emb`` table) into an
    initializer and names it after the folded node; an Identity restores the contract's name.
    """
    for value, decl in zip(model.graph.output, spec.outputs):
        if value.name != decl.name:
            model.graph.node.append(onnx.helper.make_node("Identity", [value.name], [decl.name],
                                                          name=f"name_{decl.name}"))
            value.name = decl.name


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def check_dims(spec: GraphSpec, model: onnx.ModelProto) -> None:
    """Make the saved graph's I/O dims the declared ones, or fail if the exporter specialised one.

    A declared symbolic dim saved as a number means the exporter baked in the sample's size: an
    error. The legacy exporter also names output dims it could not infer (``Addtokens_dim_1``):
    those get the declared name or value (validation at two batch sizes checks the real shapes).
    """
    declared = {d.name: d for d in spec.inputs + spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        decl = declared.get(value.name)
        if decl is None:
            continue
        dims = value.type.tensor_type.shape.dim
        got = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims)
        if len(got) != len(decl.shape) or any(isinstance(w, str) and isinstance(g, int) and g > 0
                                              for g, w in zip(got, decl.shape)):
            raise ExportError(f"graph {spec.name}: {value.name} was saved with shape {got}, declared {decl.shape} "
                              "(the exporter specialised a dimension)")
        for dim, want in zip(dims, decl.shape):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def release_weights(modules: list[torch.nn.Module], keep: set[int]) -> None:
    """Free the parameters and buffers of ``modules`` (moved to the meta device: the modules keep
    their structure) except those whose ``id`` is in ``keep`` (later graphs need them)."""
    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                for name, param in sub._parameters.items():
                    if param is not None and id(param) not in keep and not param.is_meta:
                        sub._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                                   requires_grad=param.requires_grad)
                for name, buf in sub._buffers.items():
                    if buf is not None and id(buf) not in keep and not buf.is_meta:
                        sub._buffers[name] = torch.empty_like(buf, device="meta")


def _tensor_ids(specs: list[GraphSpec]) -> set[int]:
    modules = [m for s in specs for m in (s.module, s.reference) if m is not None]
    return {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}


def export_graph(spec: GraphSpec, workdir: Path, config: ExportConfig, log: Callable[[str], None],
                 keep: set[int] | None = None) -> dict:
    """Export, save and validate one graph. With ``keep`` (ids of the tensors later graphs use),
    the graph's other torch weights are freed once the reference outputs are computed, before
    ONNX Runtime loads the saved graph; without, nothing is freed."""
    start = time.perf_counter()
    # Its own directory: a graph over 2 GB is traced with one external file per tensor, which must
    # not end up beside the final graphs.
    trace_dir = workdir / f".trace-{spec.name}"
    trace_dir.mkdir()
    with step("trace", graph=spec.name):
        graph = _trace(spec, trace_dir / "raw.onnx", config.opset)
    shutil.rmtree(trace_dir)
    if spec.reference is not None:
        # The traced rewrite (Winograd: 4x the convolution weights) is in ``graph`` now and
        # validation runs the reference: let its own tensors go once they are saved.
        spec.module = spec.reference
    name_outputs(spec, graph.model)
    # Weights are graph inputs here: the passes below see the (small) graph alone.
    streaming.deduplicate(graph)
    simplified = False
    if config.simplify:
        try:
            with step("simplify"):
                graph.model = _simplify(graph.model)
            graph.order_by_first_use()  # onnxslim's order, had it held the weights
            simplified = True
        except Exception as exc:  # onnxslim fails on some big graphs; the traced graph is still valid
            log(f"  {spec.name}: simplification failed ({exc}); keeping the traced graph")
    streaming.prune(graph)
    check_dims(spec, graph.model)
    precision = config.precision if spec.allow_reduced_precision and config.precision != "int8" else "fp32"
    if precision == "fp16":
        with step("fp16"):
            # Shapes inferred while the weights are still graph inputs (a weightless protobuf to
            # copy, not the whole model four times); the conversion needs the weights in place.
            graph.model = onnx.shape_inference.infer_shapes(graph.model)
            order = graph.order
            graph = streaming.detach(to_fp16(streaming.attach(graph), shapes_inferred=True))
            graph.order = order
    path = workdir / spec.file
    with step("save"):
        external = streaming.save(graph, path, config.external_data_threshold)
    del graph
    release_memory()  # the protobuf and fp16 arrays freed in small blocks that glibc would keep
    entry = {
        "file": spec.file, "sha256": sha256_file(path),
        "external_data": [{"file": f, "sha256": sha256_file(workdir / f)} for f in external],
        "opset": config.opset, "simplified": simplified,
        "inputs": [d.to_json() for d in spec.inputs], "outputs": [d.to_json() for d in spec.outputs],
        "precision": precision,
        "max_rel_error": config.max_rel_error or (FP16_MAX_REL_ERROR if precision == "fp16" else spec.max_rel_error),
        **spec.extra,
    }
    msg = f"exported in {time.perf_counter() - start:.1f}s"
    if config.validate:
        t0 = time.perf_counter()
        with step("validate"):
            modules = [m for m in (spec.module, spec.reference) if m is not None]

            def release() -> None:
                # The reference's weights (and the activations of its runs, in glibc's free lists)
                # back to the OS before ONNX Runtime loads the graph's.
                release_weights(modules, keep)
                release_memory()

            errors = validate_graph(spec, str(path), release=None if keep is None else release)
            result = summarize(errors, entry["max_rel_error"], spec.max_mismatch)
        entry["validation"] = result
        extra = ""
        if "argmax_agreement" in result:
            extra += f", argmax agreement {result['argmax_agreement']:.4f}"
        if "min_psnr_db" in result and spec.extra.get("role") == "diffusion_step":
            extra += f", PSNR {result['min_psnr_db']:.1f} dB"
        if "max_mismatch" in result:
            extra += f", quantised mismatch {result['max_mismatch']:.1e} (tolerance {spec.max_mismatch:.0e})"
        msg += (f", validated in {time.perf_counter() - t0:.1f}s: max abs {result['max_abs']:.2e}, "
                f"max rel {result['max_rel']:.2e} (tolerance {entry['max_rel_error']:.0e}){extra} "
                f"{'OK' if result['passed'] else 'FAILED'}")
    log(f"  {spec.name}: {msg}")
    return entry


def _resources(started: float | None) -> dict:
    """What the export cost so far: wall time and the exporting process's peak RSS (``tm-bench``
    reports them with the runtime's; the peak is the process's, so it includes whatever ran
    before ``export`` in the same process). ``write_export`` replaces both with the final figures."""
    out = {}
    if started is not None:
        out["seconds"] = round(time.perf_counter() - started, 1)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _manifest(config: ExportConfig, model: TerraMindModel, weights: dict, graphs: dict,
              tokenizers: dict[str, Tokenizer] | None = None, files: dict | None = None,
              started: float | None = None) -> dict:
    variant = model.variant
    modalities = {}
    for name in (get_modality(m).name for m in config.modalities if not is_coords(m)):
        mod = get_modality(name)
        bands = config.bands.get(name, list(mod.bands))
        idx = [mod.bands.index(b) for b in bands]
        modalities[name] = {"key": mod.key, "graph": f"embed_tok_{name}" if mod.tokenized else f"embed_{name}",
                            "channels": len(bands), "bands": bands,
                            "mean": [mod.mean[i] for i in idx], "std": [mod.std[i] for i in idx]}
        if mod.tokenized:
            modalities[name].update({"tokenized": True, "tokenize_graph": f"tokenize_{name}"})
    targets = {}
    for name in model.targets:
        t = get_target(name)
        tok_cfg = tokenizers[name].config if tokenizers and name in tokenizers else None
        targets[name] = {"key": t.key, "query_graph": query_graph_name(name), "head_graph": head_graph_name(name),
                         "vocab_size": t.vocab_size,
                         "fsq_levels": list(t.fsq_levels), "tokenizer_decoder": t.decoder,
                         "channels": t.num_channels, "mean": list(t.mean), "std": list(t.std),
                         "tokenize_graph": f"tokenize_{name}",
                         "unet_graph": f"unet_{name}" if t.decoder == "diffusion" else None,
                         "detokenize_graph": f"detokenize_{name}" if t.decoder == "vit" else None,
                         "condition_graph": f"embed_tok_{name}" if name in model.conditioning else None,
                         "tokenizer_config": dataclasses.asdict(tok_cfg) if tok_cfg else None}
    validated = [g["validation"] for g in graphs.values() if "validation" in g]
    coords = None
    if model.coords_input or model.coords_target:
        coords = {"key": COORDS.key, "input": model.coords_input, "output": model.coords_target,
                  "embed_graph": "embed_coords" if model.coords_conditioning else None,
                  "query_graph": query_graph_name(COORDS.name) if model.coords_target else None,
                  "head_graph": head_graph_name(COORDS.name) if model.coords_target else None,
                  "masked_bias": MASKED_BIAS,
                  "tokenizer_file": COORDS_TOKENIZER_FILE, "vocab_size": COORDS.vocab_size,
                  "max_length": COORDS.max_length, "eos_id": COORDS.eos_id, "start_id": COORDS.start_id,
                  "end_id": COORDS.end_id, "grid_degrees": COORDS.grid_degrees,
                  "text_format": "lat={lat:.2f} lon={lon:.2f} [EOS]"}
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "precision": config.precision,
        "model": {"name": f"terramind_v1_{variant.name}", "size": variant.name, "dim": variant.dim,
                  "num_heads": variant.num_heads, "encoder_depth": variant.encoder_depth,
                  "decoder_depth": variant.decoder_depth,
                  "mlp": "swiglu" if variant.gated_mlp else "gelu", "patch_size": 16,
                  "image_size": config.image_size, "tokens_per_modality": (config.image_size // 16) ** 2},
        "weights": weights,
        "modalities": modalities,
        "targets": targets,
        "coords": coords,
        "files": files or {},
        # The DiVAE tokenizers' DDIM scheduler (tm_runtime.scheduler implements exactly this).
        "scheduler": {"type": "DDIM", "num_train_timesteps": 1000, "beta_schedule": "linear",
                      "beta_start": 1e-4, "beta_end": 0.02, "rescale_zero_terminal_snr": True,
                      "timestep_spacing": "trailing", "prediction_type": "sample",
                      "clip_sample_range": 1.0, "eta": 0.0, "set_alpha_to_one": True},
        "encoder": {"graph": "encoder", "outputs": [o["name"] for o in graphs["encoder"]["outputs"]],
                    "last_output_normed": True},
        # One decoder transformer for every output: target -> its query graph -> decoder -> its head graph.
        "decoder": {"graph": DECODER_GRAPH} if DECODER_GRAPH in graphs else None,
        "graphs": graphs,
        "validation": ({"run": True, "provider": "CPUExecutionProvider", "batches": [1, 3],
                        "passed": all(v["passed"] for v in validated)} if config.validate else {"run": False}),
        "exporter": {**_versions(), "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     **_resources(started)},
    }


def export(config: ExportConfig, log: Callable[[str], None] = print) -> dict:
    """Export every graph of ``config`` into ``config.out``; returns the manifest."""
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    check_precision(config.precision)
    if config.precision == "int8":
        from .quantize import check_int8_config
        check_int8_config(config)
    if config.winograd not in (0,) + TILE_SIZES:
        raise ExportError(f"--winograd tile must be one of {TILE_SIZES}, got {config.winograd}")
    if config.winograd and config.precision != "fp32":
        raise ExportError("--winograd is for fp32 graphs on ONNX Runtime CPU; fp16 Winograd loses too much "
                          "precision (and GPU runtimes choose Winograd kernels themselves)")
    start, window = time.perf_counter(), PeakWindow()
    with step("reference model", graph="-"):
        model, generation, weights = build_models(config, log)
    tokenized = [get_modality(m).name for m in config.modalities if not is_coords(m) and get_modality(m).tokenized]
    outputs = tim.output_names(config.output_modalities)  # TiM modalities need no tokenizer decoder
    needed = [t for t in model.targets if t in outputs] + [n for n in tokenized if n not in outputs]
    if COORDS.name in config.tokenizer_ckpts and not (model.coords_input or model.coords_target):
        raise ExportError("--tokenizer-ckpt names coords, which is neither in --modalities nor in --output-modalities")
    if model.coords_input or model.coords_target:
        needed.append(COORDS.name)
        coords_file, coords_info = coords_tokenizer_path(config, log)
        try:
            CoordsTokenizer(coords_file)  # fails on a file that does not fit TerraMind's coords vocabulary
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
    sources = tokenizer_sources(config, needed, log)
    weights["tokenizers"] = {s.name: s.info for s in sources}
    if COORDS.name in needed:
        weights["tokenizers"][COORDS.name] = coords_info
    tim_specs, tim_renames = tim.generation_specs(model, generation)
    specs = all_specs(model) + tim_specs
    count = len(specs) + sum(2 if s.name in outputs else 1 for s in sources)
    tokenizers: dict[str, Tokenizer] = {}  # (weightless once exported) the manifest reads their configs

    def stages() -> Iterator[list[GraphSpec]]:
        # TerraMind's graphs first; then the tokenizers, loaded one at a time when their graphs
        # are due (one tokenizer's weights in memory, never all of them).
        nonlocal specs
        yield specs
        del specs
        for m in (model, generation):
            if m is not None:
                m.to("meta")  # what no graph used
        release_memory(collect=True)
        for source in sources:
            with step("load tokenizer", graph=source.name):
                tok = load_tokenizer_from(source)
            tokenizers[source.name] = tok
            yield tokenizer_specs(source.name, tok, decoder=False)  # the encoder graph
            if source.name in outputs:  # the decoder graph; its Winograd rewrite made only now
                with step("decoder spec (Winograd rewrite)" if config.winograd else "decoder spec", graph=source.name):
                    decoders = tokenizer_specs(source.name, tok, winograd=config.winograd)[1:]
                yield decoders
            del tok
            release_memory(collect=True)

    copies = {"coords_tokenizer": (coords_file, COORDS_TOKENIZER_FILE)} if COORDS.name in needed else {}

    def make_manifest(graphs: dict, files: dict) -> dict:
        manifest = _manifest(config, model, weights, graphs, tokenizers, files, started=start)
        if config.tim:
            manifest["tim"] = tim.tim_manifest(config.tim, tim_renames, generation is not None)
            tim.mark_tim_only_targets(manifest["targets"], config.tim, outputs, graphs)
        return manifest

    return write_export(out, stages(), config, make_manifest, log, copies, count=count, started=start,
                        window=window)


def memory_bound_bytes(export_bytes: int) -> int:
    """The most an export may take at its peak (RSS): twice the bytes it writes, plus 1.5 GB for
    the interpreter, torch, ONNX Runtime and activations (issues 11 and 12)."""
    return 2 * export_bytes + 1_500_000_000


def write_export(out: Path, specs: list[GraphSpec] | Iterable[list[GraphSpec]], config: ExportConfig,
                 make_manifest: Callable[[dict, dict], dict], log: Callable[[str], None] = print,
                 copies: dict[str, tuple[Path, str]] | None = None, count: int | None = None,
                 started: float | None = None, window: PeakWindow | None = None) -> dict:
    """Export ``specs`` into a temporary directory beside ``out``, copy ``copies`` ({key: (source,
    file name)}) into it, write ``make_manifest(graphs, files)``, and rename it to ``out`` only if
    every graph validated: nothing half-written is ever left at ``out``. Returns the manifest.

    ``specs``: a list of specs (emptied as they are exported), or stages (lists of specs, e.g. from
    a generator that loads a model only when its stage is due) that share no weights with each
    other. Within a stage, a graph's weights are freed as soon as no later graph of the stage needs
    them (the modules keep their structure, on the meta device). ``count``: how many graphs in all,
    for the log. The export's peak RSS (from ``window`` on, or from this call) and seconds (from
    ``started``) go into the manifest's ``exporter`` and ``validation`` sections."""
    window = window or PeakWindow()
    stages = [specs] if isinstance(specs, list) and all(isinstance(s, GraphSpec) for s in specs) else specs
    total = f"/{count}" if count else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        graphs = {}
        for stage in stages:
            while stage:  # a graph's spec (and the weights only it uses) go once it is done
                spec = stage.pop(0)
                log(f"[{len(graphs) + 1}{total}] {spec.name}")
                keep = _tensor_ids(stage)
                graphs[spec.name] = export_graph(spec, workdir, config, log, keep=keep)
                release_weights([m for m in (spec.module, spec.reference) if m is not None], keep)
                del spec
                release_memory()
            del stage
        files = {}
        for key, (source, name) in (copies or {}).items():
            shutil.copyfile(source, workdir / name)
            files[key] = {"file": name, "sha256": sha256_file(workdir / name)}
        manifest = make_manifest(graphs, files)
        (workdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        failed = [n for n, g in graphs.items() if not g.get("validation", {"passed": True})["passed"]]
        if failed:
            raise ValidationFailed(f"graph(s) over tolerance: {', '.join(failed)}; nothing written to {out}")
        if config.precision == "int8":  # quantise the validated fp32 graphs, then gate them
            from .quantize import quantize_export
            with step("int8 quantise + gates", graph="-"):
                manifest = quantize_export(workdir, config.calibration_data, config.gate_data, config.int8_method,
                                           seed=config.seed, families=config.int8_graphs, log=log,
                                           tile_scale=config.tile_scale, fc2=config.int8_fc2)
        # What the export needed, for its users' machines (tests/test_export_memory.py checks the bound).
        written = sum(p.stat().st_size for p in workdir.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
        peak = window.close()
        manifest.setdefault("exporter", {})["peak_rss_bytes"] = peak
        if started is not None:
            manifest["exporter"]["seconds"] = round(time.perf_counter() - started, 1)
        manifest.setdefault("validation", {}).update(peak_rss_bytes=peak, export_bytes=written,
                                                     memory_bound_bytes=memory_bound_bytes(written))
        (workdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(workdir, out)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        window.close()
        raise
    seconds = f" in {time.perf_counter() - started:.1f}s" if started is not None else ""
    log(f"wrote {len(graphs)} graphs ({written / 1e9:.2f} GB) to {out}{seconds}; peak RSS {peak / 1e9:.2f} GB "
        f"(bound 2 x bytes + 1.5 GB = {memory_bound_bytes(written) / 1e9:.2f} GB)")
    return manifest


def _replace(workdir: Path, out: Path) -> None:
    """Move the finished export into place; an existing --out is only removed after that worked."""
    os.chmod(workdir, 0o755)  # mkdtemp creates it 0700
    if not out.exists():
        workdir.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    workdir.rename(out)
    shutil.rmtree(old, ignore_errors=True)
