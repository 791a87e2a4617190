"""TensorRT planning on the CPU: engine cache keys and rebuild reasons, optimisation profiles and
buffer sizes from a real (tiny) manifest, and the TensorRT tools failing clearly without TensorRT."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tm_runtime.manifest import load_manifest
from tm_runtime.trt.engine_cache import EngineCache, EngineKeyParts, changed_parts, rebuild_reason
from tm_runtime.trt.profiles import (DTYPE_BYTES, ProfileSettings, activation_plan, buffer_plan, graph_profiles,
                                     max_context_modalities)

N = 196  # tokens per modality at 224 px
D = 192  # tiny width


@pytest.fixture(scope="module")
def gen_export(small_generate_export) -> Path:
    return small_generate_export


def parts(**changes) -> EngineKeyParts:
    base = EngineKeyParts(
        graph="encoder", onnx_sha256="a" * 64, tensorrt_version="10.3.0", gpu_name="NVIDIA H200",
        compute_capability="9.0", precision="fp16",
        profile={"tokens": ((1, 196, 192), (1, 392, 192), (4, 588, 192))}, workspace_bytes=4 << 30)
    return dataclasses.replace(base, **changes)


CHANGES = {
    "onnx_sha256": "b" * 64,
    "external_data_sha256": ("c" * 64,),
    "tensorrt_version": "10.4.0",
    "gpu_name": "NVIDIA A100-SXM4-80GB",
    "compute_capability": "8.0",
    "precision": "fp32",
    "profile": {"tokens": ((1, 196, 192), (1, 392, 192), (8, 588, 192))},
    "workspace_bytes": 2 << 30,
    "builder_options": {"optimization_level": 5},
}


# -- cache keys ---------------------------------------------------------------------------------
def test_key_is_stable():
    assert parts().key == parts().key
    assert len(parts().key) == 64
    # Profile dict order and tuple/list spelling do not matter.
    a = parts(profile={"x": ((1,), (2,), (3,)), "y": ((1,), (1,), (1,))})
    b = parts(profile={"y": ([1], [1], [1]), "x": ([1], [2], [3])})
    assert a.key == b.key


@pytest.mark.parametrize("part", sorted(CHANGES))
def test_key_changes_with_each_part(part):
    changed = parts(**{part: CHANGES[part]})
    assert changed.key != parts().key
    assert changed_parts(parts(), changed) == [part]


@pytest.mark.parametrize("part,words", [
    ("tensorrt_version", ["TensorRT version", "10.3.0", "10.4.0"]),
    ("gpu_name", ["GPU", "H200", "A100"]),
    ("compute_capability", ["compute capability", "9.0", "8.0"]),
    ("precision", ["precision", "fp16", "fp32"]),
    ("onnx_sha256", ["ONNX graph", "aaaaaaaaaaaa", "bbbbbbbbbbbb"]),
    ("profile", ["optimisation profile", "4x588x192", "8x588x192"]),
    ("workspace_bytes", ["workspace", str(4 << 30), str(2 << 30)]),
])
def test_rebuild_reason_names_the_part(part, words):
    reason = rebuild_reason(parts(), parts(**{part: CHANGES[part]}))
    assert reason.startswith("encoder: ")
    for w in words:
        assert w in reason, (w, reason)


def test_rebuild_reason_without_a_previous_engine():
    assert "no engine cached" in rebuild_reason(None, parts())


def test_cache_store_lookup_and_rebuild(tmp_path):
    cache = EngineCache(tmp_path)
    first = cache.lookup(parts())
    assert not first.hit and "no engine cached" in first.reason
    path = cache.store(parts(), b"plan-bytes", {"build_seconds": 1.0})
    assert path == tmp_path / "engines" / "encoder" / f"{parts().key}.plan"
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["parts"]["tensorrt_version"] == "10.3.0" and side["key"] == parts().key
    assert cache.lookup(parts()).hit
    # A new TensorRT version misses, and says why against the cached engine.
    miss = cache.lookup(parts(tensorrt_version="10.4.0"))
    assert not miss.hit and "TensorRT version changed: 10.3.0 → 10.4.0" in miss.reason
    # A corrupted plan is not a hit.
    path.write_bytes(b"plan-bytez")
    bad = cache.lookup(parts())
    assert not bad.hit and "sha256" in bad.reason
    # Prune keeps only what is asked for.
    cache.store(parts(precision="fp32"), b"other")
    removed = cache.prune("encoder", keep={parts(precision="fp32").key})
    assert {p.suffix for p in removed} == {".plan", ".json"} and len(removed) == 2
    assert cache.lookup(parts(precision="fp32")).hit


# -- profiles -----------------------------------------------------------------------------------
def test_profiles_from_manifest(gen_export):
    m = load_manifest(gen_export)
    # inputs S2L2A, S1GRD; DEM can only be the last output here: context of at most 2 modalities.
    assert max_context_modalities(m) == 2
    prof = graph_profiles(m, ProfileSettings(batch=(1, 2, 8)))
    assert prof["encoder"].inputs["tokens"] == ((1, N, D), (2, 2 * N, D), (8, 2 * N, D))
    dec = prof["decoder"].inputs
    assert dec["encoder_output"] == ((1, N, D), (2, 2 * N, D), (8, 2 * N, D))
    assert dec["context_emb"] == ((1, N, D), (1, 2 * N, D), (1, 2 * N, D))  # leading 1 stays fixed
    # image targets only: the shared decoder's queries are the target's N, a static dim
    assert dec["queries"] == ((1, N, D), (2, N, D), (8, N, D))
    assert dec["self_bias"] == ((N, N), (N, N), (N, N))
    assert prof["decoder_query_DEM"].inputs["positions"] == ((N,), (N,), (N,))
    assert prof["decoder_head_DEM"].inputs["hidden"] == ((1, N, D), (2, N, D), (8, N, D))
    unet = prof["unet_DEM"].inputs
    assert unet["x_t"] == ((1, 1, 224, 224), (2, 1, 224, 224), (8, 1, 224, 224))
    assert unet["t"] == ((1,), (2,), (8,))
    assert unet["quant"] == ((1, 5, 14, 14), (2, 5, 14, 14), (8, 5, 14, 14))
    assert prof["embed_S2L2A"].inputs["image"][2] == (8, 12, 224, 224)
    assert prof["embed_tok_DEM"].inputs["ids"][0] == (1, 14, 14)
    # Explicit overrides of the token range.
    wide = graph_profiles(m, ProfileSettings(batch=(1, 1, 1), max_modalities=4, opt_modalities=3), ["encoder"])
    assert wide["encoder"].inputs["tokens"] == ((1, N, D), (1, 3 * N, D), (1, 4 * N, D))
    assert wide["encoder"].static is False
    assert graph_profiles(m, ProfileSettings(batch=(2, 2, 2)), ["unet_DEM"])["unet_DEM"].static


def test_chained_generation_widens_the_token_range(gen_export, tmp_path):
    # The same manifest with two more targets: LULC can be fed back (it has a token-embedding
    # graph), NDVI cannot, so it can only be the last output.
    data = json.loads((gen_export / "manifest.json").read_text())
    dem = data["targets"]["DEM"]
    data["targets"]["LULC"] = {**dem, "condition_graph": "embed_tok_LULC"}
    data["targets"]["NDVI"] = {**dem, "condition_graph": None}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    m = load_manifest(tmp_path)
    # inputs S2L2A, S1GRD (+ fed back DEM, LULC) with NDVI last: 4 modalities = M + #targets - 1.
    assert max_context_modalities(m) == 4
    assert graph_profiles(m)["encoder"].inputs["tokens"][2][1] == 4 * N


def test_bad_batch_range():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ProfileSettings(batch=(4, 2, 8))


def test_buffer_plan_sizes_follow_dtypes(gen_export):
    m = load_manifest(gen_export)
    prof = graph_profiles(m, ProfileSettings(batch=(1, 2, 8)))
    plan = {g: {b.name: b for b in rows} for g, rows in buffer_plan(m, prof).items()}
    assert plan["decoder_head_DEM"]["logits"].nbytes == 8 * N * 15360 * 4
    assert plan["decoder"]["context_emb"].nbytes == 1 * 2 * N * D * 4
    assert plan["decoder"]["hidden"].nbytes == 8 * N * D * 4
    assert plan["decoder_query_DEM"]["queries"].max_shape == (1, N, D)
    assert plan["unet_DEM"]["t"].nbytes == 8 * DTYPE_BYTES["int64"]
    assert plan["tokenize_DEM"]["ids"].nbytes == 8 * 14 * 14 * DTYPE_BYTES["int32"]
    assert plan["embed_tok_DEM"]["ids"].nbytes == 8 * 14 * 14 * 8
    assert plan["embed_S2L2A"]["emb"].max_shape == (1, N, D)
    assert plan["encoder"]["layer_11"].max_shape == (8, 2 * N, D) and not plan["encoder"]["layer_11"].is_input
    # Every binding of every graph is planned.
    for name, entry in m.graphs.items():
        assert set(plan[name]) == {s.name for s in entry.inputs + entry.outputs}


def test_activation_plan_shares_the_max():
    plan = activation_plan({"encoder": 3_000_000, "decoder": 10_000_000, "unet_DEM": 7_000_000})
    assert plan.largest == "decoder"
    assert plan.shared_bytes >= 10_000_000 and plan.shared_bytes % 256 == 0 and plan.shared_bytes < 10_000_256
    assert plan.separate_bytes == 20_000_000 and plan.saved_bytes == plan.separate_bytes - plan.shared_bytes
    assert activation_plan({}).shared_bytes == 0


# -- without TensorRT ---------------------------------------------------------------------------
BLOCK = "import sys; sys.modules['tensorrt'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,prog", [("tm_runtime.trt.build", "tm-build-engines"),
                                         ("tm_runtime.trt.compare", "tm-compare-trt")])
def test_tools_fail_clearly_without_tensorrt(gen_export, module, prog):
    r = _run(f"from {module} import main; sys.exit(main([{str(gen_export)!r}]))")
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1, r.stderr  # one clear message, no traceback
    assert lines[0].startswith(f"{prog}: error: TensorRT is not installed"), lines[0]


def test_build_dry_run_needs_no_tensorrt(gen_export):
    r = _run(f"from tm_runtime.trt.build import main; sys.exit(main([{str(gen_export)!r}, '--dry-run', "
             "'--batch', '1', '2', '8']))")
    assert r.returncode == 0, r.stderr
    assert "encoder" in r.stdout and "8x392x192" in r.stdout and "MiB" in r.stdout


def test_backends_import_without_gpu_stack():
    code = ("sys.modules['cuda'] = None\n"
            "import tm_runtime, tm_runtime.trt, tm_runtime.backends.tensorrt as t, tm_runtime.backends.ort_cuda\n"
            "from tm_runtime.trt.device import TensorRTUnavailable\n"
            "try:\n    t.TensorRTBackend({})\nexcept TensorRTUnavailable as e:\n    print('clear:', e)\n"
            "bad = [m for m in ('tensorrt', 'torch', 'tm_export') if sys.modules.get(m) is not None]\n"
            "assert not bad, bad\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "clear: TensorRT is not installed" in r.stdout


def test_ort_cuda_backend_reports_missing_provider(gen_export):
    import onnxruntime as ort

    from tm_runtime.backends.ort_cuda import OrtCudaBackend, OrtCudaUnavailable

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here; tests/gpu covers it")
    with pytest.raises(OrtCudaUnavailable, match="onnxruntime-gpu"):
        OrtCudaBackend({}, None)


def test_compare_statistics(gen_export):
    from tm_runtime.backends.onnxruntime import OrtBackend
    from tm_runtime.trt.compare import compare_outputs, random_feeds

    m = load_manifest(gen_export)
    backend = OrtBackend({n: m.graph_path(n) for n in m.graphs})
    for name in ("encoder", "tokenize_DEM", "unet_DEM", "embed_tok_DEM"):
        entry = m.graph(name)
        feeds = random_feeds(m, name, batch=2)
        assert {k: v.dtype.name for k, v in feeds.items()} == {s.name: s.dtype for s in entry.inputs}
        ref = backend.run(name, feeds, entry.output_names)
        same = compare_outputs(entry, ref, ref, "fp32")
        assert all(r.passed and r.max_abs == 0 for r in same)
        off = compare_outputs(entry, [r + np.asarray(1, r.dtype) for r in ref], ref, "fp16")
        assert not any(r.passed for r in off)
    ids = random_feeds(m, "embed_tok_DEM", batch=3)["ids"]
    assert ids.shape == (3, 14, 14) and ids.max() < 15360
    assert random_feeds(m, "encoder", batch=2)["tokens"].shape == (2, 2 * N, D)


# -- TensorRTBackend's logic against a fake TensorRT and a fake CUDA (host memory) ---------------
class FakeMemory:
    """Device memory simulated in host bytearrays; pointers are ints as cuda-python gives them."""

    def __init__(self) -> None:
        self.blocks: dict[int, bytearray] = {}
        self.next = 1 << 20
        self.capturing: list | None = None
        self.launches = 0
        self.dtod = 0

    def malloc(self, nbytes: int) -> int:
        ptr, self.next = self.next, self.next + ((max(nbytes, 1) + 255) // 256 + 1) * 256
        self.blocks[ptr] = bytearray(max(nbytes, 1))
        return ptr

    def view(self, ptr: int, nbytes: int) -> memoryview:
        for base, buf in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return memoryview(buf)[ptr - base:ptr - base + nbytes]
        raise AssertionError(f"bad device access at {ptr} ({nbytes} bytes)")

    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        return np.frombuffer(self.view(ptr, int(np.prod(shape)) * dtype.itemsize), dtype).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        self.view(ptr, array.nbytes)[:] = np.ascontiguousarray(array).tobytes()


class FakeContext:
    def __init__(self, engine: "FakeEngine", mem: FakeMemory) -> None:
        self.engine, self.mem = engine, mem
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.scratch = None

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.scratch = (ptr, size)

    def set_input_shape(self, name, shape) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.engine.output_shape(name, self.shapes) if name in self.engine.outputs else self.shapes[name]

    def set_tensor_address(self, name, ptr) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream) -> bool:
        shapes, addresses = dict(self.shapes), dict(self.addresses)

        def work() -> None:
            feeds = {n: self.mem.read(addresses[n], shapes[n], self.engine.dtypes[n]) for n in self.engine.inputs}
            for name, value in self.engine.compute(feeds).items():
                self.mem.write(addresses[name], value.astype(self.engine.dtypes[name]))

        if self.mem.capturing is not None:
            self.mem.capturing.append(work)
        else:
            work()
        return True


class FakeEngine:
    """Encoder-like engine: layer_k = tokens * (k + 1); profile from the real manifest."""

    def __init__(self, graph: str, profile, dtypes, compute, output_shape, device_memory: int, mem: FakeMemory):
        self.graph, self.profile, self.dtypes, self.compute = graph, profile, dtypes, compute
        self.inputs = list(profile)
        self.outputs = [n for n in dtypes if n not in profile]
        self.output_shape = output_shape
        self.device_memory_size_v2 = device_memory
        self.mem = mem
        self.contexts: list[FakeContext] = []

    num_io_tensors = property(lambda self: len(self.dtypes))

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, index):
        return list(self.profile[name])

    def create_execution_context(self, strategy=None):
        assert strategy == "USER_MANAGED"
        ctx = FakeContext(self, self.mem)
        self.contexts.append(ctx)
        return ctx


def fake_stack(monkeypatch, engines: dict[str, FakeEngine], mem: FakeMemory):
    import types

    from tm_runtime.trt import device

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, s=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    trt.nptype = lambda dt: np.dtype(dt).type
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: engines[data.decode().split(":", 1)[1]])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)

    graphs: dict[int, list] = {}

    def end_capture(stream):
        work, mem.capturing = mem.capturing, None
        graphs[id(work)] = work
        return (0, id(work))

    def launch(g, stream):
        mem.launches += 1
        for w in graphs[g]:
            w()
        return (0,)

    rt = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=0), cudaGetErrorName=lambda e: (0, b"fake"),
        cudaSetDevice=lambda d: (0,), cudaStreamCaptureMode=types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1),
        cudaStreamBeginCapture=lambda s, m: (setattr(mem, "capturing", []), (0,))[1], cudaStreamEndCapture=end_capture,
        cudaGraphInstantiate=lambda g, flags: (0, g), cudaGraphDestroy=lambda g: (0,), cudaGraphLaunch=launch,
        cudaGraphExecDestroy=lambda g: (0,), cudaGetLastError=lambda: (0,), cudaStreamDestroy=lambda s: (0,))
    monkeypatch.setattr(device, "cudart", lambda: rt)
    monkeypatch.setattr(device, "malloc", mem.malloc)
    monkeypatch.setattr(device, "free", lambda ptr: mem.blocks.pop(ptr, None))
    monkeypatch.setattr(device, "create_stream", lambda: 7)
    monkeypatch.setattr(device, "synchronize", lambda stream: None)
    monkeypatch.setattr(device, "copy_htod", lambda dst, src, stream: mem.write(dst, np.ascontiguousarray(src)))
    monkeypatch.setattr(device, "copy_dtoh", lambda dst, src, stream: dst.__setitem__(
        Ellipsis, mem.read(src, dst.shape, dst.dtype)))

    def dtod(dst, src, nbytes, stream):
        mem.dtod += 1
        mem.write(dst, mem.read(src, (nbytes,), np.uint8))
    monkeypatch.setattr(device, "copy_dtod", dtod)
    monkeypatch.setattr(device, "_LOGGER", None)


def _fake_engines(m, mem: FakeMemory) -> dict[str, FakeEngine]:
    prof = graph_profiles(m, ProfileSettings(batch=(1, 2, 4)), ["encoder", "unet_DEM"])
    enc_out = {f"layer_{k}": np.float32 for k in range(12)}
    encoder = FakeEngine(
        "encoder", prof["encoder"].inputs, {"tokens": np.float32, **enc_out},
        lambda f: {f"layer_{k}": f["tokens"] * (k + 1) for k in range(12)},
        lambda name, shapes: shapes["tokens"], 3_000_000, mem)
    # The UNet engine takes t as int32 (as TensorRT < 10 engines do): the backend must cast.
    unet = FakeEngine(
        "unet_DEM", prof["unet_DEM"].inputs,
        {"x_t": np.float32, "t": np.int32, "quant": np.float32, "ddim": np.float32, "x0": np.float32},
        lambda f: {"x0": f["x_t"] + f["t"].reshape(-1, 1, 1, 1) + f["quant"].sum()},
        lambda name, shapes: shapes["x_t"], 5_000_000, mem)
    return {"encoder": encoder, "unet_DEM": unet}


def test_tensorrt_backend_logic_with_fakes(gen_export, monkeypatch):
    from tm_runtime.backends.tensorrt import TensorRTBackend
    from tm_runtime.trt.device import DeviceArray

    m = load_manifest(gen_export)
    mem = FakeMemory()
    engines = _fake_engines(m, mem)
    fake_stack(monkeypatch, engines, mem)
    backend = TensorRTBackend({"encoder": b"fake:encoder", "unet_DEM": b"fake:unet_DEM"}, m)
    # One shared scratch allocation, the larger engine's, given to every context.
    assert backend.activations.shared_bytes >= 5_000_000 and backend.activations.largest == "unet_DEM"
    scratch = {e.contexts[0].scratch for e in engines.values()}
    assert len(scratch) == 1 and next(iter(scratch))[1] == backend.activations.shared_bytes
    # Buffers at the max profile: encoder tokens 4 x 392 x 192 float32.
    assert backend.device_memory()["encoder"] == 13 * 4 * 392 * 192 * 4

    tokens = np.random.default_rng(0).standard_normal((2, 196, 192))  # float64: cast to the engine's float32
    out = backend.run("encoder", {"tokens": tokens}, ["layer_11", "layer_0"])
    assert [o.shape for o in out] == [(2, 196, 192)] * 2 and out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], tokens.astype(np.float32) * 12, rtol=1e-6)
    np.testing.assert_allclose(out[1], tokens.astype(np.float32), rtol=1e-6)
    assert len(backend.run("encoder", {"tokens": tokens})) == 12  # all outputs by default

    with pytest.raises(ValueError, match="outside the engine's profile"):
        backend.run("encoder", {"tokens": np.zeros((5, 196, 192), np.float32)})
    with pytest.raises(ValueError, match="do not match the engine's inputs"):
        backend.run("encoder", {"x": tokens})
    with pytest.raises(KeyError, match="no TensorRT engine"):
        backend.run("decoder", {})

    # Device chaining: an output view fed to the same graph is copied into the input buffer first
    # (one launch must not read and write one buffer) ...
    view = backend.run_device("encoder", {"tokens": tokens.astype(np.float32)}, ["layer_1"])["layer_1"]
    assert isinstance(view, DeviceArray) and not view.owner and view.shape == (2, 196, 192)
    again = backend.run("encoder", {"tokens": view}, ["layer_0"])[0]
    np.testing.assert_allclose(again, tokens.astype(np.float32) * 2, rtol=1e-6)
    assert mem.dtod == 1
    # ... while the caller's own device memory is read in place (zero copy).
    owned = DeviceArray.from_host(tokens.astype(np.float32), backend.stream)
    np.testing.assert_allclose(backend.run("encoder", {"tokens": owned}, ["layer_2"])[0],
                               tokens.astype(np.float32) * 3, rtol=1e-6)
    assert mem.dtod == 1 and engines["encoder"].contexts[0].addresses["tokens"] == owned.ptr
    owned.free()

    feeds = {"x_t": np.ones((1, 1, 224, 224), np.float32), "t": np.array([500], np.int64),
             "quant": np.zeros((1, 5, 14, 14), np.float32), "ddim": np.ones(4, np.float32)}
    x0 = backend.run("unet_DEM", feeds)[0]
    assert x0.dtype == np.float32 and float(x0.mean()) == 501.0
    backend.close()
    assert mem.blocks == {}  # every buffer and the scratch freed


def test_tensorrt_backend_cuda_graph_replay_with_fakes(gen_export, monkeypatch):
    from tm_runtime.backends.tensorrt import TensorRTBackend

    m = load_manifest(gen_export)
    mem = FakeMemory()
    fake_stack(monkeypatch, _fake_engines(m, mem), mem)
    backend = TensorRTBackend({"unet_DEM": b"fake:unet_DEM"}, m, cuda_graphs=True)

    def feeds(t: int) -> dict[str, np.ndarray]:
        return {"x_t": np.zeros((2, 1, 224, 224), np.float32), "t": np.array([t, t], np.int64),
                "quant": np.zeros((2, 5, 14, 14), np.float32), "ddim": np.ones(4, np.float32)}

    # First call runs plainly and captures; later calls with the same shapes replay, and see new inputs.
    assert float(backend.run("unet_DEM", feeds(1))[0].max()) == 1.0 and mem.launches == 0
    assert float(backend.run("unet_DEM", feeds(7))[0].max()) == 7.0 and mem.launches == 1
    assert float(backend.run("unet_DEM", feeds(9))[0].max()) == 9.0 and mem.launches == 2
    # A new shape is a new capture.
    one = {k: (v if k == "ddim" else v[:1]) for k, v in feeds(3).items()}
    assert float(backend.run("unet_DEM", one)[0].max()) == 3.0 and mem.launches == 2
    assert float(backend.run("unet_DEM", one)[0].max()) == 3.0 and mem.launches == 3
    backend.close()


# -- tm-build-engines' logic against a fake TensorRT builder ------------------------------------
def fake_builder(monkeypatch, m) -> dict:
    """A tensorrt module whose builder 'serialises' what it was asked to build, as JSON."""
    import types

    from tm_runtime.trt import build

    seen: dict = {"builds": []}

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.entries = data.decode().split(",") if data else []

        def serialize(self) -> bytes:
            return ",".join(self.entries).encode()

    class Config:
        def __init__(self) -> None:
            self.flags, self.pool, self.cache, self.profiles = {"TF32"}, None, None, []
            self.builder_optimization_level = 3

        def set_memory_pool_limit(self, pool, size): self.pool = (pool, size)
        def set_flag(self, f): self.flags.add(f)
        def clear_flag(self, f): self.flags.discard(f)
        def add_optimization_profile(self, p): self.profiles.append(p); return 0
        def create_timing_cache(self, data): return Cache(bytes(data))
        def set_timing_cache(self, cache, ignore_mismatch): self.cache = cache; return True

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi): self.shapes[name] = [list(lo), list(opt), list(hi)]

    class Network:
        inputs: list = []
        num_inputs = property(lambda self: len(self.inputs))
        def get_input(self, i): return types.SimpleNamespace(name=self.inputs[i])

    class Parser:
        def __init__(self, network, logger): self.network = network
        num_errors = 0

        def parse_from_file(self, path):
            graph = next(n for n, g in m.graphs.items() if g.file == Path(path).name)
            self.network.graph, self.network.inputs = graph, [s.name for s in m.graph(graph).inputs]
            return True

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): return Network()
        def create_builder_config(self): return Config()
        def create_optimization_profile(self): return Profile()

        def build_serialized_network(self, network, config):
            config.cache.entries.append(network.graph)  # the shared timing cache learns from every build
            plan = {"graph": network.graph, "flags": sorted(config.flags), "pool": config.pool[1],
                    "profile": config.profiles[0].shapes}
            seen["builds"].append(plan)
            return json.dumps(plan).encode()

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, s=2: None})
    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16", BF16="BF16")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(build, "gpu_facts", lambda device=0: {"gpu_name": "Fake GPU", "compute_capability": "9.0"})
    monkeypatch.setattr("tm_runtime.trt.device._LOGGER", None)
    return seen


def test_build_engines_with_a_fake_builder(gen_export, tmp_path, monkeypatch, capsys):
    from tm_runtime.trt.build import BuildSettings, build_engines, engine_paths, main

    m = load_manifest(gen_export)
    seen = fake_builder(monkeypatch, m)
    timing = tmp_path / "timing.cache"
    settings = BuildSettings("fp16", (1, 2, 4), 512, timing)
    graphs = ["encoder", "unet_DEM"]
    first = build_engines(gen_export, settings, graphs, cache_dir=tmp_path, log=lambda s: None)
    assert [r.built for r in first] == [True, True]
    enc = json.loads(first[0].plan_path.read_bytes())
    assert enc["profile"]["tokens"] == [[1, N, D], [2, 2 * N, D], [4, 2 * N, D]]
    assert "FP16" in enc["flags"] and enc["pool"] == 512 << 20
    assert timing.read_bytes() == b"encoder,unet_DEM"  # one timing cache for all graphs, saved
    # Same settings: everything cached; engine_paths finds them without building.
    assert not any(r.built for r in build_engines(gen_export, settings, graphs, cache_dir=tmp_path,
                                                   log=lambda s: None))
    found = engine_paths(gen_export, settings, graphs, tmp_path, build_missing=False, log=lambda s: None)
    assert set(found) == set(graphs)
    # fp32 rebuilds, clears TF32, and says why.
    logs: list[str] = []
    fp32 = build_engines(gen_export, BuildSettings("fp32", (1, 2, 4), 512, timing), ["encoder"], tmp_path,
                         log=logs.append)
    assert fp32[0].built and "precision changed: fp16 → fp32" in fp32[0].lookup.reason
    assert any("precision changed" in line for line in logs)
    assert "TF32" not in seen["builds"][-1]["flags"] and "FP16" not in seen["builds"][-1]["flags"]
    with pytest.raises(FileNotFoundError, match="run tm-build-engines first"):
        engine_paths(gen_export, BuildSettings("bf16", (1, 2, 4), 512), ["encoder"], tmp_path, build_missing=False)
    # The CLI: batch range and the JSON summary.
    summary = tmp_path / "build.json"
    rc = main([str(gen_export), "--graphs", "encoder", "--batch", "1", "1", "8", "--cache-dir", str(tmp_path),
               "--json", str(summary)])
    assert rc == 0, capsys.readouterr().err
    assert seen["builds"][-1]["profile"]["tokens"][2] == [8, 2 * N, D]
    rows = json.loads(summary.read_text())
    assert rows[0]["built"] and "optimisation profile" in rows[0]["reason"]
    assert main([str(gen_export), "--batch", "4", "1", "8"]) == 2
    assert "min <= opt <= max" in capsys.readouterr().err
