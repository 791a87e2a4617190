"""TensorRT backend: the OrtBackend protocol (``run(name, feeds, outputs) -> list[np.ndarray]``) over
serialised engines, plus ``run_device`` to keep tensors on the GPU.

How it runs (as TensorRT's diffusion demo does): every engine is deserialised once; every binding
gets a device buffer sized for the max profile, allocated once; all execution contexts share ONE
activation (scratch) allocation of max(device_memory_size), since graphs run one at a time on one
stream; a call sets input shapes and tensor addresses, then ``execute_async_v3``. With
``cuda_graphs=True`` each (graph, input shapes, input addresses) is captured once into a CUDA graph
and replayed, which removes the per-kernel launch cost for repeated static shapes (the DDIM loop).

``tensorrt`` and ``cuda-python`` are imported when a backend is created, never at module import.
Not thread-safe across calls by design (one stream, one shared scratch buffer): calls are
serialised by a lock.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import Manifest
from ..trt.device import DeviceArray

Feed = np.ndarray | DeviceArray
MAX_GRAPHS_PER_ENGINE = 16  # captured CUDA graphs kept per engine (each pins its shapes and addresses)


@dataclass
class _Binding:
    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    buffer: DeviceArray  # owned, sized for max_shape
    min_shape: tuple[int, ...] | None = None


@dataclass
class _Engine:
    name: str
    engine: Any
    context: Any
    bindings: dict[str, _Binding]
    device_memory_size: int
    graphs: dict[tuple, Any] = field(default_factory=dict)  # capture key -> cudaGraphExec_t
    capture_failed: bool = False

    @property
    def inputs(self) -> list[_Binding]:
        return [b for b in self.bindings.values() if b.is_input]

    @property
    def outputs(self) -> list[_Binding]:
        return [b for b in self.bindings.values() if not b.is_input]


def _np_dtype(trt: Any, dtype: Any) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError as exc:  # bf16 / fp8 I/O have no numpy type; our graphs keep fp32 I/O
        raise TypeError(f"TensorRT I/O dtype {dtype} has no numpy equivalent; export graphs with fp32 I/O") from exc


def _device_memory_size(engine: Any) -> int:
    # TensorRT >= 10.1 deprecates device_memory_size for device_memory_size_v2.
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


def _context_without_memory(trt: Any, engine: Any) -> Any:
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()  # TensorRT 8.x


def _set_device_memory(context: Any, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr


class TensorRTBackend:
    """Run TensorRT engines by graph name.

    Args:
        engines: graph name -> serialised engine file (``.plan``), e.g. from
            ``tm_runtime.trt.build.engine_paths`` or ``TensorRTBackend.from_export``.
        manifest: the export's manifest; when given, outputs are cast to its dtypes (so results
            match OrtBackend's) and feeds are checked against its input names.
        cuda_graphs: capture and replay CUDA graphs per (graph, shapes, addresses).
        share_activations: one scratch allocation for all contexts (default); False gives each
            context its own (TensorRT's static allocation).
        device: CUDA device index.
    """

    def __init__(self, engines: Mapping[str, str | Path | bytes], manifest: Manifest | None = None,
                 cuda_graphs: bool = False, share_activations: bool = True, device: int = 0) -> None:
        from ..trt import device as cu
        from ..trt.device import import_tensorrt, trt_logger
        from ..trt.profiles import activation_plan

        self._cu = cu
        self._trt = trt = import_tensorrt()
        cu.check(cu.cudart().cudaSetDevice(device), "cudaSetDevice")
        self.manifest = manifest
        self.cuda_graphs = cuda_graphs
        self._lock = threading.RLock()  # run() holds it around run_device()
        self.stream = cu.create_stream()
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engines: dict[str, _Engine] = {}
        self._scratch = 0
        raw = {}
        for name, src in engines.items():
            data = bytes(src) if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise RuntimeError(f"{name}: TensorRT could not deserialise the engine (built with another "
                                   "TensorRT version or GPU? rebuild with tm-build-engines)")
            raw[name] = engine
        self.activations = activation_plan({n: _device_memory_size(e) for n, e in raw.items()})
        if share_activations:
            self._scratch = cu.malloc(self.activations.shared_bytes)
        for name, engine in raw.items():
            if share_activations:
                context = _context_without_memory(trt, engine)
                _set_device_memory(context, self._scratch, self.activations.shared_bytes)
            else:
                context = engine.create_execution_context()
            if context is None:
                raise RuntimeError(f"{name}: could not create an execution context (out of device memory?)")
            self._engines[name] = _Engine(name, engine, context, self._allocate(engine, context),
                                          self.activations.per_engine[name])

    # -- set-up -----------------------------------------------------------------------------
    def _allocate(self, engine: Any, context: Any) -> dict[str, _Binding]:
        """One buffer per binding at the max profile. Output sizes come from TensorRT's shape
        inference with every input at its max shape (profile 0: we build one profile)."""
        trt = self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        bindings = {}
        for n in names:
            if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(n, 0))
                context.set_input_shape(n, hi)
                dtype = _np_dtype(trt, engine.get_tensor_dtype(n))
                bindings[n] = _Binding(n, True, dtype, hi, DeviceArray.empty(hi, dtype), lo)
        for n in names:
            if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT:
                shape = tuple(context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {n!r} has a data-dependent shape {shape}; not supported")
                dtype = _np_dtype(trt, engine.get_tensor_dtype(n))
                bindings[n] = _Binding(n, False, dtype, shape, DeviceArray.empty(shape, dtype))
        return bindings

    @classmethod
    def from_export(cls, export_dir: str | Path, precision: str = "fp16", batch: tuple[int, int, int] = (1, 1, 4),
                    workspace_mb: int | None = None, cache_dir: str | Path | None = None,
                    graphs: list[str] | None = None, build_missing: bool = False, **kwargs: Any) -> "TensorRTBackend":
        """Engines for an export from its cache (``tm-build-engines`` with the same settings);
        ``build_missing`` builds what is not cached instead of raising."""
        from ..manifest import load_manifest
        from ..trt.build import DEFAULT_WORKSPACE_MB, BuildSettings, engine_paths

        settings = BuildSettings(precision, tuple(batch), workspace_mb or DEFAULT_WORKSPACE_MB)
        paths = engine_paths(export_dir, settings, graphs, cache_dir, build_missing=build_missing)
        return cls(paths, load_manifest(export_dir), **kwargs)

    @property
    def graph_names(self) -> list[str]:
        return list(self._engines)

    def device_memory(self) -> dict[str, int]:
        """Bytes held: bindings per graph and the shared scratch."""
        out = {n: sum(b.buffer.nbytes for b in e.bindings.values()) for n, e in self._engines.items()}
        out["activations(shared)"] = self.activations.shared_bytes if self._scratch else 0
        return out

    # -- running ----------------------------------------------------------------------------
    def _engine(self, name: str) -> _Engine:
        try:
            return self._engines[name]
        except KeyError:
            raise KeyError(f"no TensorRT engine for graph {name!r} (loaded: {', '.join(self._engines)})") from None

    def _bind_inputs(self, eng: _Engine, feeds: Mapping[str, Feed]) -> tuple:
        cu, ctx = self._cu, eng.context
        expected = {b.name for b in eng.inputs}
        if set(feeds) != expected:
            raise ValueError(f"{eng.name}: feeds {sorted(feeds)} do not match the engine's inputs {sorted(expected)}")
        key = []
        for b in eng.inputs:
            value = feeds[b.name]
            shape = tuple(int(s) for s in value.shape)
            if len(shape) != len(b.max_shape) or any(not lo <= s <= hi for lo, s, hi in
                                                       zip(b.min_shape, shape, b.max_shape)):
                raise ValueError(f"{eng.name}.{b.name}: shape {shape} is outside the engine's profile "
                                 f"{b.min_shape}..{b.max_shape}; rebuild with a wider --batch or more modalities")
            if isinstance(value, DeviceArray):
                if np.dtype(value.dtype) != b.dtype:
                    raise TypeError(f"{eng.name}.{b.name}: device array is {value.dtype}, engine wants {b.dtype}")
                if self._aliases_output(eng, value):
                    # This engine's own output buffer (e.g. x0 of the last UNet step): TensorRT must not
                    # read and write one buffer in one launch, so copy it into the input's buffer first.
                    cu.copy_dtod(b.buffer.ptr, value.ptr, value.nbytes, self.stream)
                    ptr = b.buffer.ptr
                else:
                    ptr = value.ptr  # zero copy: the engine reads the caller's device memory
            else:
                host = np.ascontiguousarray(value, dtype=b.dtype)  # e.g. int64 ids -> int32 engines
                cu.copy_htod(b.buffer.ptr, host, self.stream)
                ptr = b.buffer.ptr
            if not ctx.set_input_shape(b.name, shape):
                raise ValueError(f"{eng.name}.{b.name}: TensorRT rejected input shape {shape}")
            ctx.set_tensor_address(b.name, ptr)
            key.append((b.name, shape, ptr))
        for b in eng.outputs:
            ctx.set_tensor_address(b.name, b.buffer.ptr)
        return tuple(key)

    @staticmethod
    def _aliases_output(eng: _Engine, value: DeviceArray) -> bool:
        lo, hi = value.ptr, value.ptr + value.nbytes
        return any(lo < o.buffer.ptr + o.buffer.nbytes and o.buffer.ptr < hi for o in eng.outputs)

    def _execute(self, eng: _Engine, key: tuple) -> None:
        cu, rt = self._cu, self._cu.cudart()
        if self.cuda_graphs and not eng.capture_failed:
            graph_exec = eng.graphs.get(key)
            if graph_exec is not None:
                cu.check(rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")
                return
            # TensorRT needs one plain run after a shape change before it can be captured.
            self._enqueue(eng)
            if len(eng.graphs) < MAX_GRAPHS_PER_ENGINE:
                self._capture(eng, key)
            return
        self._enqueue(eng)

    def _enqueue(self, eng: _Engine) -> None:
        if not eng.context.execute_async_v3(self._cu.handle(self.stream)):
            raise RuntimeError(f"{eng.name}: TensorRT execute_async_v3 failed (see its log)")

    def _capture(self, eng: _Engine, key: tuple) -> None:
        cu, rt = self._cu, self._cu.cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            cu.check(rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            ok = eng.context.execute_async_v3(cu.handle(self.stream))
            graph = cu.check(rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            if not ok:
                raise RuntimeError("execute_async_v3 failed during capture")
            eng.graphs[key] = cu.check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            cu.check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
        except (RuntimeError, cu.CudaError):
            # Some engines cannot be captured (e.g. layers that synchronise); run them plainly.
            rt.cudaGetLastError()
            eng.capture_failed = True

    def run_device(self, name: str, feeds: Mapping[str, Feed],
                   outputs: list[str] | None = None) -> dict[str, DeviceArray]:
        """Enqueue one graph; returns device views of the requested outputs (all by default).
        The views alias this backend's output buffers: they stay valid until ``name`` runs again
        (``DeviceArray.copy`` keeps one longer); feeding one back to the same graph is safe (it is
        copied into the input buffer first), feeding it to another graph is zero-copy. Work is queued on ``self.stream``; ``synchronize()``
        or ``to_host`` waits for it."""
        with self._lock:
            eng = self._engine(name)
            key = self._bind_inputs(eng, feeds)
            self._execute(eng, key)
            wanted = outputs if outputs is not None else [b.name for b in eng.outputs]
            result = {}
            for n in wanted:
                b = eng.bindings.get(n)
                if b is None or b.is_input:
                    raise KeyError(f"{name}: no output {n!r} (outputs: {[o.name for o in eng.outputs]})")
                shape = tuple(int(s) for s in eng.context.get_tensor_shape(n))
                result[n] = DeviceArray(b.buffer.ptr, shape, b.dtype, owner=False)
            return result

    def run(self, name: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """OrtBackend's protocol: host arrays in, host arrays out (cast to the manifest's dtypes)."""
        with self._lock:  # held until the copies are done: another call would overwrite the buffers
            views = self.run_device(name, feeds, outputs)
            host = [v.to_host(self.stream, sync=False) for v in views.values()]
            self.synchronize()
        if self.manifest is not None and name in self.manifest.graphs:
            dtypes = {s.name: s.dtype for s in self.manifest.graph(name).outputs}
            host = [h.astype(dtypes.get(n, h.dtype), copy=False) for n, h in zip(views, host)]
        return host

    def synchronize(self) -> None:
        self._cu.synchronize(self.stream)

    # -- transfers (tm-bench times them apart from compute) -----------------------------------
    def to_device(self, array: np.ndarray) -> DeviceArray:
        """An owned device copy of ``array`` (queued on the stream; free it with ``.free()``)."""
        return DeviceArray.from_host(np.ascontiguousarray(array), self.stream)

    def to_host(self, value: DeviceArray) -> np.ndarray:
        return value.to_host(self.stream)

    def close(self) -> None:
        """Free every device allocation, captured graph and the stream."""
        if not getattr(self, "_engines", None) and not getattr(self, "_scratch", 0):
            return
        cu, rt = self._cu, self._cu.cudart()
        self.synchronize()
        for eng in self._engines.values():
            for g in eng.graphs.values():
                rt.cudaGraphExecDestroy(g)
            for b in eng.bindings.values():
                b.buffer.free()
            eng.context = None
        self._engines = {}
        cu.free(self._scratch)
        self._scratch = 0
        rt.cudaStreamDestroy(self.stream)

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
