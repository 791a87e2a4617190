"""GPU backends against ONNX Runtime CPU on a tiny export. Skipped, with the reason, without CUDA,
TensorRT, cuda-python or onnxruntime-gpu (``scripts/gpu_check.sh`` runs these paths too)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
GRAPHS = ["embed_S2L2A", "embed_S1GRD", "encoder", "decoder", "decoder_query_DEM", "decoder_head_DEM", "unet_DEM"]
N = 196


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def gpu_export(small_generate_export) -> Path:
    return small_generate_export


@pytest.fixture(scope="module")
def cuda_device():
    from tm_runtime.trt.device import CudaUnavailable, cudart as load_cudart

    try:
        cudart = load_cudart()
    except CudaUnavailable as exc:
        pytest.skip(str(exc))
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        pytest.skip(f"no CUDA device ({err})")
    return 0


@pytest.fixture(scope="module")
def trt_backend(cuda_device, request):
    # Skip checks first: the export (seconds of CPU) is only made when the test can run.
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'tm-deploy[trt]')")
    from tm_runtime.backends.tensorrt import TensorRTBackend

    gpu_export = request.getfixturevalue("gpu_export")

    backend = TensorRTBackend.from_export(gpu_export, precision="fp32", batch=(1, 2, 4), workspace_mb=1024,
                                          graphs=GRAPHS, build_missing=True)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def cpu_runtime(gpu_export):
    from tm_runtime import TerraMindRuntime

    return TerraMindRuntime(gpu_export)


def test_trt_engines_match_ort(trt_backend, gpu_export):
    from tm_runtime.manifest import load_manifest
    from tm_runtime.trt.compare import compare_outputs, random_feeds
    from tm_runtime.backends.onnxruntime import OrtBackend

    m = load_manifest(gpu_export)
    ort_backend = OrtBackend({n: m.graph_path(n) for n in GRAPHS})
    for name in GRAPHS:
        entry = m.graph(name)
        for batch in (1, 3):
            feeds = random_feeds(m, name, batch, seed=batch)
            rows = compare_outputs(entry, trt_backend.run(name, feeds, entry.output_names),
                                   ort_backend.run(name, feeds, entry.output_names), "fp32")
            assert all(r.passed for r in rows), rows


def test_trt_runtime_embed_and_generate(trt_backend, gpu_export, cpu_runtime):
    from tm_runtime import TerraMindRuntime

    rt = TerraMindRuntime(gpu_export)
    rt.backend = trt_backend
    rng = np.random.default_rng(0)
    x = {"S2L2A": rng.standard_normal((2, 12, 224, 224), dtype=np.float32),
         "S1GRD": rng.standard_normal((2, 2, 224, 224), dtype=np.float32)}
    assert _rel(rt.embed(x), cpu_runtime.embed(x)) < 1e-3
    a = rt.generate(x, ["DEM"], timesteps=2, seed=0, temperature=0.0)["DEM"]
    b = cpu_runtime.generate(x, ["DEM"], timesteps=2, seed=0, temperature=0.0)["DEM"]
    assert a.shape == b.shape == (2, 1, 224, 224) and np.isfinite(a).all()


def test_trt_run_device_chains_and_shares_activations(trt_backend, cpu_runtime):
    from tm_runtime.trt.device import DeviceArray

    tokens = np.random.default_rng(1).standard_normal((2, 392, 192)).astype(np.float32)
    enc = trt_backend.run_device("encoder", {"tokens": tokens}, ["layer_11"])["layer_11"]
    assert enc.shape == (2, 392, 192)
    emb = DeviceArray.from_host(np.random.default_rng(2).standard_normal((1, 392, 192)).astype(np.float32),
                                trt_backend.stream)
    queries = np.repeat(cpu_runtime.backend.run("decoder_query_DEM", {"positions": np.arange(N)}, ["queries"])[0],
                        2, axis=0)
    bias = np.zeros((N, N), np.float32)
    # encoder -> shared decoder -> head, every intermediate left on the device
    hidden = trt_backend.run_device("decoder", {"encoder_output": enc, "context_emb": emb, "queries": queries,
                                                "self_bias": bias})["hidden"]
    logits = trt_backend.run_device("decoder_head_DEM", {"hidden": hidden})["logits"]
    host_enc = enc.to_host(trt_backend.stream)
    ref_hidden = cpu_runtime.backend.run("decoder", {"encoder_output": host_enc,
                                                     "context_emb": emb.to_host(trt_backend.stream),
                                                     "queries": queries, "self_bias": bias}, ["hidden"])[0]
    ref = cpu_runtime.backend.run("decoder_head_DEM", {"hidden": ref_hidden}, ["logits"])[0]
    assert _rel(logits.to_host(trt_backend.stream), ref) < 1e-3
    emb.free()
    plan = trt_backend.activations  # one scratch allocation: the largest engine's, 256-byte aligned
    largest = max(plan.per_engine.values())
    assert largest <= plan.shared_bytes < largest + 256 and plan.shared_bytes <= plan.separate_bytes


def test_trt_shape_outside_profile_is_a_clear_error(trt_backend):
    with pytest.raises(ValueError, match="outside the engine's profile"):
        trt_backend.run("encoder", {"tokens": np.zeros((5, 196, 192), np.float32)})


def test_trt_cuda_graph_replay_matches(trt_backend, gpu_export):
    from tm_runtime.backends.tensorrt import TensorRTBackend

    feeds = {"x_t": np.random.default_rng(3).standard_normal((1, 1, 224, 224)).astype(np.float32),
             "t": np.full((1,), 500, np.int64), "quant": np.zeros((1, 5, 14, 14), np.float32)}
    with TensorRTBackend.from_export(gpu_export, precision="fp32", batch=(1, 2, 4), workspace_mb=1024,
                                     graphs=["unet_DEM"], cuda_graphs=True) as graphed:
        first = graphed.run("unet_DEM", feeds)[0]  # plain run, then capture
        replay = graphed.run("unet_DEM", feeds)[0]
    plain = trt_backend.run("unet_DEM", feeds)[0]
    assert _rel(replay, plain) < 1e-5 and _rel(first, plain) < 1e-5


@pytest.fixture(scope="module")
def ort_cuda(request):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime-gpu is not installed (providers: {ort.get_available_providers()})")
    from tm_runtime.backends.ort_cuda import OrtCudaBackend
    from tm_runtime.manifest import load_manifest

    m = load_manifest(request.getfixturevalue("gpu_export"))
    return OrtCudaBackend({n: m.graph_path(n) for n in m.graphs}, m)


def test_ort_cuda_iobinding_matches_cpu(ort_cuda, cpu_runtime):
    tokens = np.random.default_rng(4).standard_normal((2, 392, 192)).astype(np.float32)
    out = ort_cuda.run_device("encoder", {"tokens": tokens}, ["layer_11"])["layer_11"]
    assert out.device_name().lower() == "cuda"
    ref = cpu_runtime.backend.run("encoder", {"tokens": tokens}, ["layer_11"])[0]
    assert _rel(out.numpy(), ref) < 1e-3
    # Chained on the device: the encoder's OrtValue goes straight into the decoder, its output into the head.
    emb = np.zeros((1, 392, 192), np.float32)
    queries = np.zeros((2, N, 192), np.float32)
    hidden = ort_cuda.run_device("decoder", {"encoder_output": out, "context_emb": emb, "queries": queries,
                                             "self_bias": np.zeros((N, N), np.float32)}, ["hidden"])["hidden"]
    logits = ort_cuda.run("decoder_head_DEM", {"hidden": hidden})[0]
    assert logits.shape == (2, 196, 15360)


def test_ort_cuda_runtime_embed(ort_cuda, gpu_export, cpu_runtime):
    from tm_runtime import TerraMindRuntime

    rt = TerraMindRuntime(gpu_export)
    rt.backend = ort_cuda
    x = {"S2L2A": np.random.default_rng(5).standard_normal((1, 12, 224, 224), dtype=np.float32)}
    assert _rel(rt.embed(x), cpu_runtime.embed(x)) < 1e-3
