"""predict over GeoTIFF scenes with a cheap stand-in task runtime (fakes.py; the real task export is
in test_predict_task.py): equal to terratorch's tiled_inference on the whole array, georeferenced,
atomic, nodata-aware; bands, grids, extents, task defaults and TiM seeds."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from tm_runtime.scene import TilingParams, predict_scene  # noqa: E402

from .fakes import FakeTaskRuntime, s2_array, window_function, write_scene  # noqa: E402


def _terratorch_logits(rt: FakeTaskRuntime, arrays: dict[str, np.ndarray], **kw) -> np.ndarray:
    torch = pytest.importorskip("torch")
    pytest.importorskip("terratorch")
    from terratorch.tasks.tiled_inference import tiled_inference

    torch.set_float32_matmul_precision("highest")
    names = list(arrays)
    stacked = torch.from_numpy(np.concatenate([arrays[n].astype(np.float32) for n in names]))[None]
    bounds = np.cumsum([0] + [arrays[n].shape[0] for n in names])

    def forward(t):
        x = t.numpy()
        return torch.from_numpy(window_function(rt.weights, {n: x[:, bounds[i]:bounds[i + 1]]
                                                             for i, n in enumerate(names)}))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiled_inference(forward, stacked, **kw).numpy()[0]


@pytest.mark.parity
def test_predict_scene_equals_terratorch_and_keeps_georeferencing(s2_scene, tmp_path):
    path, array = s2_scene
    rt = FakeTaskRuntime()
    logits = tmp_path / "logits.tif"
    summary = predict_scene(rt, {"S2L2A": path}, logits, output="logits", tiling=TilingParams(batch_size=5))
    expected = _terratorch_logits(rt, {"S2L2A": array}, batch_size=5)
    with rasterio.open(logits) as out, rasterio.open(path) as src:
        np.testing.assert_allclose(out.read(), expected, rtol=0, atol=1e-4)
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
        assert out.profile["tiled"] and out.profile["compress"] == "deflate"
        assert out.descriptions == tuple(rt.task.class_names) and out.dtypes[0] == "float32"
    assert summary["windows"] == {"total": 16, "computed": 16, "skipped_nodata": 0, "batches": 4}
    assert rt.calls == 4  # batches of 5 windows: 5, 5, 5, 1

    classes = tmp_path / "classes.tif"
    predict_scene(rt, {"S2L2A": path}, classes, quicklook=True)
    with rasterio.open(classes) as out:
        np.testing.assert_array_equal(out.read(1), expected.argmax(0))
        assert out.dtypes[0] == "uint8" and out.nodata == 255
        assert out.colormap(1)[1][:3] != out.colormap(1)[0][:3]
        assert out.tags(1)["CLASS_3"] == "class 3" and "TM_TILING" in out.tags()
    assert (tmp_path / "classes.png").stat().st_size > 0

    probs = tmp_path / "probs.tif"
    predict_scene(rt, {"S2L2A": path}, probs, output="probabilities", cog=True)
    with rasterio.open(probs) as out:
        p = out.read()
        e = np.exp(expected - expected.max(0))
        np.testing.assert_allclose(p, e / e.sum(0), rtol=0, atol=1e-5)
        assert out.overviews(1) and out.profile["blockxsize"] >= 64  # COG: tiled with overviews


@pytest.mark.parity
def test_two_modalities_on_different_grids_are_aligned(tmp_path):
    """S1 at 20 m in another CRS: warped (bilinear) onto the S2 grid window by window, equal to
    warping the whole file first with rasterio.warp.reproject."""
    from rasterio.warp import Resampling, reproject
    from rasterio.warp import transform as warp_points

    s2 = s2_array(400, 450, seed=2)
    s2_path = write_scene(tmp_path / "s2.tif", s2)
    # The same area in UTM 33N at 20 m, a little larger so it covers the S2 grid.
    (x0,), (y0,) = warp_points("EPSG:32632", "EPSG:32633", [500000.0 - 1000], [5000000.0 + 1000])
    # Smooth fields: GDAL's warper approximates the coordinate transform to 1/8 pixel (per request),
    # so windowed and whole-file warps of white noise would differ; of smooth data, they agree.
    rows, cols = np.mgrid[0:340, 0:360].astype(np.float32)
    s1 = np.stack([-15 + 3 * np.sin(cols / 17) * np.cos(rows / 23), -22 + 2 * np.cos(cols / 13 + rows / 29)])
    s1_path = write_scene(tmp_path / "s1.tif", s1.astype(np.float32), crs="EPSG:32633", res=20.0, origin=(x0, y0))
    rt = FakeTaskRuntime(modalities=("S2L2A", "S1GRD"))
    rt.weights["S1GRD"] *= 100  # let S1 matter as much as S2 in the logits
    out = tmp_path / "map.tif"
    predict_scene(rt, {"S2L2A": s2_path, "S1GRD": s1_path}, out, output="logits")

    with rasterio.open(s2_path) as ref, rasterio.open(s1_path) as src:
        warped = np.zeros((2, ref.height, ref.width), np.float32)
        reproject(src.read(), warped, src_transform=src.transform, src_crs=src.crs, dst_transform=ref.transform,
                  dst_crs=ref.crs, resampling=Resampling.bilinear)
    expected = _terratorch_logits(rt, {"S2L2A": s2, "S1GRD": warped})
    with rasterio.open(out) as result:
        got = result.read()
    # Tolerance: GDAL's warper approximates the coordinate transform to 1/8 pixel per request, so
    # the warped S1 differs by up to ~0.01 dB between the two; a pixel out of place would be ~1 dB.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert np.median(np.abs(got - expected)) < 1e-5


def test_different_extents_use_the_intersection(tmp_path):
    s2_path = write_scene(tmp_path / "s2.tif", s2_array(300, 400))
    # S1 covers only the eastern 250 columns of the S2 grid (same CRS and resolution).
    s1 = np.full((2, 300, 250), -12.0, np.float32)
    s1_path = write_scene(tmp_path / "s1.tif", s1, origin=(500000.0 + 1500, 5000000.0))
    rt = FakeTaskRuntime(modalities=("S2L2A", "S1GRD"))
    with pytest.warns(UserWarning, match="intersection"):
        summary = predict_scene(rt, {"S2L2A": s2_path, "S1GRD": s1_path}, tmp_path / "m.tif")
    with rasterio.open(tmp_path / "m.tif") as out:
        assert out.shape == (300, 250)
        assert out.transform.c == 500000.0 + 1500 and out.transform.f == 5000000.0
    assert summary["scene"]["window"] == [0, 300, 150, 400]


def test_grids_that_do_not_overlap_are_an_error(tmp_path):
    s2_path = write_scene(tmp_path / "s2.tif", s2_array(64, 64))
    s1_path = write_scene(tmp_path / "s1.tif", np.zeros((2, 64, 64), np.float32), origin=(600000.0, 5000000.0))
    with pytest.raises(ValueError, match="S1GRD: .*does not overlap S2L2A's grid"):
        predict_scene(FakeTaskRuntime(("S2L2A", "S1GRD")), {"S2L2A": s2_path, "S1GRD": s1_path}, tmp_path / "m.tif")
    assert list(tmp_path.iterdir()) == [s1_path, s2_path] or sorted(tmp_path.iterdir()) == sorted([s1_path, s2_path])


def test_nodata_windows_are_skipped_and_written_as_nodata(tmp_path):
    array = s2_array(600, 700, seed=6)
    array[:, :300, :] = 0  # the northern half is nodata
    array[:, 450:460, 100:110] = 0  # and a hole
    path = write_scene(tmp_path / "s2.tif", array, nodata=0)
    rt = FakeTaskRuntime()
    summary = predict_scene(rt, {"S2L2A": path}, tmp_path / "m.tif", output="logits")
    assert summary["windows"]["skipped_nodata"] == 4  # the first row of windows sees only nodata
    with rasterio.open(tmp_path / "m.tif") as out:
        values = out.read()
    assert np.isnan(values[:, :300]).all() and np.isnan(values[:, 450:460, 100:110]).all()
    valid = np.ones((600, 700), bool)
    valid[:300] = False
    valid[450:460, 100:110] = False
    assert np.isfinite(values[:, valid]).all()


def test_bands_by_name_index_and_errors(s2_scene, tmp_path):
    path, array = s2_scene
    rt = FakeTaskRuntime()
    reference = tmp_path / "ref.tif"
    predict_scene(rt, {"S2L2A": path}, reference, output="logits")
    # A 13-band file, bands shuffled, described by Sentinel-2 band codes: selected by name.
    codes = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
    order = np.random.default_rng(0).permutation(12)
    shuffled = np.concatenate([array[order], np.zeros((1, 600, 700), np.int16)])
    described = write_scene(tmp_path / "described.tif", shuffled, descriptions=[codes[i] for i in order] + ["B10"])
    out = tmp_path / "named.tif"
    predict_scene(rt, {"S2L2A": described}, out, output="logits")
    with rasterio.open(reference) as a, rasterio.open(out) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    # By 1-based index, as --bands S2L2A=...
    by_index = [int(np.where(order == i)[0][0]) + 1 for i in range(12)]
    predict_scene(rt, {"S2L2A": described}, tmp_path / "indexed.tif", output="logits", bands={"S2L2A": by_index})
    with rasterio.open(reference) as a, rasterio.open(tmp_path / "indexed.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    with pytest.raises(ValueError, match="band 'B99' not found in .*descriptions"):
        predict_scene(rt, {"S2L2A": described}, tmp_path / "x.tif", bands={"S2L2A": codes[:11] + ["B99"]})
    with pytest.raises(ValueError, match="13 bands .*expects 12"):
        predict_scene(rt, {"S2L2A": write_scene(tmp_path / "plain13.tif", shuffled)}, tmp_path / "x.tif")
    with pytest.raises(ValueError, match="11 bands selected"):
        predict_scene(rt, {"S2L2A": described}, tmp_path / "x.tif", bands={"S2L2A": codes[:11]})
    assert not (tmp_path / "x.tif").exists()


def test_no_overwrite_unreadable_input_and_failures_leave_nothing(s2_scene, tmp_path):
    path, _ = s2_scene
    out = tmp_path / "m.tif"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        predict_scene(FakeTaskRuntime(), {"S2L2A": path}, out)
    assert out.read_bytes() == b"keep me"

    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(path.read_bytes()[:5000])
    with pytest.raises((ValueError, OSError), match="S2L2A"):
        predict_scene(FakeTaskRuntime(), {"S2L2A": corrupt}, tmp_path / "c.tif")
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict_scene(FakeTaskRuntime(), {"S2L2A": tmp_path / "missing.tif"}, tmp_path / "c.tif")
    with pytest.raises(RuntimeError, match="injected"):
        predict_scene(FakeTaskRuntime(fail_after=2), {"S2L2A": path}, out, overwrite=True,
                      tiling=TilingParams(batch_size=4), quicklook=True)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.tif", "m.tif"]  # no temporary files left


def test_wrong_inputs_for_the_task(s2_scene, tmp_path):
    path, _ = s2_scene
    concat = FakeTaskRuntime(("S2L2A", "S1GRD"))
    concat.task.merge_method = "concat"  # 'mean' takes any of its modalities, 'concat' needs them all
    with pytest.raises(ValueError, match="takes all of S2L2A, S1GRD"):
        predict_scene(concat, {"S2L2A": path}, tmp_path / "m.tif")
    with pytest.raises(ValueError, match="takes one or more of S1GRD .*got inputs S2L2A"):
        predict_scene(FakeTaskRuntime(("S1GRD",)), {"S2L2A": path}, tmp_path / "m.tif")
    with pytest.raises(ValueError, match="crop .*image size"):
        predict_scene(FakeTaskRuntime(), {"S2L2A": path}, tmp_path / "m.tif", tiling=TilingParams(crop=256))
    with pytest.raises(ValueError, match="regression"):
        predict_scene(FakeTaskRuntime(task_type="regression"), {"S2L2A": path}, tmp_path / "m.tif", output="classes")


def test_small_scene_and_geoarray_input(tmp_path):
    """A scene smaller than one window is padded (documented); in-memory arrays with a transform work."""
    from rasterio.transform import from_origin

    from tm_runtime.scene import GeoArray

    array = s2_array(100, 130, seed=8)
    rt = FakeTaskRuntime()
    transform = from_origin(300000.0, 4000000.0, 10.0, 10.0)
    predict_scene(rt, {"S2L2A": GeoArray(array, transform, "EPSG:32631")}, tmp_path / "small.tif", output="logits")
    padded = np.pad(array.astype(np.float32), ((0, 0), (0, 124), (0, 94)), mode="reflect")
    with rasterio.open(tmp_path / "small.tif") as out:
        assert out.shape == (100, 130) and out.transform == transform and out.crs == "EPSG:32631"
        np.testing.assert_allclose(out.read(), window_function(rt.weights, {"S2L2A": padded[None]})[0, :, :100, :130],
                                   rtol=0, atol=1e-5)


def test_memory_held_does_not_grow_with_scene_height(tmp_path):
    """Streaming: the rows held for blending are one band of windows, whatever the height."""
    rt = FakeTaskRuntime(num_classes=2)
    held = {}
    for height in (300, 1500):
        path = write_scene(tmp_path / f"s2_{height}.tif", s2_array(height, 230, seed=height))
        with rasterio.open(path) as dataset:  # an open dataset works as an input too
            summary = predict_scene(rt, {"S2L2A": dataset}, tmp_path / f"m_{height}.tif", output="probabilities")
        held[height] = summary["accumulator_bytes"]
        with rasterio.open(tmp_path / f"m_{height}.tif") as out:
            assert out.shape == (height, 230)
    assert held[300] == held[1500] <= 224 * 230 * (2 * 4 + 4 + 1)


def test_nodata_fill_is_what_standardises_to_zero(tmp_path):
    """Nodata pixels reach the model as the task config's means (standardize=True) or as 0 (inputs
    already standardised), so that they are neutral after standardisation."""
    array = s2_array(150, 160, seed=13).astype(np.float32)
    array[:, 40:60, 50:70] = np.nan
    path = write_scene(tmp_path / "s2.tif", array)
    rt = FakeTaskRuntime()
    means = np.arange(12, dtype=np.float32) * 100 + 7
    rt.task.standardization = {"S2L2A": (means, np.ones(12, np.float32))}
    predict_scene(rt, {"S2L2A": path}, tmp_path / "a.tif")
    hole = rt.last_inputs["S2L2A"][0][:, 8 + 45, 8 + 55]  # inside the hole (windows start at -delta)
    assert rt.last_standardize and np.array_equal(hole, means)
    predict_scene(rt, {"S2L2A": path}, tmp_path / "b.tif", standardize=False)
    assert not rt.last_standardize and not rt.last_inputs["S2L2A"][0][:, 8 + 45, 8 + 55].any()


def test_task_tiling_parameters_are_the_defaults(s2_scene, tmp_path):
    """A task config's tiled_inference_parameters (terratorch's keywords) set predict's windows;
    what the caller gives changes only those settings."""
    path, array = s2_scene
    rt = FakeTaskRuntime()
    rt.task.tiled_inference = {"h_crop": 224, "w_crop": 224, "stride": 160, "delta": 16, "batch_size": 3}
    summary = predict_scene(rt, {"S2L2A": path}, tmp_path / "a.tif", output="logits")
    assert (summary["tiling"]["stride"], summary["tiling"]["delta"], summary["tiling"]["batch_size"]) == (160, 16, 3)
    with rasterio.open(tmp_path / "a.tif") as out:
        np.testing.assert_allclose(out.read(), _terratorch_logits(rt, {"S2L2A": array}, stride=160, delta=16),
                                   rtol=0, atol=1e-4)
    summary = predict_scene(rt, {"S2L2A": path}, tmp_path / "b.tif", tiling={"batch_size": 8, "padding": None})
    assert summary["tiling"]["stride"] == 160 and summary["tiling"]["batch_size"] == 8
    assert summary["tiling"]["padding"] is None
    rt.task.tiled_inference = {"h_crop": 224, "w_crop": 256}
    with pytest.raises(ValueError, match="h_crop .*w_crop .*square"):
        predict_scene(rt, {"S2L2A": path}, tmp_path / "c.tif")


class FakeTimTaskRuntime(FakeTaskRuntime):
    """A TiM task model's sampling, reduced to what scenes rely on: draws that depend on the seed."""

    tim = SimpleNamespace(temperature=1.0)

    def predict(self, inputs, standardize=True, output="logits", seed=None, **tim):
        self.seeds.append(seed)
        self.tim_args = tim
        logits = super().predict(inputs, standardize, output)
        draws = np.random.default_rng(seed).random(len(logits)) if tim.get("tim_temperature", 1.0) else 0.0
        return logits + np.reshape(draws, (-1, 1, 1, 1)).astype(np.float32)


def test_tim_task_models_sample_each_window_from_its_own_seed(tmp_path):
    """The map does not depend on batching; the scene seed is drawn when not given, and reported;
    temperature 0 batches the windows (deterministic)."""
    path = write_scene(tmp_path / "s2.tif", s2_array(300, 400, seed=14))
    rt = FakeTimTaskRuntime()
    rt.seeds = []
    maps = {}
    for batch in (1, 3):
        maps[batch] = tmp_path / f"b{batch}.tif"
        predict_scene(rt, {"S2L2A": path}, maps[batch], output="logits", seed=7, tiling={"batch_size": batch})
    assert rt.seeds[:4] == rt.seeds[4:] and len(set(rt.seeds)) == 4  # one call per window, four window seeds
    with rasterio.open(maps[1]) as a, rasterio.open(maps[3]) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    summary = predict_scene(rt, {"S2L2A": path}, tmp_path / "drawn.tif")
    assert isinstance(summary["op"]["seed"], int)
    rt.seeds, rt.calls = [], 0
    predict_scene(rt, {"S2L2A": path}, tmp_path / "argmax.tif", tim_temperature=0.0, tiling={"batch_size": 4})
    assert rt.calls == 1 and rt.tim_args == {"tim_temperature": 0.0}
    with pytest.raises(ValueError, match="tim_temperature given, but this task model has no TiM backbone"):
        predict_scene(FakeTaskRuntime(), {"S2L2A": path}, tmp_path / "x.tif", tim_temperature=0.5)
