"""tm-bench --backend: the per-graph H2D / compute / D2H breakdown, exercised on the CPU with a
stand-in device backend (host copies play the transfers), and the clear errors when the GPU
backends cannot come up here."""
from __future__ import annotations

import numpy as np
import pytest

from tm_bench.cli import main
from tm_bench.device import RecordingBackend, device_breakdown, format_breakdown, runtime_backend
from tm_runtime import TerraMindRuntime

from .conftest import random_inputs


class CopyingDeviceBackend:
    """The GPU backend protocol on the CPU: 'device' arrays are private copies."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.uploads = self.downloads = self.syncs = 0

    def run(self, name, feeds, outputs=None):
        return self.inner.run(name, feeds, outputs)

    def to_device(self, array):
        self.uploads += 1
        return np.array(array, copy=True)

    def run_device(self, name, feeds, outputs=None):
        sess = self.inner.session(name)
        names = outputs or [o.name for o in sess.get_outputs()]
        return dict(zip(names, self.inner.run(name, feeds, names)))

    def to_host(self, value):
        self.downloads += 1
        return np.array(value, copy=True)

    def synchronize(self):
        self.syncs += 1


def test_breakdown_covers_every_graph_of_a_generate(small_generate_export):
    rt = TerraMindRuntime(small_generate_export)
    device = CopyingDeviceBackend(rt.backend)
    recorder = RecordingBackend(device)
    rt.backend = recorder
    rt.generate(random_inputs(1, 0, ["S2L2A", "S1GRD"]), ["DEM"], timesteps=2, seed=0)
    assert {"embed_S2L2A", "embed_S1GRD", "encoder", "decoder_query_DEM", "decoder", "decoder_head_DEM",
            "unet_DEM"} <= set(recorder.feeds)
    out = device_breakdown(device, recorder.feeds, warmup=1, iters=2)
    assert set(out) == set(recorder.feeds)
    for row in out.values():
        assert row["compute_ms"]["n"] == 2 and row["compute_ms"]["p50"] > 0 and row["input_bytes"] > 0
    assert device.uploads > 0 and device.downloads > 0 and device.syncs > 0
    table = format_breakdown(out)
    assert table[0].split()[0] == "graph" and any(line.startswith("unet_DEM") for line in table)


def test_breakdown_needs_a_device_backend(small_generate_export):
    rt = TerraMindRuntime(small_generate_export)
    with pytest.raises(TypeError, match="to_device"):
        device_breakdown(rt.backend, {"encoder": {"tokens": np.zeros((1, 196, 192), np.float32)}})
    with pytest.raises(ValueError, match="--backend must be one of"):
        runtime_backend("cuda")


@pytest.mark.parametrize("backend, message", [("ort-cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorRT")])
def test_gpu_backends_fail_clearly_without_a_gpu(small_generate_export, capsys, backend, message):
    import importlib.util

    import onnxruntime

    if backend == "ort-cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA EP: the error path does not apply")
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the error path does not apply")
    code = main(["generate", str(small_generate_export), "--outputs", "DEM", "--timesteps", "1",
                 "--backend", backend, "--iters", "1", "--warmup", "0"])
    assert code == 2
    assert message in capsys.readouterr().err
