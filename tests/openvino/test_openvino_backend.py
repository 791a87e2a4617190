"""The OpenVINO backend against ONNX Runtime on the same export: every graph (fp32, <= 1e-4
relative), the whole runtime API, the model cache, bad options and uncompilable graphs."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the OpenVINO backend needs pip install 'tm-deploy[openvino]'")

from tm_runtime import TerraMindRuntime  # noqa: E402
from tm_runtime.backends.openvino import OpenVinoError, unsupported_operators  # noqa: E402
from tm_runtime.manifest import sha256_file  # noqa: E402

from ..conftest import random_inputs  # noqa: E402

RTOL = 1e-4
LONLAT = np.array([[8.54, 47.37]])


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max())
    return float(np.abs(got.astype(np.float64) - ref).max() / (scale if scale > 0 else 1.0))


class Recorder:
    """Backend proxy: every (graph, feeds, outputs) the runtime asks for."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def run(self, name, feeds, outputs=None):
        self.calls.append((name, {k: np.array(v) for k, v in feeds.items()}, outputs))
        return self.inner.run(name, feeds, outputs)


def runtimes(export, cache, **options):
    ort_rt = TerraMindRuntime(export, threads=2)
    ov_rt = TerraMindRuntime(export, backend="openvino",
                             backend_options={"threads": 2, "cache_dir": str(cache), **options})
    return ort_rt, ov_rt


@pytest.fixture(scope="module")
def pair(all_kinds_export, ov_cache):
    return runtimes(all_kinds_export, ov_cache)


OUTPUTS = ["coords", "DEM", "LULC"]


def inputs(batch=1, seed=0):
    return random_inputs(batch, seed, ["S2L2A"])


def test_every_graph_matches_onnxruntime(pair):
    """Every graph of the export, on the feeds the runtime gives it in embed/generate/tokenize/decode."""
    ort_rt, ov_rt = pair
    recorder = Recorder(ort_rt.backend)
    ort_rt.backend = recorder
    try:
        x = inputs(batch=2)
        ort_rt.embed(x, layers="all")
        ort_rt.generate(x, OUTPUTS, timesteps=2, seed=0, temperature=0.0)
        ort_rt.generate(x, ["LULC", "DEM"], timesteps=1, seed=0)  # LULC's token embedding conditions DEM
        for target in ("DEM", "LULC"):
            shape = (2, ort_rt.manifest.targets[target].channels, 224, 224)
            ort_rt.tokenize(target, np.random.default_rng(3).standard_normal(shape).astype(np.float32))
    finally:
        ort_rt.backend = recorder.inner
    seen = {name for name, _, _ in recorder.calls}
    assert seen == set(ort_rt.manifest.graphs), sorted(set(ort_rt.manifest.graphs) - seen)
    checked = set()
    for name, feeds, outputs in recorder.calls:
        if name in checked:
            continue
        checked.add(name)
        names = outputs or ort_rt.manifest.graph(name).output_names
        ref = ort_rt.backend.run(name, feeds, names)
        got = ov_rt.backend.run(name, feeds, names)
        for out, g, r in zip(names, got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype, (name, out, g.shape, r.shape, g.dtype, r.dtype)
            if np.issubdtype(r.dtype, np.integer):  # FSQ ids: equal but for rare rounding ties
                assert (g != r).mean() <= 1e-3, (name, out)
            elif out == "quant" and name.startswith("tokenize"):
                assert (g != r).mean() <= 1e-3, (name, out)
            else:
                assert rel(g, r) <= RTOL, (name, out, rel(g, r))


def test_runtime_api_matches_onnxruntime(pair):
    ort_rt, ov_rt = pair
    x = inputs()
    for a, b in zip(ort_rt.embed(x, layers="all", merge_method=None), ov_rt.embed(x, layers="all", merge_method=None)):
        assert rel(b, a) <= RTOL
    assert rel(ov_rt.logits(x, "DEM"), ort_rt.logits(x, "DEM")) <= RTOL
    ids = np.array([[5, 8]])  # [S_1] and a token
    assert rel(ov_rt.coords_logits(x, ids), ort_rt.coords_logits(x, ids)) <= RTOL
    image = np.random.default_rng(1).standard_normal((1, 1, 224, 224)).astype(np.float32)
    tokens = ort_rt.tokenize("DEM", image)
    np.testing.assert_array_equal(ov_rt.tokenize("DEM", image), tokens)
    noise = np.random.default_rng(2).standard_normal((1, 1, 224, 224)).astype(np.float32)
    assert rel(ov_rt.decode_tokens("DEM", tokens, 3, noise=noise), ort_rt.decode_tokens("DEM", tokens, 3, noise=noise)) <= RTOL
    lulc = np.random.default_rng(4).integers(0, ort_rt.manifest.targets["LULC"].vocab_size, (1, 14, 14))
    assert rel(ov_rt.decode_tokens("LULC", lulc), ort_rt.decode_tokens("LULC", lulc)) <= RTOL


@pytest.mark.parametrize("chained", [True, False])
def test_generate_matches_onnxruntime(pair, chained):
    """Chained generation (coords conditions DEM conditions LULC) with the diffusion loop."""
    ort_rt, ov_rt = pair
    x = inputs()
    kw = dict(timesteps=3, seed=1, temperature=0.0, return_tokens=True, chained=chained)
    ref_images, ref_tokens = ort_rt.generate(x, OUTPUTS, **kw)
    images, tokens = ov_rt.generate(x, OUTPUTS, **kw)
    for name in OUTPUTS:
        np.testing.assert_array_equal(tokens[name], ref_tokens[name])
    for name in ("DEM", "LULC"):
        assert rel(images[name], ref_images[name]) <= RTOL, name
    np.testing.assert_allclose(images["coords"], ref_images["coords"])


def test_compiles_once_across_threads(all_kinds_export, ov_cache):
    _, ov_rt = runtimes(all_kinds_export, ov_cache)
    compiled = []
    real = ov_rt.backend._compile

    def counting(name, shapes=None):
        compiled.append((name, shapes))
        return real(name, shapes)

    ov_rt.backend._compile = counting
    x = inputs()
    results = [None] * 4

    def work(i):
        results[i] = ov_rt.embed(x)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # embed compiles its patch embeddings + encoder as one model (fuse_embed), once
    assert len(compiled) == len(set(compiled)) and [n for n, _ in compiled if n.startswith("chain[")]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("fuse", [False, True], ids=["graph_by_graph", "fused_chain"])
def test_static_shapes_compile_per_input_shape(tiny_export, fuse):
    """Each new input shape gets its own static compilation (up to MAX_STATIC_SHAPES per graph, then the
    dynamic one); results equal the dynamic compilation's; static_shapes=False compiles the file once.
    The same holds for embed's fused chain (patch embeddings + encoder as one model)."""
    from tm_runtime.backends.openvino import MAX_FUSED_MODELS, MAX_STATIC_SHAPES

    options = {"cache_dir": None, "threads": 1, "fuse_embed": fuse}
    static = TerraMindRuntime(tiny_export, backend="openvino", backend_options=options)
    dynamic = TerraMindRuntime(tiny_export, backend="openvino", backend_options={**options, "static_shapes": False})
    rng = np.random.default_rng(0)
    for batch in range(1, MAX_STATIC_SHAPES + 3):
        x = {"S2L2A": rng.standard_normal((batch, 12, 224, 224)).astype(np.float32)}
        np.testing.assert_allclose(static.embed(x), dynamic.embed(x), rtol=1e-5, atol=1e-5)
        static.embed(x)  # the same shape again: no new compilation
    encoder = [shapes for name, shapes in static.backend._compiled if name == "encoder"]
    if fuse:  # one fused model per shape up to MAX_FUSED_MODELS (= MAX_STATIC_SHAPES), then graph by graph
        chain = [shapes for name, shapes in static.backend._compiled if name == "chain[embed_S2L2A>encoder:layer_11]"]
        assert sorted(dict(s)["S2L2A"][0] for s in chain) == list(range(1, MAX_FUSED_MODELS + 1))
        assert sorted(dict(s)["tokens"][0] for s in encoder) == [MAX_FUSED_MODELS + 1, MAX_FUSED_MODELS + 2]
    else:
        assert len(encoder) == MAX_STATIC_SHAPES + 1 and encoder.count(None) == 1
        assert sorted(dict(s)["tokens"][0] for s in encoder if s) == list(range(1, MAX_STATIC_SHAPES + 1))
    assert [s for name, s in dynamic.backend._compiled] == ([None] if fuse else [None, None])
    with pytest.raises(ValueError, match="static_shapes must be True or False"):
        TerraMindRuntime(tiny_export, backend="openvino", backend_options={"static_shapes": "yes"})


def test_only_the_encoder_and_patch_embeddings_compile_static(all_kinds_export):
    rt = TerraMindRuntime(all_kinds_export, backend="openvino", backend_options={"cache_dir": None, "threads": 1})
    x = {"S2L2A": np.random.default_rng(1).standard_normal((1, 12, 224, 224)).astype(np.float32)}
    rt.generate(x, ["LULC"], timesteps=1, temperature=0)
    static = sorted({name for name, shapes in rt.backend._compiled if shapes is not None})
    assert static == ["embed_S2L2A", "encoder"], rt.backend._compiled.keys()
    assert ("decoder", None) in rt.backend._compiled


def test_model_cache_is_filled_and_reused(tiny_export, tmp_path):
    """The first runtime writes compiled blobs; a second one (as a second process would) loads them."""
    cache = tmp_path / "cache"
    first = TerraMindRuntime(tiny_export, backend="openvino", backend_options={"cache_dir": str(cache), "threads": 1})
    first.backend.compiled("encoder")
    blobs = sorted(p.name for p in cache.iterdir() if p.suffix == ".blob")
    assert blobs, list(cache.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.blob")}
    loaded = []
    second = TerraMindRuntime(tiny_export, backend="openvino", backend_options={"cache_dir": str(cache), "threads": 1})
    second.backend.core.set_property({"CACHE_DIR": str(cache)})
    model = second.backend.compiled("encoder")
    # OpenVINO reports whether the compiled model came from the cache.
    try:
        loaded.append(bool(model.get_property("LOADED_FROM_CACHE")))
    except RuntimeError:
        pass
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".blob") == blobs
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.blob")} == stamps
    if loaded:
        assert loaded == [True]


def test_cache_can_be_turned_off(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    rt = TerraMindRuntime(tiny_export, backend="openvino", backend_options={"cache_dir": None})
    assert "CACHE_DIR" not in rt.backend.compile_config("encoder")
    rt.backend.compiled("embed_S1GRD")
    assert not (tmp_path / "xdg").exists()
    default = TerraMindRuntime(tiny_export, backend="openvino")
    assert default.backend.compile_config("encoder")["CACHE_DIR"] == str(tmp_path / "xdg" / "tm-deploy" / "openvino")


@pytest.mark.parametrize("options, pattern", [
    ({"device": "TPU"}, "device must be one of CPU, GPU, NPU, AUTO"),
    ({"precision": "int4"}, "precision must be one of fp32, bf16, fp16"),
    ({"threads": 0}, "threads must be a positive int"),
    ({"precison": "bf16"}, "takes device, precision, threads, cache_dir, static_shapes, fuse_embed; unknown: precison"),
])
def test_bad_options_list_the_choices(tiny_export, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        TerraMindRuntime(tiny_export, backend="openvino", backend_options=options)


def test_unknown_backend_lists_openvino(tiny_export):
    with pytest.raises(ValueError, match="openvino"):
        TerraMindRuntime(tiny_export, backend="openvno")


def test_missing_device_is_named(tiny_export):
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    with pytest.raises(OpenVinoError, match="device NPU is not available here"):
        TerraMindRuntime(tiny_export, backend="openvino", backend_options={"device": "NPU"})


def test_graph_openvino_cannot_compile_names_graph_and_operator(tiny_export, tmp_path):
    """A graph with an operator OpenVINO has no conversion for (a custom-domain op)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / "manifest.json").read_text())
    entry = manifest["graphs"]["embed_S1GRD"]
    node = helper.make_node("Frobnicate", ["image"], ["tokens"], domain="tm.test", name="frob")
    emb = helper.make_node("Constant", [], ["emb"], value=helper.make_tensor("e", TensorProto.FLOAT, [1], [0.0]))
    graph = helper.make_graph([node, emb], "bad", [helper.make_tensor_value_info("image", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("tm.test", 1)]),
              str(export / entry["file"]))
    entry["sha256"] = sha256_file(export / entry["file"])
    (export / "manifest.json").write_text(json.dumps(manifest))
    rt = TerraMindRuntime(export, backend="openvino", backend_options={"cache_dir": None})
    with pytest.raises(OpenVinoError, match=r"graph 'embed_S1GRD' .*unsupported operator\(s\): tm\.test\.Frobnicate"):
        rt.embed(random_inputs(1, 0, ["S1GRD"]))


def test_unsupported_operators_parses_the_report():
    message = "Summary:\n-- No conversion rule found for operations: com.microsoft.Foo, Bar\n"
    assert unsupported_operators(message) == ["com.microsoft.Foo", "Bar"]
    assert unsupported_operators("something else") == []


def test_openvino_is_optional(tiny_export, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(OpenVinoError, match=r"pip install 'tm-deploy\[openvino\]'"):
        TerraMindRuntime(tiny_export, backend="openvino")
    TerraMindRuntime(tiny_export).embed(random_inputs(1, 0, ["S1GRD"]))  # the default backend does not need it


def test_openvino_session_compiles_only_what_calls_will_use(tiny_export):
    rt = TerraMindRuntime(tiny_export, backend="openvino", backend_options={"cache_dir": None})
    backend = rt.backend
    assert backend.session("encoder") is None and backend.session("embed_S2L2A") is None  # static at first call
    assert not backend._compiled
    with pytest.raises(KeyError, match="not in this export"):
        backend.session("nope")
    rt.embed(random_inputs(1, 0, ["S2L2A"]))  # one model: the patch embedding + encoder chain
    assert {name for name, shapes in backend._compiled} == {"chain[embed_S2L2A>encoder:layer_11]"}
    assert all(shapes is not None for _, shapes in backend._compiled)
    assert set(backend.session_seconds) == {"chain[embed_S2L2A>encoder:layer_11]"}
    dynamic = TerraMindRuntime(tiny_export, backend="openvino",
                               backend_options={"cache_dir": None, "static_shapes": False}).backend
    assert dynamic.session("encoder") is not None and list(dynamic._compiled) == [("encoder", None)]


def test_tm_bench_embed_on_openvino(tiny_export, tmp_path, capsys):
    from tm_bench.cli import main

    out = tmp_path / "embed.json"
    assert main(["embed", str(tiny_export), "--backend", "openvino", "--iters", "1", "--warmup", "0",
                 "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["engine"] == "openvino-fp32" and result["settings"]["openvino"]["device"] == "CPU"
    assert {r["engine"] for r in result["runs"][0]["rows"]} == {"openvino-fp32"}
    assert "openvino-fp32 embed" in capsys.readouterr().out
    # the static-shape graphs were compiled at their first call, and only then: no unused dynamic model
    # (per-graph rows run each graph; embed runs them as one fused chain, compiled at its first call too)
    chains = result["settings"]["openvino"]["fused_chains"]
    assert len(chains) == 1 and chains[0].startswith("chain[")
    assert set(result["session_creation_s"]) == {"embed_S2L2A", "embed_S1GRD", "embed_DEM", "encoder", *chains}
    # --precision is OpenVINO's; on ONNX Runtime the export's precision applies
    assert main(["embed", str(tiny_export), "--precision", "bf16", "--iters", "1"]) == 1
    assert "needs --backend openvino" in capsys.readouterr().err
