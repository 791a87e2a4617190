"""Thin helpers over cuda-python's runtime API (``cuda.bindings.runtime``, formerly ``cuda.cudart``):
errors as exceptions, device facts, device arrays. Imported lazily: nothing here loads CUDA until a
function is called, so the rest of tm_runtime works on machines without it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class CudaUnavailable(RuntimeError):
    """cuda-python (or a CUDA device) is not available."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


def cudart() -> Any:
    """The cuda-python runtime module (new layout first, then the pre-12.6 ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # cuda-python < 12.6
        except ImportError as exc:
            raise CudaUnavailable("cuda-python is not installed (pip install cuda-python); the TensorRT backend "
                                  "uses it for device memory, copies and streams") from exc
    return rt


def check(result: Any, what: str = "CUDA call") -> Any:
    """cuda-python returns (error, *values); raise on error, return the value(s)."""
    rt = cudart()
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise CudaError(f"{what} failed: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def handle(obj: Any) -> int:
    """A CUDA handle (stream, pointer wrapper) as the int TensorRT's Python API wants."""
    if isinstance(obj, int):
        return obj
    try:
        return int(obj)
    except TypeError:
        return int(obj.getPtr())


def device_facts(device: int = 0) -> dict[str, Any]:
    """Name, compute capability ("9.0") and memory of a device: parts of the engine cache key."""
    rt = cudart()
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu_name": name.split("\x00", 1)[0].strip(), "compute_capability": f"{prop.major}.{prop.minor}",
            "total_memory_bytes": int(prop.totalGlobalMem), "device": device}


def malloc(nbytes: int) -> int:
    # cudaMalloc(0) returns a null pointer; keep one byte so every binding has a real address.
    return handle(check(cudart().cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))


def free(ptr: int) -> None:
    if ptr:
        check(cudart().cudaFree(ptr), "cudaFree")


def create_stream() -> Any:
    return check(cudart().cudaStreamCreate(), "cudaStreamCreate")


def synchronize(stream: Any) -> None:
    check(cudart().cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def copy_htod(dst: int, src: np.ndarray, stream: Any) -> None:
    """Host → device. From pageable memory the call returns once the data is staged, so ``src``
    may be dropped right after."""
    rt = cudart()
    src = np.ascontiguousarray(src)
    check(rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync(H2D)")


def copy_dtoh(dst: np.ndarray, src: int, stream: Any) -> None:
    """Device → host into a contiguous array; synchronise the stream before reading ``dst``."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
          "cudaMemcpyAsync(D2H)")


def copy_dtod(dst: int, src: int, nbytes: int, stream: Any) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream),
          "cudaMemcpyAsync(D2D)")


@dataclass
class DeviceArray:
    """A typed view of device memory. ``owner`` arrays free their memory in ``free()``; views of a
    backend's output buffers do not (they stay valid until that graph runs again)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: bool = False

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: Any) -> "DeviceArray":
        arr = cls(0, tuple(int(s) for s in shape), np.dtype(dtype), owner=True)
        arr.ptr = malloc(arr.nbytes)
        return arr

    @classmethod
    def from_host(cls, array: np.ndarray, stream: Any) -> "DeviceArray":
        arr = cls.empty(array.shape, array.dtype)
        copy_htod(arr.ptr, array, stream)
        return arr

    def to_host(self, stream: Any, sync: bool = True) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        copy_dtoh(out, self.ptr, stream)
        if sync:
            synchronize(stream)
        return out

    def copy(self, stream: Any) -> "DeviceArray":
        """An owned copy: keep an output past the next run of its graph."""
        out = DeviceArray.empty(self.shape, self.dtype)
        copy_dtod(out.ptr, self.ptr, self.nbytes, stream)
        return out

    def free(self) -> None:
        if self.owner and self.ptr:
            free(self.ptr)
            self.ptr = 0


class TensorRTUnavailable(RuntimeError):
    """The ``tensorrt`` Python package cannot be imported."""


TENSORRT_MISSING = ("TensorRT is not installed: `import tensorrt` failed ({exc}). Install it on the GPU machine "
                    "(pip install 'tm-deploy[trt]', i.e. tensorrt>=10 and polygraphy, plus cuda-python) and build "
                    "the engines there: engines are tied to the GPU and TensorRT version.")


def import_tensorrt() -> Any:
    """``import tensorrt`` with one clear error when it is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:  # also raised when sys.modules['tensorrt'] is None
        raise TensorRTUnavailable(TENSORRT_MISSING.format(exc=exc)) from exc
    return trt


def trt_logger(trt: Any, severity: str = "WARNING") -> Any:
    """One logger per process: TensorRT warns when several are created."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(getattr(trt.Logger, severity.upper()))
    return _LOGGER


_LOGGER: Any = None
