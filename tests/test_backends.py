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


def test_ort_lean_memory_gives_the_same_results_without_arenas_or_prepacking(tiny_export):
    """backend_options={"lean_memory": True}: each session without a CPU arena and without
    pre-packed weights; the numbers change only by float rounding (another GEMM path), and no
    timing or RSS is asserted here."""
    from tests.conftest import random_inputs

    with pytest.raises(ValueError, match="backend_options for backend='ort' are lean_memory, spinning; got arena"):
        TerraMindRuntime(tiny_export, backend_options={"arena": False})
    lean = TerraMindRuntime(tiny_export, backend_options={"lean_memory": True})
    default = TerraMindRuntime(tiny_export)
    x = random_inputs(batch=1)
    np.testing.assert_allclose(lean.embed(x), default.embed(x), rtol=1e-4, atol=1e-5)
    lean_options = lean.backend.session("encoder").get_session_options()
    assert lean_options.enable_cpu_mem_arena is False
    assert lean_options.get_session_config_entry("session.disable_prepacking") == "1"
    assert default.backend.session("encoder").get_session_options().enable_cpu_mem_arena is True


def _entry(rt: TerraMindRuntime, key: str) -> str | None:
    options = rt.backend.session("encoder").get_session_options()
    try:
        return options.get_session_config_entry(key)
    except Exception:  # ONNX Runtime raises for a key that was never set
        return None


def test_ort_spinning_spins_within_a_run_only(tiny_export):
    """Off by default (no pool spins while another graph's session runs); spinning=True lets the
    workers spin during a run and stops them at its end (force_spinning_stop). Same numbers."""
    from tests.conftest import random_inputs

    default = TerraMindRuntime(tiny_export)
    spinning = TerraMindRuntime(tiny_export, backend_options={"spinning": True})
    x = random_inputs(batch=1)
    np.testing.assert_array_equal(spinning.embed(x), default.embed(x))
    assert _entry(default, "session.intra_op.allow_spinning") == "0"
    assert _entry(default, "session.force_spinning_stop") in (None, "", "0")
    assert _entry(spinning, "session.intra_op.allow_spinning") == "1"
    assert _entry(spinning, "session.force_spinning_stop") == "1"


@pytest.mark.parametrize("text, expected", [("true", True), ("On", True), ("1", True), ("false", False),
                                            ("no", False), ("0", False), (False, False)])
def test_ort_options_read_command_line_strings(text, expected):
    """tm-run passes --backend-option values as strings: 'false' must not switch an option on."""
    from tm_runtime.backends.onnxruntime import ort_options

    assert ort_options({"spinning": text}) == {"lean_memory": False, "spinning": expected}
    with pytest.raises(ValueError, match="backend option lean_memory must be true or false, got 'maybe'"):
        ort_options({"lean_memory": "maybe"})
    with pytest.raises(ValueError, match="got 2"):
        ort_options({"spinning": 2})
