"""Backend selection: the GPU backends fail clearly without their libraries; custom backends plug in."""
from __future__ import annotations

import numpy as np
import pytest

from tm_runtime import TerraMindRuntime
from tm_runtime.backends import OrtBackend


def test_unknown_backend(tiny_export):
    with pytest.raises(ValueError, match="backend must be one of ort, ort-cuda, tensorrt, openvino, got 'onnx'"):
        TerraMindRuntime(tiny_export, backend="onnx")
    with pytest.raises(TypeError, match="object with run"):
        TerraMindRuntime(tiny_export, backend=42)
    with pytest.raises(ValueError, match="providers= only applies"):
        TerraMindRuntime(tiny_export, backend="tensorrt", providers=["CPUExecutionProvider"])


def test_gpu_backends_explain_what_is_missing(tiny_export):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if not has_trt:
        with pytest.raises(RuntimeError, match="TensorRT is not installed"):
            TerraMindRuntime(tiny_export, backend="tensorrt")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            TerraMindRuntime(tiny_export, backend="ort-cuda")


def test_custom_backend_object(tiny_export):
    calls = []

    class Counting(OrtBackend):
        def run(self, name, feeds, outputs=None):
            calls.append(name)
            return super().run(name, feeds, outputs)

    rt = TerraMindRuntime(tiny_export)
    rt.backend = Counting({n: rt.manifest.graph_path(n) for n in rt.manifest.graphs})
    rt2 = TerraMindRuntime(tiny_export, backend=rt.backend)
    out = rt2.embed({"DEM": np.zeros((1, 1, 224, 224), np.float32)})
    assert out.shape == (1, 196, 192) and calls == ["embed_DEM", "encoder"]
