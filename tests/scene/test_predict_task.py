"""predict over GeoTIFF scenes with a real fine-tuned task export (the official tiny sen1floods11
config, every tensor random, exported from a terratorch-written checkpoint by tm-export
--task-config; shared with tests/task): equal to terratorch's own tiled_inference over
terratorch's task model, as ``terratorch predict`` runs it, on the same weights and scene."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from tests.parity.upstream import rel_error  # noqa: E402
from tests.task.terratorch_side import standardize_like_datamodule  # noqa: E402
from tm_runtime import TerraMindRuntime  # noqa: E402
from tm_runtime.scene import predict_scene  # noqa: E402
from tm_runtime.scene.cli import main  # noqa: E402

from .fakes import s2_array, write_scene  # noqa: E402

MAX_REL = 1e-4


def s1_array(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth-ish VV/VH backscatter in dB."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    vv = -12 + 3 * np.sin(cols / 19 + rng.random()) * np.cos(rows / 27)
    vh = -20 + 2 * np.cos(cols / 11 + rows / 31)
    return (np.stack([vv, vh]) + rng.normal(0, 0.5, (2, height, width))).astype(np.float32)


@pytest.fixture(scope="module")
def flood_scene(tmp_path_factory):
    """S2L1C (13 bands, int16 reflectance x 10000) and S1GRD (dB) on one 300 x 400 px grid:
    four windows with terratorch's defaults, overlapping in both directions."""
    folder = tmp_path_factory.mktemp("flood_scene")
    s2 = np.concatenate([s2_array(300, 400, seed=31), s2_array(300, 400, seed=32)[:1]])  # 13 bands
    s1 = s1_array(300, 400, seed=33)
    return {"S2L1C": (write_scene(folder / "s2l1c.tif", s2), s2), "S1GRD": (write_scene(folder / "s1.tif", s1), s1)}


@pytest.fixture(scope="module")
def terratorch_map(floods_tiny, flood_scene):
    """terratorch's tiled_inference over its task model (terratorch's predict_step), defaults, batch 4."""
    import torch
    from terratorch.tasks.tiled_inference import tiled_inference

    torch.set_float32_matmul_precision("highest")
    raw = {name: array[None].astype(np.float32) for name, (_, array) in flood_scene.items()}
    inputs = standardize_like_datamodule(floods_tiny.config, raw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiled_inference(lambda x: floods_tiny.task(x).output, inputs, batch_size=4).numpy()[0]


@pytest.mark.parity
def test_predict_scene_on_a_task_export_equals_terratorch(floods_tiny, flood_scene, terratorch_map, tmp_path):
    rt = TerraMindRuntime(floods_tiny.export, threads=2)
    out = tmp_path / "logits.tif"
    summary = predict_scene(rt, {name: path for name, (path, _) in flood_scene.items()}, out, output="logits",
                            tiling={"batch_size": 4})
    assert summary["windows"] == {"total": 4, "computed": 4, "skipped_nodata": 0, "batches": 1}
    assert summary["tiling"] | {"units": None} == {"crop": 224, "stride": 192, "delta": 8, "blend_overlaps": True,
                                                   "average_patches": True, "padding": "reflect", "batch_size": 4,
                                                   "units": None}
    with rasterio.open(out) as got, rasterio.open(flood_scene["S2L1C"][0]) as src:
        logits = got.read()
        assert got.crs == src.crs and got.transform == src.transform and got.shape == src.shape
        assert got.descriptions == ("Others", "Flood") and got.dtypes == ("float32", "float32")
    assert logits.shape == terratorch_map.shape == (2, 300, 400)
    assert rel_error(logits, terratorch_map) <= MAX_REL


@pytest.mark.parity
def test_tm_run_predict_classes_on_a_task_export(floods_tiny, flood_scene, terratorch_map, tmp_path, capsys):
    """The command line on the same export and scene: a uint8 class map with the config's class
    names, terratorch's argmax wherever the two logits are not within rounding of each other."""
    out = tmp_path / "flood.tif"
    argv = ["predict", str(floods_tiny.export), "--input", f"S2L1C={flood_scene['S2L1C'][0]}",
            "--input", f"S1GRD={flood_scene['S1GRD'][0]}", "--out", str(out), "--batch", "2", "--threads", "2",
            "--quicklook", "--json"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["command"] == "predict" and info["windows"]["batches"] == 2 and info["op"]["output"] is None
    with rasterio.open(out) as classes:
        got = classes.read(1)
        assert classes.dtypes[0] == "uint8" and classes.nodata == 255
        assert classes.tags(1)["CLASS_0"] == "Others" and classes.tags(1)["CLASS_1"] == "Flood"
        assert classes.colormap(1)[0][:3] != classes.colormap(1)[1][:3]
    decided = np.abs(terratorch_map[0] - terratorch_map[1]) > 1e-3 * np.abs(terratorch_map).max()
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(got[decided], terratorch_map.argmax(0)[decided])
    assert out.with_suffix(".png").stat().st_size > 0


def test_tm_run_predict_on_openvino_equals_ort(floods_tiny, flood_scene, tmp_path):
    """--backend openvino passes through: one window (a 208 x 208 scene is one padded window)."""
    pytest.importorskip("openvino")
    s2 = flood_scene["S2L1C"][1][:, :208, :208]
    s1 = flood_scene["S1GRD"][1][:, :208, :208]
    inputs = ["--input", f"S2L1C={write_scene(tmp_path / 's2.tif', s2)}",
              "--input", f"S1GRD={write_scene(tmp_path / 's1.tif', s1)}"]
    maps = {}
    for backend in ("ort", "openvino"):
        maps[backend] = tmp_path / f"{backend}.tif"
        assert main(["predict", str(floods_tiny.export), *inputs, "--out", str(maps[backend]), "--output", "logits",
                     "--backend", backend, "--threads", "2", "--no-progress"]) == 0
    with rasterio.open(maps["ort"]) as a, rasterio.open(maps["openvino"]) as b:
        assert rel_error(b.read(), a.read()) <= 1e-3  # OpenVINO's CPU kernels, fp32: rounding only


@pytest.mark.parity
def test_predict_scene_on_a_temporal_task_export_equals_terratorch(crop_tiny, tmp_path):
    """The official multitemporal crop model (tiny backbone, 3 dates concatenated): three 6-band
    GeoTIFFs, one per date, against terratorch's tiled_inference over its task model on the
    (1, C, T, H, W) stack, standardised by the datamodule's own statistics."""
    import torch
    from terratorch.tasks.tiled_inference import tiled_inference

    dates = [s2_array(260, 300, seed=70 + t)[[1, 2, 3, 8, 10, 11]] for t in range(3)]  # HLS's six bands
    paths = [write_scene(tmp_path / f"date{t}.tif", a) for t, a in enumerate(dates)]
    rt = TerraMindRuntime(crop_tiny.export, threads=2)
    out = tmp_path / "crops.tif"
    summary = predict_scene(rt, {"S2L2A": paths}, out, output="logits", tiling={"batch_size": 4})
    assert summary["windows"]["total"] == 4 and summary["scene"]["inputs"]["S2L2A"]["dates"] == 3

    torch.set_float32_matmul_precision("highest")
    stack = np.stack(dates, axis=1)[None].astype(np.float32)  # (1, C, T, H, W)
    inputs = standardize_like_datamodule(crop_tiny.config, {"S2L2A": stack})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = tiled_inference(lambda x: crop_tiny.task(x).output, inputs, batch_size=4).numpy()[0]
    with rasterio.open(out) as got:
        logits = got.read()
    assert logits.shape == want.shape == (13, 260, 300)
    assert rel_error(logits, want) <= MAX_REL
    # The dates are not interchangeable: swapping two changes the map by far more than the tolerance.
    swapped = tmp_path / "swapped.tif"
    predict_scene(rt, {"S2L2A": [paths[1], paths[0], paths[2]]}, swapped, output="logits", tiling={"batch_size": 4})
    with rasterio.open(swapped) as other:
        assert rel_error(other.read(), want) > 100 * MAX_REL
