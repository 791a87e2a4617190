"""OpenVINO backend: the export's ONNX graphs as they are, compiled once each by OpenVINO.

``run(name, feeds, outputs) -> list[np.ndarray]`` like ``OrtBackend``. Every graph is compiled on
first use (under a lock, so concurrent callers compile it once) with OpenVINO's model cache
(``CACHE_DIR``): a second process loads the compiled blob instead of converting and compiling the
ONNX file again. Each calling thread gets its own infer request per graph (an infer request is not
safe to share between threads; a compiled model is).

Precision is a request to the device (``INFERENCE_PRECISION_HINT``). OpenVINO quietly runs f32 when
the hardware lacks what was asked for; this backend does not: ``bf16`` / ``fp16`` are checked
against the device's ``OPTIMIZATION_CAPABILITIES`` before anything is compiled, and the compiled
model's precision is read back afterwards. Graphs whose outputs are rounded to integers (the FSQ
tokenizer encoders: ``quant`` and ``ids``) always run in f32: a value next to an FSQ rounding
boundary moves to the neighbouring level under bf16's 8-bit mantissa, which changes the token ids.
Under bf16 the image patch embeddings are compiled with their patchifying convolution rewritten
as a MatMul (``openvino_patchify``): OpenVINO 2026.4.1 computes such a convolution wrongly in bf16 on
AMX for 4 to 16 input channels (S2L2A's 12 bands: cosine 0.30 against f32); a patch embedding the
rewrite does not recognise runs in f32 instead. tests/openvino checks the bug is still there.

Needs ``openvino`` (``pip install 'tm-deploy[openvino]'``); imported only when this backend is chosen.
"""
from __future__ import annotations

import os
import re
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..embed_chain import EmbedChain

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIONS = ("device", "precision", "threads", "cache_dir", "static_shapes", "fuse_embed")
# Static compilations kept per graph; a graph called with more input shapes than this runs the rest on
# its dynamic compilation (each static one holds its own copy of the weights).
MAX_STATIC_SHAPES = 4
# Fused embed chains compiled per backend: each input order, choice of encoder outputs and input shape is
# one, with its own copy of the encoder's weights; beyond this, calls run their graphs one by one.
MAX_FUSED_MODELS = 4
# OpenVINO's names for our precisions: the hint value and the capability a device must report.
_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
# Roles (manifest ``role``) of graphs that always run in f32; graphs with integer outputs do too.
FP32_ROLES = ("tokenizer_encoder",)


# A graph's input shapes, as sorted (input name, shape) pairs: the key of a static compilation.
Shapes = tuple[tuple[str, tuple[int, ...]], ...]


class OpenVinoError(RuntimeError):
    """OpenVINO is missing, an option is invalid, or a graph could not be compiled."""


class PrecisionUnsupported(OpenVinoError):
    """The device cannot compute in the requested precision (OpenVINO would silently use f32)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tm-deploy" / "openvino"


@dataclass(frozen=True)
class OpenVinoOptions:
    """``backend_options`` of ``TerraMindRuntime(..., backend="openvino")``.

    device: "CPU" | "GPU" | "NPU" | "AUTO" (a numbered device such as "GPU.1" too).
    precision: "fp32" | "bf16" | "fp16" for every graph except those that must stay fp32.
    threads: inference threads per compiled graph (default: OpenVINO's choice).
    cache_dir: OpenVINO's model cache (default ``~/.cache/tm-deploy/openvino``); None/"" turns it off.
    static_shapes: compile the patch embeddings and the encoder for the input shapes they are called
      with (default True): OpenVINO's CPU kernels run them faster on static shapes (tiny embed ~11% on an
      AMX Xeon, see BENCHMARKS.md); the first call with a new shape compiles (up to ``MAX_STATIC_SHAPES``
      per graph). The other graphs stay dynamic: OpenVINO 2026.4.1 computes the decoder compiled for a
      single query (coords decoding) wrongly in bf16. False: one dynamic compilation per graph.
    fuse_embed: ``embed``, ``logits`` and a task's ``predict`` run their patch embeddings and the encoder
      as one compiled model (default True; see ``openvino_fuse``): faster at small sizes. Each such model
      (per input order, encoder outputs and input shape; at most ``MAX_FUSED_MODELS``) holds its own copy of
      the encoder's weights, besides the encoder's own compilations that generate uses.
    """

    device: str = "CPU"
    precision: str = "fp32"
    threads: int | None = None
    cache_dir: Path | None = None
    static_shapes: bool = True
    fuse_embed: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, Any], threads: int | None = None) -> "OpenVinoOptions":
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"backend_options for 'openvino' takes {', '.join(OPTIONS)}; unknown: {', '.join(unknown)}")
        device = str(options.get("device", "CPU"))
        if device.split(".")[0].upper() not in DEVICES:
            raise ValueError(f"openvino device must be one of {', '.join(DEVICES)} (or e.g. GPU.1), got {device!r}")
        device = device.upper()
        precision = options.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"openvino precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        threads = options.get("threads", threads)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"openvino threads must be a positive int, got {threads!r}")
        if "cache_dir" in options:
            raw = options["cache_dir"]
            cache = Path(raw) if raw else None
        else:
            cache = default_cache_dir()
        flags = {}
        for flag in ("static_shapes", "fuse_embed"):
            flags[flag] = options.get(flag, True)
            if not isinstance(flags[flag], bool):
                raise ValueError(f"openvino {flag} must be True or False, got {flags[flag]!r}")
        return cls(device, precision, threads, cache, **flags)


def _import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise OpenVinoError("backend='openvino' needs the openvino package: pip install 'tm-deploy[openvino]'") from exc
    return openvino


def keeps_fp32(entry: Mapping[str, Any]) -> bool:
    """Whether a manifest graph entry must run in f32 whatever the requested precision."""
    if entry.get("role") in FP32_ROLES:
        return True
    return any(not str(o.get("dtype", "float32")).startswith("float") for o in entry.get("outputs", ()))


def is_patch_embedding(entry: Mapping[str, Any]) -> bool:
    """Whether a manifest graph entry is a modality's image patch embedding (``embed_<MODALITY>``)."""
    return (entry.get("role") is None and "modality" in entry
            and any(i.get("name") == "image" for i in entry.get("inputs", ())))


def device_capabilities(core: Any, device: str) -> set[str]:
    try:
        return {str(c).upper() for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")}
    except RuntimeError:
        return set()


def check_device(core: Any, device: str) -> None:
    available = list(core.available_devices)
    if device != "AUTO" and device not in available and device.split(".")[0] not in {d.split(".")[0] for d in available}:
        raise OpenVinoError(f"OpenVINO device {device} is not available here (available: {', '.join(available) or 'none'})")


def check_precision_support(core: Any, device: str, precision: str) -> None:
    """Raise ``PrecisionUnsupported`` unless every device that may run the graphs computes in
    ``precision`` (for AUTO: every available device, since AUTO may pick any of them)."""
    if precision == "fp32":
        return
    wanted = _CAPABILITY[precision]
    devices = list(core.available_devices) if device == "AUTO" else [device]
    lacking = {d: sorted(device_capabilities(core, d)) for d in devices if wanted not in device_capabilities(core, d)}
    if lacking:
        what = "; ".join(f"{d} ({_full_name(core, d)}) reports {', '.join(caps) or 'nothing'}"
                         for d, caps in lacking.items())
        hint = " (bf16 needs AVX512_BF16 or AMX on an Intel/AMD CPU)" if precision == "bf16" else ""
        raise PrecisionUnsupported(
            f"precision {precision!r} is not supported here{hint}: {what}, no {wanted} in OPTIMIZATION_CAPABILITIES. "
            f"OpenVINO would silently run f32; use precision='fp32' (or an int8 export) on this machine")


def _full_name(core: Any, device: str) -> str:
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except RuntimeError:
        return device


_UNCONVERTED = re.compile(r"(?:No conversion rule found for operations|Failed to convert operations?|"
                          r"not supported(?: operations)?)\s*:\s*([^\n]+)", re.IGNORECASE)


def unsupported_operators(message: str) -> list[str]:
    """Operator names out of OpenVINO's conversion report ("No conversion rule found for operations: a, b")."""
    found: list[str] = []
    for match in _UNCONVERTED.finditer(message):
        found += [op.strip() for op in match.group(1).split(",") if op.strip()]
    return list(dict.fromkeys(found))


class OpenVinoBackend:
    """Compiles graphs on first use; ``run`` is safe to call from several threads at once."""

    def __init__(self, graph_paths: Mapping[str, Path], graph_entries: Mapping[str, Mapping[str, Any]] | None = None,
                 options: OpenVinoOptions | None = None, core: Any = None, encoder_graph: str = "encoder") -> None:
        self.options = options or OpenVinoOptions()
        self._paths = dict(graph_paths)
        entries = graph_entries or {}
        self.fp32_graphs = sorted(n for n in self._paths if keeps_fp32(entries.get(n, {})))
        self._patch_embeddings = {n for n in self._paths if is_patch_embedding(entries.get(n, {}))}
        self.rewritten: dict[str, list[str]] = {}  # graph -> its convolutions compiled as MatMuls
        self._static_graphs = self._patch_embeddings | ({encoder_graph} & set(self._paths))
        self.winograd_graphs = sorted(n for n in self._paths if entries.get(n, {}).get("winograd"))
        if self.winograd_graphs:
            warnings.warn(f"graphs {', '.join(self.winograd_graphs)} were exported with --winograd, a rewrite for "
                          "ONNX Runtime's CPU kernels; OpenVINO runs the direct convolutions faster (the base "
                          "sen1floods11 head in bf16 on an AMX Xeon: 9 ms direct, 46 ms Winograd). For this backend, "
                          "export without --winograd", stacklevel=3)
        # int8 graphs: OpenVINO runs static QDQ graphs' MatMuls in int8 (AMX-INT8 / VNNI), but has no
        # fast path for dynamic quantisation (DynamicQuantizeLinear + MatMulInteger).
        self.int8_graphs = {n: str(entries[n]["quantization"].get("method", "?")) for n in self._paths
                            if entries.get(n, {}).get("precision") == "int8" and entries[n].get("quantization")}
        dynamic = sorted(n for n, method in self.int8_graphs.items() if method == "dynamic")
        if dynamic:
            warnings.warn(f"graphs {', '.join(dynamic)} are dynamic int8 (MatMulInteger), which OpenVINO runs "
                          "several times slower than its bf16 (the base encoder on an AMX Xeon: 517 vs 126 ms "
                          "per embed). For this backend export with --precision int8 --int8-method static (its "
                          "QDQ MatMuls run in int8: 83 ms) or use the fp32 export", stacklevel=3)
        if core is None:
            core = _import_openvino().Core()
        self.core = core
        check_device(core, self.options.device)
        check_precision_support(core, self.options.device, self.options.precision)
        if self.options.cache_dir is not None:
            self.options.cache_dir.mkdir(parents=True, exist_ok=True)
        # (graph, input shapes or None for the dynamic compilation) -> compiled model
        self._compiled: dict[tuple[str, Shapes | None], Any] = {}
        self._outputs: dict[str, dict[str, int]] = {}
        self._chains: dict[str, EmbedChain] = {}  # embed chains compiled as one model, by key
        self._fused: set[tuple[str, Shapes | None]] = set()  # the fused models compiled or being compiled
        self.unfused: dict[str, str] = {}  # chain key -> why it runs graph by graph
        self._chain_lock = threading.Lock()  # guards the three above (``_lock`` guards compilation)
        self._lock = threading.Lock()
        self._local = threading.local()
        self.session_seconds: dict[str, float] = {}  # compile (or cache load) time per graph

    def precision_of(self, name: str) -> str:
        if name in self._chains:  # a fused chain computes in its encoder's precision (all members share it)
            return self.precision_of(self._chains[name].encoder)
        return "fp32" if name in self.fp32_graphs else self.options.precision

    def compile_config(self, name: str) -> dict[str, Any]:
        """The properties ``name`` is compiled with."""
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[self.precision_of(name)],
                                  "PERFORMANCE_HINT": "LATENCY"}
        if self.options.threads and self.options.device.startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        if self.options.cache_dir is not None:
            config["CACHE_DIR"] = str(self.options.cache_dir)
        return config

    def compiled(self, name: str, shapes: Shapes | None = None) -> Any:
        """``name`` compiled for ``shapes`` ((input, shape) pairs), or for any shape (None)."""
        key = (name, shapes)
        model = self._compiled.get(key)
        if model is not None:
            return model
        with self._lock:
            model = self._compiled.get(key)
            if model is None:
                if name not in self._paths and name not in self._chains:
                    raise KeyError(f"graph {name!r} is not in this export ({', '.join(self._paths)})")
                start = time.perf_counter()
                model = self._compile(name, shapes)
                self.session_seconds.setdefault(name, time.perf_counter() - start)
                self._outputs[name] = {n: i for i, port in enumerate(model.outputs) for n in port.get_names()}
                self._compiled[key] = model
        return model

    def _shapes_for(self, name: str, feeds: Mapping[str, np.ndarray]) -> Shapes | None:
        """The compilation a call runs on: its own static one, while the graph has room for it."""
        if not self.options.static_shapes or name not in self._static_graphs:
            return None
        shapes = tuple(sorted((k, tuple(np.shape(v))) for k, v in feeds.items()))
        if (name, shapes) in self._compiled:
            return shapes
        static = sum(1 for graph, s in list(self._compiled) if graph == name and s is not None)
        return shapes if static < MAX_STATIC_SHAPES else None

    @classmethod
    def from_manifest(cls, graph_paths: Mapping[str, Path], manifest: Any, options: Mapping[str, Any],
                      threads: int | None = None) -> "OpenVinoBackend":
        """The runtime's entry point: ``backend_options`` checked, graph roles from the manifest."""
        parsed = OpenVinoOptions.parse(options, threads)
        return cls(graph_paths, {name: g.raw for name, g in manifest.graphs.items()}, parsed,
                   encoder_graph=manifest.data["encoder"]["graph"])

    def session(self, name: str) -> Any:
        """What tm-bench calls to create engines before timing: the compilation calls will use. A graph
        compiled for static shapes is compiled at its first call, whose shapes are not known here, so
        nothing is compiled for it now (a dynamic compilation would never be used: time and memory
        for nothing); its compile time is recorded in ``session_seconds`` at that first call."""
        if name not in self._paths:
            raise KeyError(f"graph {name!r} is not in this export ({', '.join(self._paths)})")
        if self.options.static_shapes and name in self._static_graphs:
            return None
        return self.compiled(name)

    def _compile(self, name: str, shapes: Shapes | None = None) -> Any:
        if name in self._chains:
            return self._compile_chain(self._chains[name], shapes)
        path, device = self._paths[name], self.options.device
        source: Any = str(path)
        try:
            rewrite = self.precision_of(name) == "bf16" and name in self._patch_embeddings
            if rewrite or shapes:
                source = self.core.read_model(str(path))
                source.set_friendly_name(name)
                if rewrite:
                    self._bf16_patch_embedding(name, source)
                if shapes:
                    source.reshape({input_name: list(shape) for input_name, shape in shapes})
            model = self.core.compile_model(source, device, self.compile_config(name))
        except RuntimeError as exc:
            raise self._compile_error(name, path, exc) from exc
        self._check_precision(name, model)
        return model

    def _compile_chain(self, chain: EmbedChain, shapes: Shapes | None) -> Any:
        """The chain's graphs read, joined (``openvino_fuse``) and compiled as one model."""
        from .openvino_fuse import fuse_embed_chain
        from .openvino_patchify import rewrite_patchify_convolutions

        bf16 = self.precision_of(chain.key) == "bf16"

        def prepare(modality: str, model: Any) -> None:
            if shapes:
                model.reshape({"image": list(dict(shapes)[modality])})
            if bf16:  # see the module docstring
                replaced = rewrite_patchify_convolutions(model)
                if not replaced:
                    raise OpenVinoError(f"no patchifying convolution to rewrite for bf16 in {modality}'s embedding")
                self.rewritten[dict(chain.embeddings)[modality]] = replaced

        try:
            embeddings = [(m, self.core.read_model(str(self._paths[g]))) for m, g in chain.embeddings]
            fused = fuse_embed_chain(embeddings, self.core.read_model(str(self._paths[chain.encoder])),
                                     chain.outputs, prepare)
            fused.set_friendly_name(chain.key)
            model = self.core.compile_model(fused, self.options.device, self.compile_config(chain.key))
        except OpenVinoError:
            raise
        except Exception as exc:  # whatever OpenVINO's graph surgery raises: the graphs still run one by one
            raise OpenVinoError(f"embed chain {chain.key} cannot be compiled as one model: {exc}") from exc
        self._check_precision(chain.key, model)
        return model

    def fused_chain(self, chain: EmbedChain, shapes: Shapes | None = None) -> Any:
        """``chain`` compiled as one model for ``shapes`` (sorted (modality, shape) pairs, or None for any
        batch); None where it runs graph by graph: for good with the reason in ``unfused``, or for now
        when ``MAX_FUSED_MODELS`` are compiled already. A chain that fails to compile is reported once
        (a warning) and then runs graph by graph: slower, not wrong."""
        key = chain.key
        with self._chain_lock:
            if key in self.unfused:
                return None
            if (key, shapes) not in self._fused:
                reason = self._unfusable(chain)
                if reason:
                    self.unfused[key] = reason
                    return None
                if len(self._fused) >= MAX_FUSED_MODELS:
                    return None
                self._fused.add((key, shapes))
                self._chains[key] = chain
        try:
            return self.compiled(key, shapes)
        except OpenVinoError as exc:
            with self._chain_lock:
                first = key not in self.unfused
                self.unfused[key] = str(exc)
                self._fused -= {k for k in self._fused if k[0] == key}
            with self._lock:  # compilations of the key for other shapes: never used again
                for k in [k for k in self._compiled if k[0] == key]:
                    del self._compiled[k]
            if first:
                warnings.warn(f"{exc}; running its graphs one by one", stacklevel=4)
            return None

    def run_fused_chain(self, chain: EmbedChain, images: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
        """``chain`` as one compiled model (``fuse_embed``): its encoder outputs, then ``emb``; None when it
        is not to run as one model (the caller then runs its graphs one by one, see ``embed_chain``)."""
        feeds = {m: np.ascontiguousarray(images[m]) for m, _ in chain.embeddings}
        shapes = tuple(sorted((k, tuple(v.shape)) for k, v in feeds.items())) if self.options.static_shapes else None
        if self.fused_chain(chain, shapes) is None:
            return None
        return self._infer(chain.key, shapes, feeds, [*chain.outputs, "emb"])

    def _unfusable(self, chain: EmbedChain) -> str:
        """Why ``chain`` must run graph by graph ('' when it can be one model)."""
        if not self.options.fuse_embed:
            return "fuse_embed=False"
        missing = [g for g in chain.graphs if g not in self._paths]
        if missing:
            return f"graphs not in this export: {', '.join(missing)}"
        precisions = {g: self.precision_of(g) for g in chain.graphs}
        if len(set(precisions.values())) > 1:  # one model has one precision
            return "mixed precisions: " + ", ".join(f"{g} {p}" for g, p in precisions.items())
        return ""

    def _bf16_patch_embedding(self, name: str, model: Any) -> None:
        """Rewrites the graph's patchifying convolution as a MatMul (see the module docstring); a graph
        without one we recognise is compiled in f32 instead."""
        from .openvino_patchify import rewrite_patchify_convolutions

        replaced = rewrite_patchify_convolutions(model)
        if replaced:
            self.rewritten[name] = replaced
        else:
            self.fp32_graphs = sorted({*self.fp32_graphs, name})

    def _compile_error(self, name: str, path: Path, exc: Exception) -> OpenVinoError:
        message = str(exc)
        ops = unsupported_operators(message)
        if not ops:
            ops = self._unsupported_on_device(path)
        what = f"unsupported operator(s): {', '.join(ops)}" if ops else f"OpenVINO said: {message.strip()}"
        return OpenVinoError(f"graph {name!r} ({Path(path).name}) cannot be compiled by OpenVINO for "
                             f"{self.options.device}: {what}")

    def _unsupported_on_device(self, path: Path) -> list[str]:
        """Ops the device plugin rejects (the model converted, the device cannot run all of it)."""
        try:
            model = self.core.read_model(str(path))
            supported = self.core.query_model(model, self.options.device)
            return sorted({f"{op.get_type_name()} ({op.get_friendly_name()})" for op in model.get_ops()
                           if op.get_friendly_name() not in supported
                           and op.get_type_name() not in ("Parameter", "Result", "Constant")})
        except Exception:
            return []

    def _check_precision(self, name: str, model: Any) -> None:
        """The compiled model must compute in what was asked for (CPU reports it back)."""
        wanted = self.precision_of(name)
        if wanted == "fp32" or not self.options.device.startswith("CPU"):
            return
        try:
            got = _element_type_name(model.get_property("INFERENCE_PRECISION_HINT"))
        except RuntimeError:
            return
        if got != _HINT[wanted]:
            raise PrecisionUnsupported(f"graph {name!r}: asked OpenVINO for {wanted}, the compiled model runs {got}")

    def _request(self, name: str, shapes: Shapes | None) -> Any:
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get((name, shapes))
        if request is None:
            request = requests[(name, shapes)] = self.compiled(name, shapes).create_infer_request()
        return request

    def run(self, name: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        shapes = self._shapes_for(name, feeds)
        model = self.compiled(name, shapes)
        wanted = outputs if outputs is not None else [next(iter(p.get_names())) for p in model.outputs]
        return self._infer(name, shapes, feeds, wanted)

    def _infer(self, name: str, shapes: Shapes | None, feeds: Mapping[str, np.ndarray],
               wanted: list[str]) -> list[np.ndarray]:
        """One inference of the compiled ``(name, shapes)`` on this thread's request; copies of ``wanted``."""
        index = self._outputs[name]
        missing = [o for o in wanted if o not in index]
        if missing:
            raise KeyError(f"graph {name!r} has no output(s) {missing} (outputs: {', '.join(index)})")
        request = self._request(name, shapes)
        # share_inputs: OpenVINO reads the (contiguous) arrays in place instead of copying them in;
        # share_outputs: infer() returns views, not copies nobody reads (the copies are made below).
        request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_inputs=True, share_outputs=True)
        # Copies: the request's buffers are reused by its next call.
        return [np.array(request.get_output_tensor(index[o]).data) for o in wanted]

    def describe(self) -> dict[str, Any]:
        """Facts for benchmarks and reports."""
        core = self.core
        device = self.options.device
        return {"device": device, "full_device_name": _full_name(core, device),
                "optimization_capabilities": sorted(device_capabilities(core, device)),
                "precision": self.options.precision, "fp32_graphs": self.fp32_graphs,
                "convolutions_as_matmul": dict(self.rewritten),
                "threads": self.options.threads,
                "cache_dir": str(self.options.cache_dir) if self.options.cache_dir else None,
                "static_shapes": self.options.static_shapes, "winograd_graphs": self.winograd_graphs,
                "int8_graphs": dict(self.int8_graphs),
                "fuse_embed": self.options.fuse_embed, **self._chain_facts(),
                "openvino": _openvino_version()}

    def _chain_facts(self) -> dict[str, Any]:
        with self._chain_lock:
            return {"fused_chains": sorted({key for key, _ in self._fused} - set(self.unfused)),
                    "fused_models": len(self._fused), "unfused_chains": dict(self.unfused)}


# str() of an openvino.Type is "<Type: 'bfloat16'>"; its short name is what the hint was given as.
_LONG_TYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def _element_type_name(value: Any) -> str:
    """The short element type name ("bf16", "f32") of what OpenVINO reports back: an
    ``openvino.Type`` from a real compiled model, or a string."""
    get_name = getattr(value, "get_type_name", None)
    name = get_name() if callable(get_name) else str(value)
    name = name.strip().lower()
    return _LONG_TYPE_NAMES.get(name, name)


def _openvino_version() -> str:
    try:
        return _import_openvino().__version__
    except OpenVinoError:
        return "not installed"
