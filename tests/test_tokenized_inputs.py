"""LULC and NDVI as inputs: tokenizer encoder graph -> token embedding graph -> encoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tm_export.export import ExportConfig, build_reference, build_tokenizers, export
from tm_runtime import TerraMindRuntime

from .parity.upstream import terramesh_tile


def config(out: Path) -> ExportConfig:
    return ExportConfig(size="tiny", modalities=["S2L2A", "LULC", "NDVI"], output_modalities=["DEM"], out=out,
                        random_init=True, seed=9, tokenizer_size="small")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_inputs") / "tiny"
    cfg = config(out)
    export(cfg, log=lambda s: None)
    model, _ = build_reference(cfg, log=lambda s: None)
    tokenizers, _ = build_tokenizers(cfg, ["DEM", "LULC", "NDVI"], log=lambda s: None)
    return TerraMindRuntime(out), model, tokenizers


def reference_embed(model, tokenizers, s2, lulc_onehot, ndvi_std) -> np.ndarray:
    with torch.no_grad():
        parts = [model.embedding("S2L2A")(torch.from_numpy(s2))]
        for name, image in (("LULC", lulc_onehot), ("NDVI", ndvi_std)):
            _, ids = tokenizers[name].encoder(torch.from_numpy(image))
            parts.append(model.token_embedding(name)(ids)[0])
        return model.encode(torch.cat(parts, dim=1))[-1].numpy()


def test_class_map_one_hot_and_ndvi_match_reference(setup):
    runtime, model, tokenizers = setup
    rng = np.random.default_rng(0)
    s2 = rng.standard_normal((2, 12, 224, 224)).astype(np.float32)
    classes = np.stack([terramesh_tile("LULC", i)[0] for i in range(2)]).astype(np.int64)  # values 1..9
    ndvi = np.stack([terramesh_tile("NDVI", i) for i in range(2)])
    onehot = np.eye(10, dtype=np.float32)[classes].transpose(0, 3, 1, 2)
    ndvi_std = (ndvi - 0.327) / 0.322
    ref = reference_embed(model, tokenizers, s2, onehot, ndvi_std)
    as_map = runtime.embed({"S2L2A": s2, "LULC": classes, "NDVI": ndvi_std}, merge_method=None)
    as_map_1ch = runtime.embed({"S2L2A": s2, "LULC": classes[:, None].astype(np.uint8), "NDVI": ndvi_std},
                               merge_method=None)
    as_onehot = runtime.embed({"S2L2A": s2, "LULC": onehot, "NDVI": ndvi_std}, merge_method=None)
    np.testing.assert_array_equal(as_map, as_onehot)
    np.testing.assert_array_equal(as_map, as_map_1ch)
    # a float32 (B, 1, H, W) class map, as read from a GeoTIFF, holding whole class ids
    as_float_map = runtime.embed({"S2L2A": s2, "LULC": classes[:, None].astype(np.float32), "NDVI": ndvi_std},
                                 merge_method=None)
    np.testing.assert_array_equal(as_map, as_float_map)
    assert float(np.abs(as_map - ref).max() / np.abs(ref).max()) < 1e-4
    # standardize=True applies NDVI's statistics (LULC's are identity)
    std = runtime.embed({"S2L2A": s2, "LULC": classes, "NDVI": ndvi}, merge_method=None, standardize=True)
    s2_std = runtime.embed({"S2L2A": s2 * np.asarray(runtime.manifest.modalities["S2L2A"].std, np.float32)[None, :, None, None]
                            + np.asarray(runtime.manifest.modalities["S2L2A"].mean, np.float32)[None, :, None, None],
                            "LULC": classes, "NDVI": ndvi}, merge_method=None, standardize=True)
    np.testing.assert_allclose(s2_std, as_map, atol=1e-3)
    assert std.shape == as_map.shape


def test_tokenized_inputs_in_generate(setup):
    runtime, _, _ = setup
    classes = np.random.default_rng(1).integers(0, 10, (1, 224, 224))
    out = runtime.generate({"LULC": classes}, ["DEM"], timesteps=1, seed=0)
    assert out["DEM"].shape == (1, 1, 224, 224) and np.isfinite(out["DEM"]).all()


@pytest.mark.parametrize("value, error, pattern", [
    (np.full((1, 224, 224), 10), ValueError, r"LULC: class ids must lie in \[0, 10\), got values in \[10, 10\]"),
    (np.zeros((1, 2, 224, 224), np.int64), ValueError, r"LULC: a class map must be \(B, H, W\)"),
    (np.zeros((1, 3, 224, 224), np.float32), ValueError, "LULC: expected 10 channels"),
    (np.full((1, 1, 224, 224), 2.5, np.float32), ValueError,
     r"LULC: a float32 array of shape \(1, 1, 224, 224\) is read as a class map, whose values must be whole "
     r"class ids 0..9.*or a one-hot float array \(B, 10, H, W\)"),
    (np.full((1, 224, 224), 12.0), ValueError, r"LULC: class ids must lie in \[0, 10\), got values in \[12, 12\]"),
])
def test_bad_lulc(setup, value, error, pattern):
    with pytest.raises(error, match=pattern):
        setup[0].embed({"LULC": value})


def test_tokenised_inputs_take_embeds_general_path_not_the_chain(setup):
    """embed's image-only chain (one fused model on OpenVINO) is not used once a tokenised input is in."""
    from tm_runtime.embed_chain import embed_chain

    rt, _, _ = setup
    assert embed_chain(rt.manifest, ["S2L2A"], ["layer_11"]) is not None
    assert embed_chain(rt.manifest, ["S2L2A", "LULC"], ["layer_11"]) is None
    assert embed_chain(rt.manifest, ["NDVI"], ["layer_11"]) is None
