"""ONNX Runtime on CUDA with IOBinding: inputs bound once per call (host arrays are copied to the GPU by
ORT, OrtValues / device pointers are used in place) and outputs left on the GPU, so ``run_device``
can chain graphs without host round trips; ``run`` keeps OrtBackend's protocol.

``enable_cuda_graph=True`` turns on the CUDA EP's graph capture. ORT requires fixed input/output
device addresses and shapes for that, so each (graph, input shapes) gets its own pre-allocated
OrtValues and its own ``gpu_graph_id``; host inputs are copied into them with ``update_inplace``.
It needs every node on the CUDA EP (session creation fails otherwise) and the manifest to size
the outputs.

Needs ``onnxruntime-gpu`` (``pip install 'tm-deploy[gpu]'``); checked when the backend is created.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..manifest import Manifest
from ..trt.device import DeviceArray
from .onnxruntime import make_session_options

CUDA_EP = "CUDAExecutionProvider"
ORT_GPU_MISSING = ("onnxruntime has no CUDAExecutionProvider here (available: {available}); install "
                   "onnxruntime-gpu (pip install 'tm-deploy[gpu]', after uninstalling the CPU-only onnxruntime) "
                   "with a matching CUDA and cuDNN")
Feed = np.ndarray | ort.OrtValue | DeviceArray


def _multi_graph_support() -> bool:
    """``gpu_graph_id`` (several captured graphs per session) arrived in onnxruntime 1.17."""
    major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    return (major, minor) >= (1, 17)


def _shape(value: Feed) -> tuple[int, ...]:
    # OrtValue.shape is a method; numpy and DeviceArray have an attribute.
    shape = value.shape() if isinstance(value, ort.OrtValue) else value.shape
    return tuple(int(d) for d in shape)


class OrtCudaUnavailable(RuntimeError):
    """onnxruntime-gpu (the CUDA execution provider) is not installed."""


def check_cuda_ep() -> None:
    available = ort.get_available_providers()
    if CUDA_EP not in available:
        raise OrtCudaUnavailable(ORT_GPU_MISSING.format(available=", ".join(available)))


@dataclass
class _StaticBinding:
    """Pre-allocated device buffers for one input-shape signature (CUDA-graph mode)."""

    graph_id: int
    binding: Any
    inputs: dict[str, ort.OrtValue]
    outputs: dict[str, ort.OrtValue]
    run_options: ort.RunOptions


class OrtCudaBackend:
    """Sessions on the CUDA EP, created on first use.

    Args:
        graph_paths: graph name -> ONNX file.
        manifest: needed with ``enable_cuda_graph`` (output shapes) and used for input dtypes.
        device_id: CUDA device.
        cuda_options: extra CUDA EP options (e.g. ``{"cudnn_conv_algo_search": "HEURISTIC"}``).
        enable_cuda_graph: capture/replay CUDA graphs (static shapes per signature).
        cpu_fallback: also register the CPU EP (not allowed with CUDA graphs).
        before_first_use: called with a graph's name before its session is created.
    """

    def __init__(self, graph_paths: Mapping[str, Path], manifest: Manifest | None = None, device_id: int = 0,
                 cuda_options: Mapping[str, Any] | None = None, enable_cuda_graph: bool = False,
                 cpu_fallback: bool = True, threads: int | None = None,
                 before_first_use: Callable[[str], None] | None = None) -> None:
        check_cuda_ep()
        self._before_first_use = before_first_use  # e.g. the sha256 check of the graph's files
        if enable_cuda_graph and manifest is None:
            raise ValueError("enable_cuda_graph needs the manifest to pre-allocate outputs")
        self._paths = dict(graph_paths)
        self.manifest = manifest
        self.device_id = device_id
        self.enable_cuda_graph = enable_cuda_graph
        options = {"device_id": str(device_id), **{k: str(v) for k, v in (cuda_options or {}).items()}}
        if enable_cuda_graph:
            options["enable_cuda_graph"] = "1"
        self._providers: list[Any] = [(CUDA_EP, options)]
        if cpu_fallback and not enable_cuda_graph:  # a CPU node would break graph capture
            self._providers.append("CPUExecutionProvider")
        self._threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._static: dict[tuple, _StaticBinding] = {}
        self._lock = threading.RLock()
        self.session_seconds: dict[str, float] = {}

    def session(self, name: str) -> ort.InferenceSession:
        sess = self._sessions.get(name)
        if sess is None:
            with self._lock:
                sess = self._sessions.get(name)
                if sess is None:
                    if self._before_first_use is not None:
                        self._before_first_use(name)
                    start = time.perf_counter()
                    sess = ort.InferenceSession(str(self._paths[name]), providers=self._providers,
                                                sess_options=make_session_options(self._threads))
                    if CUDA_EP not in sess.get_providers():
                        raise OrtCudaUnavailable(f"{name}: the session did not get the CUDA EP "
                                                 f"({sess.get_providers()}); check CUDA/cuDNN libraries")
                    self.session_seconds[name] = time.perf_counter() - start
                    self._sessions[name] = sess
        return sess

    # -- binding helpers --------------------------------------------------------------------
    def _input_dtype(self, name: str, inp: str, value: np.ndarray) -> np.dtype:
        if self.manifest is not None:
            for s in self.manifest.graph(name).inputs:
                if s.name == inp:
                    return np.dtype(s.dtype)
        return value.dtype

    def _bind_input(self, binding: Any, graph: str, inp: str, value: Feed) -> None:
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(inp, value)
        elif isinstance(value, DeviceArray):  # e.g. a TensorRT output: used in place
            binding.bind_input(inp, "cuda", self.device_id, np.dtype(value.dtype).type, list(value.shape), value.ptr)
        else:
            binding.bind_cpu_input(inp, np.ascontiguousarray(value, dtype=self._input_dtype(graph, inp, value)))

    def _output_shapes(self, name: str, feeds: Mapping[str, Feed]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Output shapes from the manifest's symbolic dims, read off the input shapes."""
        entry = self.manifest.graph(name)
        dims: dict[str, int] = {}
        for s in entry.inputs:
            for d, v in zip(s.shape, _shape(feeds[s.name])):
                if isinstance(d, str):
                    dims[d] = int(v)
        return {s.name: (tuple(dims[d] if isinstance(d, str) else d for d in s.shape), np.dtype(s.dtype))
                for s in entry.outputs}

    def _static_binding(self, name: str, feeds: Mapping[str, Feed]) -> _StaticBinding:
        shapes = tuple((k, _shape(v)) for k, v in sorted(feeds.items()))
        key = (name, shapes)
        sb = self._static.get(key)
        if sb is None:
            if self._static and not _multi_graph_support():
                raise ValueError(f"{name}: onnxruntime {ort.__version__} captures one CUDA graph per session "
                                 "(gpu_graph_id needs >= 1.17); use one input shape or enable_cuda_graph=False")
            sess, dev = self.session(name), self.device_id
            inputs = {}
            for s in self.manifest.graph(name).inputs:
                shape = dict(shapes)[s.name]
                inputs[s.name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(s.dtype).type, "cuda", dev)
            outputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype.type, "cuda", dev)
                       for n, (shape, dtype) in self._output_shapes(name, feeds).items()}
            binding = sess.io_binding()
            for n, v in inputs.items():
                binding.bind_ortvalue_input(n, v)
            for n, v in outputs.items():
                binding.bind_ortvalue_output(n, v)
            opts = ort.RunOptions()
            graph_id = len(self._static) + 1  # ids > 0 are captured; -1 would skip capture
            opts.add_run_config_entry("gpu_graph_id", str(graph_id))
            sb = self._static[key] = _StaticBinding(graph_id, binding, inputs, outputs, opts)
        return sb

    # -- running ----------------------------------------------------------------------------
    def run_device(self, name: str, feeds: Mapping[str, Feed],
                   outputs: list[str] | None = None) -> dict[str, ort.OrtValue]:
        """Run one graph; returns its outputs as OrtValues on the GPU (``.numpy()`` copies to host).
        In CUDA-graph mode the OrtValues are the pre-allocated buffers of this shape signature and
        are overwritten by the next run with the same shapes."""
        sess = self.session(name)
        if self.enable_cuda_graph:
            with self._lock:
                sb = self._static_binding(name, feeds)
                for n, v in feeds.items():
                    if isinstance(v, np.ndarray):
                        sb.inputs[n].update_inplace(np.ascontiguousarray(v, dtype=self._input_dtype(name, n, v)))
                    else:
                        raise TypeError(f"{name}.{n}: CUDA-graph mode takes host arrays (copied into its fixed "
                                        "buffers); device inputs would change the captured addresses")
                sess.run_with_iobinding(sb.binding, sb.run_options)
                wanted = outputs or list(sb.outputs)
                return {n: sb.outputs[n] for n in wanted}
        binding = sess.io_binding()
        for n, v in feeds.items():
            self._bind_input(binding, name, n, v)
        wanted = outputs or [o.name for o in sess.get_outputs()]
        for n in wanted:
            binding.bind_output(n, "cuda", self.device_id)  # ORT allocates; the result stays on the GPU
        sess.run_with_iobinding(binding)
        return dict(zip(wanted, binding.get_outputs()))

    def run(self, name: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """OrtBackend's protocol (host in, host out)."""
        return [v.numpy() for v in self.run_device(name, feeds, outputs).values()]

    # -- transfers (tm-bench times them apart from compute) -----------------------------------
    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)

    @staticmethod
    def to_host(value: ort.OrtValue) -> np.ndarray:
        return value.numpy()

    def synchronize(self) -> None:
        """Nothing to wait for: ORT synchronises the CUDA stream at the end of every run and copy."""

    def end_profiling(self) -> list[str]:
        return [s.end_profiling() for s in self._sessions.values()]
