"""fp16 exports: validated against the fp32 reference, runnable on ONNX Runtime's CPU provider."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from tm_export.export import ExportConfig, export
from tm_runtime import TerraMindRuntime

from .conftest import random_inputs


def cfg(out, precision):
    return ExportConfig(size="tiny", modalities=["S2L2A", "S1GRD"], output_modalities=["DEM", "LULC"], out=out,
                        random_init=True, seed=2, tokenizer_size="small", precision=precision)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    export(cfg(root / "fp32", "fp32"), log=lambda s: None)
    manifest = export(cfg(root / "fp16", "fp16"), log=lambda s: None)
    return root, manifest


def initializer_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer if len(t.dims) >= 2}


def fp32_initializer_elements(path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer
               if len(t.dims) >= 2 and t.data_type == onnx.TensorProto.FLOAT)


def test_manifest_and_graph_types(pair):
    root, manifest = pair
    assert manifest["precision"] == "fp16"
    graphs = manifest["graphs"]
    for name in ("encoder", "decoder", "decoder_head_DEM", "unet_DEM", "detokenize_LULC", "embed_S2L2A"):
        assert graphs[name]["precision"] == "fp16"
        assert graphs[name]["max_rel_error"] == 1e-2
        assert graphs[name]["validation"]["passed"]
        path = root / "fp16" / graphs[name]["file"]
        assert onnx.TensorProto.FLOAT16 in initializer_types(path)
        # Only the UNet keeps fp32 weights: its timestep frequencies (a few hundred numbers), see below.
        assert fp32_initializer_elements(path) <= (1024 if name == "unet_DEM" else 0), name
        # inputs/outputs stay float32: the runtime contract does not change
        assert graphs[name]["inputs"][0]["dtype"] in ("float32", "int64")
    # FSQ rounding must give the fp32 ids: tokenizer encoders stay fp32
    assert graphs["tokenize_DEM"]["precision"] == "fp32"
    assert graphs["decoder_head_DEM"]["validation"]["argmax_agreement"] > 0.95
    assert graphs["unet_DEM"]["validation"]["min_psnr_db"] > 40
    enc16 = (root / "fp16" / "encoder.onnx").stat().st_size
    enc32 = (root / "fp32" / "encoder.onnx").stat().st_size
    assert enc16 < 0.6 * enc32


def sin_phase_outputs(path, t: int) -> np.ndarray:
    """The UNet's timestep embedding, sin(t * freq), read from the graph (added as an output)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    sin = next(n for n in model.graph.node if n.op_type == "Sin")
    model.graph.output.append(onnx.helper.make_tensor_value_info(sin.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
             for i in session.get_inputs() if i.type == "tensor(float)"}
    feeds["t"] = np.array([t], np.int64)
    return session.run([sin.output[0]], feeds)[0]


def test_fp16_unet_keeps_the_timestep_phases_in_fp32(pair):
    """sin(t * freq) with t near 1000: in fp16 the phases are off by up to 0.25 rad, and the denoising
    step's error grew with t (1e-3 of the output at t=1, 1.3e-2 at t=999 on the official UNet)."""
    root, manifest = pair
    file = manifest["graphs"]["unet_DEM"]["file"]
    want = sin_phase_outputs(root / "fp32" / file, 999)
    got = sin_phase_outputs(root / "fp16" / file, 999)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fp16_round_trip_casts_are_dropped():
    """Two fp32 nodes in a row must not be rounded to fp16 between them (the converter's cast pair)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tm_export.precision import sinusoidal_embedding_nodes, to_fp16

    freq = np.geomspace(1.0, 1e-4, 16, dtype=np.float32).reshape(1, 16)
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT, name="cast_t"),
             helper.make_node("Unsqueeze", ["tf", "axis"], ["t2"], name="unsqueeze_t"),
             helper.make_node("Mul", ["t2", "freq"], ["phase"], name="phase"),
             helper.make_node("Sin", ["phase"], ["sin"], name="sin"),
             helper.make_node("MatMul", ["sin", "w"], ["emb"], name="linear"),
             helper.make_node("Gather", ["table", "ids"], ["tok"], name="lookup")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
                     helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("tok", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(freq, "freq"), numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis"),
                     numpy_helper.from_array(freq.T.copy(), "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # the token-id path (Gather) is downstream of an integer input too, but leads to no Sin
    assert sinusoidal_embedding_nodes(model) == {"cast_t", "unsqueeze_t", "phase", "sin"}
    converted = to_fp16(model)
    assert not [n for n in converted.graph.node if n.op_type == "Cast" and n.output[0] == "phase"]
    t = np.array([999, 1], np.int64)
    emb, tok = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"t": t, "ids": np.array([0, 3], np.int64)})
    want = np.sin(t[:, None].astype(np.float64) * freq) @ w
    assert float(np.abs(emb - want).max()) < 2e-2 * float(np.abs(want).max())  # the MatMul is fp16

    # unnamed nodes (the converter's block list goes by name) are named first, not all blocked as ""
    unnamed = onnx.ModelProto.FromString(model.SerializeToString())
    for node in unnamed.graph.node:
        node.name = ""
    kept = sinusoidal_embedding_nodes(unnamed)
    assert len(kept) == 4 and "" not in kept
    assert {n.op_type for n in unnamed.graph.node if n.name in kept} == {"Cast", "Unsqueeze", "Mul", "Sin"}
    emb2, _ = ort.InferenceSession(to_fp16(unnamed).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"t": t, "ids": np.array([0, 3], np.int64)})
    np.testing.assert_allclose(emb2, emb, rtol=1e-3, atol=1e-3)


def test_fp16_runtime_close_to_fp32(pair):
    root, _ = pair
    x = random_inputs(2, seed=3, modalities=["S2L2A", "S1GRD"])
    a = TerraMindRuntime(root / "fp32").embed(x, layers="all")
    b = TerraMindRuntime(root / "fp16").embed(x, layers="all")
    for u, v in zip(a, b):
        assert v.dtype == np.float32
        assert float(np.abs(u - v).max() / np.abs(u).max()) < 1e-2
    noise = {"DEM": np.random.default_rng(0).standard_normal((2, 1, 224, 224)).astype(np.float32)}
    g32 = TerraMindRuntime(root / "fp32").generate(x, ["DEM"], timesteps=2, temperature=0.0, noise=noise,
                                                    standardize=False)
    g16 = TerraMindRuntime(root / "fp16").generate(x, ["DEM"], timesteps=2, temperature=0.0, noise=noise,
                                                    standardize=False)
    assert g16["DEM"].shape == g32["DEM"].shape and np.isfinite(g16["DEM"]).all()


def test_bf16_and_unknown_precision_are_refused(tmp_path):
    with pytest.raises(ValueError, match="bf16 graphs are not supported yet"):
        export(cfg(tmp_path / "b", "bf16"), log=lambda s: None)
    with pytest.raises(ValueError, match="--precision must be one of fp32, fp16, int8"):
        export(cfg(tmp_path / "c", "int4"), log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_fp16_graph_with_a_constant_output_loads(tmp_path):
    """A folded constant that is also a graph output (the position embedding at --image-size 256)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tm_export.precision import to_fp16

    emb = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 4)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "image"], ["tokens"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 3, 4])],
        initializer=[numpy_helper.from_array(emb, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "fp16.onnx"
    onnx.save(to_fp16(model), path)
    x = np.array([[1, 2, 3, 4]], np.float32)
    tokens, got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert got.dtype == np.float32 and tokens.dtype == np.float32
    np.testing.assert_allclose(got, emb, atol=1e-3)
    np.testing.assert_allclose(tokens, x * x, rtol=1e-3)


def test_identical_duplicate_nodes_are_dropped():
    """onnxruntime's fp16 converter before 1.32 writes one Cast per fp32 consumer of an fp16 value, all
    with the same name and output (onnxruntime-gpu 1.31.1 did so to the decoder on an H200)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tm_export.precision import drop_duplicate_nodes

    cast = helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT, name="h_cast_to_fp32_node")
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16, name="to16"), cast,
             helper.make_node("Softmax", ["h32"], ["a"], name="softmax"), cast,
             helper.make_node("LayerNormalization", ["h32", "scale"], ["b"], axis=-1, name="norm")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])],
        initializer=[onnx.numpy_helper.from_array(np.ones(4, np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(Exception, match="same node name"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = drop_duplicate_nodes(model)
    assert [n.name for n in fixed.graph.node] == ["to16", "h_cast_to_fp32_node", "softmax", "norm"]
    a, b = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    assert a.shape == b.shape == (2, 4)
