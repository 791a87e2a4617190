"""Engines behind one small protocol: ``run(graph_name, feeds, outputs) -> list[np.ndarray]``.

``OrtBackend`` (CPU, or any ONNX Runtime provider) is always available; ``OrtCudaBackend`` (IO
binding, outputs kept on the device) and ``TensorRTBackend`` need onnxruntime-gpu / TensorRT and
are imported lazily so that ``import tm_runtime`` works without them.
"""
from .onnxruntime import OrtBackend

__all__ = ["OrtBackend", "OrtCudaBackend", "TensorRTBackend"]


def __getattr__(name: str):
    if name == "OrtCudaBackend":
        from .ort_cuda import OrtCudaBackend

        return OrtCudaBackend
    if name == "TensorRTBackend":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(name)
