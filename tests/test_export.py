"""The export directory: graphs, symbolic dims, manifest, atomicity, sha256, external data, bands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tm_export.export import ExportConfig, ExportError, ValidationFailed, export
from tm_runtime import ManifestError, TerraMindRuntime, load_manifest

QUIET = {"log": lambda s: None}


def dims(value) -> tuple:
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)


def test_graphs_have_symbolic_batch_and_tokens(tiny_export):
    enc = onnx.load(str(tiny_export / "encoder.onnx"), load_external_data=False)
    assert dims(enc.graph.input[0]) == ("batch", "num_tokens", 192)
    assert [o.name for o in enc.graph.output] == [f"layer_{i}" for i in range(12)]
    assert all(dims(o) == ("batch", "num_tokens", 192) for o in enc.graph.output)
    emb = onnx.load(str(tiny_export / "embed_S2L2A.onnx"), load_external_data=False)
    assert dims(emb.graph.input[0]) == ("batch", 12, 224, 224)
    assert dims(emb.graph.output[0]) == ("batch", 196, 192)


def test_manifest_contents(tiny_export):
    m = json.loads((tiny_export / "manifest.json").read_text())
    assert m["format"] == "tm-deploy-export" and m["format_version"] == 2
    assert m["model"]["size"] == "tiny" and m["model"]["dim"] == 192
    assert m["weights"] == {"random_init": True, "seed": 7, "source": "random-init", "tokenizers": {}}
    assert list(m["modalities"]) == ["S2L2A", "S1GRD", "DEM"]
    assert m["modalities"]["S1GRD"]["bands"] == ["VV", "VH"]
    assert m["modalities"]["DEM"]["mean"] == [670.665] and m["modalities"]["DEM"]["std"] == [951.272]
    assert set(m["graphs"]) == {"embed_S2L2A", "embed_S1GRD", "embed_DEM", "encoder"}
    for name, g in m["graphs"].items():
        assert len(g["sha256"]) == 64 and g["opset"] == 17
        assert g["validation"]["passed"] and g["validation"]["max_rel"] <= 1e-4
        assert g["validation"]["batches"] == [1, 3]
        assert {"name", "dtype", "shape"} <= set(g["inputs"][0])
    for key in ("torch", "onnx", "onnxruntime", "tm_deploy"):
        assert key in m["exporter"]
    assert m["validation"]["passed"] is True


def test_tampered_graph_is_refused(tiny_export, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_export.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with open(copy / "embed_DEM.onnx", "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\0" * 10)
    # Checked when the graph is first used: the other modalities still embed, DEM is refused.
    rt = TerraMindRuntime(copy)
    assert rt.embed({"S1GRD": np.zeros((1, 2, 224, 224), np.float32)}).shape == (1, 196, 192)
    with pytest.raises(ManifestError, match="embed_DEM.*sha256"):
        rt.embed({"DEM": np.zeros((1, 1, 224, 224), np.float32)})
    with pytest.raises(ManifestError, match="embed_DEM.*sha256"):
        TerraMindRuntime(copy, backend=rt.backend)  # a backend object: every file checked at load
    (copy / "encoder.onnx").unlink()
    with pytest.raises(ManifestError, match="encoder.onnx is missing"):
        load_manifest(copy).verify(["encoder"])


def test_not_an_export(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json not found"):
        TerraMindRuntime(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tm-deploy-export", "format_version": 99}))
    with pytest.raises(ManifestError, match="format version 99"):
        TerraMindRuntime(tmp_path)
    # version 1 (a whole decoder per output) is not read, and the error says to re-export
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tm-deploy-export", "format_version": 1}))
    with pytest.raises(ManifestError, match="format version 1 .*Re-export it with this version's tm-export"):
        TerraMindRuntime(tmp_path)


def test_failed_validation_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    cfg = ExportConfig(size="tiny", modalities=["DEM"], out=out, random_init=True, max_rel_error=1e-30)
    with pytest.raises(ValidationFailed, match="over tolerance"):
        export(cfg, **QUIET)
    assert list(tmp_path.iterdir()) == []  # neither --out nor a temporary directory


def test_cli_exit_code_and_existing_out(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tm_export.cli", "--model", "tiny", "--modalities", "DEM", "--random-init",
           "--out", str(out), "--rtol", "1e-30"]
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1 and "over tolerance" in failed.stderr
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(ExportConfig(size="tiny", modalities=["DEM"], out=out, random_init=True, validate=False), **QUIET)
    assert (out / "keep.txt").exists()


def test_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.onnx").write_text("old")
    export(ExportConfig(size="tiny", modalities=["DEM"], out=out, random_init=True, overwrite=True,
                        validate=False), **QUIET)
    assert not (out / "stale.onnx").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import tm_export.export as ex

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(size="tiny", modalities=["DEM"], out=tmp_path / "out", random_init=True,
                            validate=False), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_external_data_is_used_for_big_graphs(tmp_path):
    out = tmp_path / "ext"
    # A 1 MB threshold forces what a >2 GB graph (large) gets: weights in a side file.
    export(ExportConfig(size="tiny", modalities=["S1GRD"], out=out, random_init=True,
                        external_data_threshold=1_000_000), **QUIET)
    m = load_manifest(out)
    ext = m.graph("encoder").external_data
    assert [e["file"] for e in ext] == ["encoder.onnx.data"]
    assert (out / "encoder.onnx").stat().st_size < 1_000_000
    assert (out / "encoder.onnx.data").stat().st_mode & 0o044 == 0o044  # readable like the graphs
    # nothing but the manifest, the graphs and their data files (no tracer leftovers)
    listed = {g.file for g in m.graphs.values()} | {e["file"] for g in m.graphs.values() for e in g.external_data}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json"}
    rt = TerraMindRuntime(out)
    emb = rt.embed({"S1GRD": np.zeros((1, 2, 224, 224), np.float32)})
    assert emb.shape == (1, 196, 192)
    with open(out / "encoder.onnx.data", "r+b") as f:
        f.write(b"\1\2\3")
    with pytest.raises(ManifestError, match="encoder.onnx.data has sha256"):
        TerraMindRuntime(out).embed({"S1GRD": np.zeros((1, 2, 224, 224), np.float32)})


def test_band_subset_and_image_size(tmp_path):
    import torch

    from tm_export.export import build_reference

    bands = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
    cfg = ExportConfig(size="tiny", modalities=["S2L2A"], out=tmp_path / "b", random_init=True, seed=3,
                       bands={"S2L2A": bands}, image_size=256)
    export(cfg, **QUIET)
    m = load_manifest(cfg.out)
    s2 = m.modalities["S2L2A"]
    assert s2.bands == tuple(bands) and s2.num_channels == 6
    assert s2.mean[0] == 1503.317 and s2.std[-1] == 1334.311  # BLUE's and SWIR_2's statistics
    assert m.image_size == 256
    # The 6-band embedding equals the full one with the other bands' pixels set to zero.
    full, _ = build_reference(ExportConfig(size="tiny", modalities=["S2L2A"], out=tmp_path / "u",
                                           random_init=True, seed=3, image_size=256), log=lambda s: None)
    rng = np.random.default_rng(0)
    image6 = rng.standard_normal((1, 6, 256, 256)).astype(np.float32)
    image12 = np.zeros((1, 12, 256, 256), np.float32)
    image12[:, [1, 2, 3, 8, 10, 11]] = image6
    with torch.no_grad():
        ref = full.embedding("S2L2A")(torch.from_numpy(image12)).numpy()
    got = TerraMindRuntime(cfg.out).patch_embed("S2L2A", image6)
    assert got.shape == (1, 256, 192)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_no_simplify_keeps_the_declared_dims(tmp_path):
    out = tmp_path / "raw"
    export(ExportConfig(size="tiny", modalities=["S1GRD"], out=out, random_init=True, simplify=False), **QUIET)
    emb = onnx.load(str(out / "embed_S1GRD.onnx"))
    assert dims(emb.graph.output[0]) == ("batch", 196, 192)
    assert load_manifest(out).graph("encoder").raw["simplified"] is False


def test_bad_export_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown band.*PURPLE"):
        from tm_export.bands import parse_bands

        parse_bands(["S2L2A=BLUE,PURPLE"])
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        export(ExportConfig(size="huge", modalities=["DEM"], out=tmp_path / "x", random_init=True), **QUIET)
    with pytest.raises(ValueError, match="unknown modality 'LIDAR'; known input modalities: .*NDVI, coords"):
        export(ExportConfig(size="tiny", modalities=["LIDAR"], out=tmp_path / "x", random_init=True), **QUIET)
    with pytest.raises(ExportError, match="--bands names S1GRD"):
        export(ExportConfig(size="tiny", modalities=["DEM"], out=tmp_path / "x", random_init=True,
                            bands={"S1GRD": ["VV"]}), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_specialised_batch_is_an_error():
    from onnx import TensorProto, helper

    from tm_export.export import check_dims
    from tm_export.graphs import GraphSpec, TensorDecl

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])  # batch baked in as 2
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["y_dim_0", "y_dim_1"])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    spec = GraphSpec("g", module=None, inputs=[TensorDecl("x", "float32", ("batch", 4))],
                     outputs=[TensorDecl("y", "float32", ("batch", 4))], sample=None)
    with pytest.raises(ExportError, match=r"x was saved with shape \(2, 4\).*specialised"):
        check_dims(spec, model)
    x.type.tensor_type.shape.dim[0].dim_param = "N"
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    check_dims(spec, model)  # unnamed or misnamed symbolic dims get the declared names and values
    assert dims(model.graph.input[0]) == ("batch", 4) and dims(model.graph.output[0]) == ("batch", 4)
