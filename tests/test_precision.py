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


def test_manifest_and_graph_types(pair):
    root, manifest = pair
    assert manifest["precision"] == "fp16"
    graphs = manifest["graphs"]
    for name in ("encoder", "decoder", "decoder_head_DEM", "unet_DEM", "detokenize_LULC", "embed_S2L2A"):
        assert graphs[name]["precision"] == "fp16"
        assert graphs[name]["max_rel_error"] == 1e-2
        assert graphs[name]["validation"]["passed"]
        assert initializer_types(root / "fp16" / graphs[name]["file"]) == {onnx.TensorProto.FLOAT16}
        # inputs/outputs stay float32: the runtime contract does not change
        assert graphs[name]["inputs"][0]["dtype"] in ("float32", "int64")
    # FSQ rounding must give the fp32 ids: tokenizer encoders stay fp32
    assert graphs["tokenize_DEM"]["precision"] == "fp32"
    assert graphs["decoder_head_DEM"]["validation"]["argmax_agreement"] > 0.95
    assert graphs["unet_DEM"]["validation"]["min_psnr_db"] > 40
    enc16 = (root / "fp16" / "encoder.onnx").stat().st_size
    enc32 = (root / "fp32" / "encoder.onnx").stat().st_size
    assert enc16 < 0.6 * enc32


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
