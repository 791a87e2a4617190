"""Multi-temporal task models over scenes: one raster per date, stacked into the (B, C, T, H, W)
windows a temporal model takes; date order, per-date nodata and fill, and the date-count errors.
(Equality with terratorch's tiled inference on a real temporal export: test_predict_task.py.)"""
from __future__ import annotations

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from tm_runtime.scene import embed_scene, predict_scene  # noqa: E402
from tm_runtime.scene.cli import main  # noqa: E402
from tm_runtime.scene.source import date_sources  # noqa: E402
from tm_runtime.task import TemporalInfo  # noqa: E402

from .fakes import FakeTaskRuntime, s2_array, window_function, write_scene  # noqa: E402


class FakeTemporalRuntime(FakeTaskRuntime):
    """A temporal task model: (B, C, T, H, W) in; each date weighted differently, so that dates
    given in another order give another map."""

    def __init__(self, pooling: str = "concat", n_timestamps: int | None = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.task.temporal = TemporalInfo(pooling, n_timestamps, None)
        self.seen: list[dict[str, np.ndarray]] = []

    def predict(self, inputs, standardize=True, output="logits"):
        assert all(a.ndim == 5 for a in inputs.values()), {m: a.shape for m, a in inputs.items()}
        self.seen.append({m: a.copy() for m, a in inputs.items()})
        steps = next(iter(inputs.values())).shape[2]
        return sum((t + 1) * window_function(self.weights, {m: a[:, :, t] for m, a in inputs.items()})
                   for t in range(steps)).astype(np.float32)


@pytest.fixture
def three_dates(tmp_path):
    arrays = [s2_array(224, 224, seed=40 + t) for t in range(3)]
    return [write_scene(tmp_path / f"date{t}.tif", a) for t, a in enumerate(arrays)], arrays


def test_dates_reach_the_model_as_b_c_t_h_w_in_order(three_dates, tmp_path):
    paths, arrays = three_dates
    rt = FakeTemporalRuntime()
    summary = predict_scene(rt, {"S2L2A": paths}, tmp_path / "map.tif", output="logits", standardize=False,
                            tiling={"padding": None})
    (window,) = rt.seen  # a 224 x 224 scene is one window
    got = window["S2L2A"]
    assert got.shape == (1, 12, 3, 224, 224)
    for t, array in enumerate(arrays):
        np.testing.assert_array_equal(got[0, :, t], array.astype(np.float32))
    assert summary["scene"]["inputs"]["S2L2A"]["dates"] == 3
    assert summary["scene"]["inputs"]["S2L2A"]["source"] == [str(p) for p in paths]
    # Another date order is another input: the map changes.
    predict_scene(rt, {"S2L2A": paths[::-1]}, tmp_path / "reversed.tif", output="logits", standardize=False,
                  tiling={"padding": None})
    with rasterio.open(tmp_path / "map.tif") as a, rasterio.open(tmp_path / "reversed.tif") as b:
        assert not np.allclose(a.read(), b.read())


def test_a_pixel_is_valid_where_every_date_is_and_each_date_fills_its_own_gaps(tmp_path):
    arrays = [s2_array(224, 224, seed=50 + t) for t in range(3)]
    arrays[1][:, 100:110, 40:60] = -1  # nodata on the second date only
    paths = [write_scene(tmp_path / f"d{t}.tif", a, nodata=-1) for t, a in enumerate(arrays)]
    rt = FakeTemporalRuntime()
    predict_scene(rt, {"S2L2A": paths}, tmp_path / "map.tif", output="logits", tiling={"padding": None})
    got = rt.seen[0]["S2L2A"][0]
    # The other dates keep their values there; the second date holds the fill (the pretraining means).
    np.testing.assert_array_equal(got[:, 0, 100:110, 40:60], arrays[0][:, 100:110, 40:60].astype(np.float32))
    fill = got[:, 1, 100:110, 40:60]
    assert (fill == fill[:, :1, :1]).all() and not (fill == -1).any()
    with rasterio.open(tmp_path / "map.tif") as out:
        logits = out.read()
    assert np.isnan(logits[:, 100:110, 40:60]).all()
    assert np.isfinite(logits[:, :100]).all() and np.isfinite(logits[:, 110:]).all()


def test_per_date_statistics_give_per_date_fills(tmp_path):
    arrays = [s2_array(224, 224, seed=60 + t)[:2] for t in range(2)]
    for a in arrays:
        a[:, :8, :8] = -1
    paths = [write_scene(tmp_path / f"d{t}.tif", a, nodata=-1, descriptions=("BLUE", "GREEN"))
             for t, a in enumerate(arrays)]
    rt = FakeTemporalRuntime(pooling="mean", n_timestamps=None)
    rt.task.bands = {"S2L2A": ("BLUE", "GREEN")}
    means = np.array([[100.0, 200.0], [300.0, 400.0]])  # (C, T)
    rt.task.standardization = {"S2L2A": (means, np.ones_like(means))}
    rt.weights = {"S2L2A": rt.weights["S2L2A"][:, :2]}
    predict_scene(rt, {"S2L2A": paths}, tmp_path / "map.tif", output="logits", tiling={"padding": None})
    got = rt.seen[0]["S2L2A"][0]
    np.testing.assert_array_equal(got[:, :, 0, 0], means)


def test_date_count_errors_come_before_anything_is_read_or_written(three_dates, tmp_path, monkeypatch):
    paths, _ = three_dates

    def no_reading(*args, **kwargs):
        raise AssertionError("the scene was opened although the dates were wrong")

    monkeypatch.setattr("tm_runtime.scene.raster.open_scene", no_reading)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="concatenates exactly 3"):
        predict_scene(FakeTemporalRuntime(), {"S2L2A": paths[:2]}, out / "a.tif")
    rt = FakeTemporalRuntime(modalities=("S2L2A", "S1GRD"))
    s1 = [write_scene(tmp_path / f"s1_{t}.tif", np.ones((2, 224, 224), np.float32)) for t in range(2)]
    with pytest.raises(ValueError, match="another modality has 3"):
        predict_scene(rt, {"S2L2A": paths, "S1GRD": s1}, out / "b.tif")
    with pytest.raises(ValueError, match="S2L2A was given 3 dates.*not multi-temporal"):
        predict_scene(FakeTaskRuntime(), {"S2L2A": paths}, out / "c.tif")  # not a temporal model
    rt = FakeTemporalRuntime(pooling="mean", n_timestamps=None)
    means = np.full((12, 2), 100.0)  # statistics per band and date, for 2 dates
    rt.task.standardization = {"S2L2A": (means, np.ones_like(means))}
    with pytest.raises(ValueError, match="per date, for 2 dates"):
        predict_scene(rt, {"S2L2A": paths}, out / "d.tif")
    with pytest.raises(ValueError, match="same modality more than once"):
        predict_scene(FakeTemporalRuntime(), {"S2L2A": paths[:2], "s2l2a": paths[2]}, out / "e.tif")
    assert not list(out.iterdir())  # no output, not even a hidden temporary one


def test_embed_takes_one_date(three_dates, tmp_path):
    rt = FakeTaskRuntime()
    with pytest.raises(ValueError, match="embed takes one raster per modality"):
        embed_scene(rt, {"S2L2A": three_dates[0]}, tmp_path / "e.tif")


def test_date_sources():
    assert date_sources("a.tif") == ["a.tif"]
    assert date_sources(["a.tif", "b.tif"]) == ["a.tif", "b.tif"]
    assert date_sources(("a.tif", "b.tif")) == ["a.tif", "b.tif"]
    geo = (np.zeros((1, 2, 2)), None, None)  # an (array, transform, crs) GeoArray tuple is one date
    assert date_sources(geo) == [geo]
    with pytest.raises(ValueError, match="empty"):
        date_sources([])


def test_tm_run_repeated_input_lists_dates(three_dates, tmp_path, monkeypatch):
    paths, _ = three_dates
    rt = FakeTemporalRuntime()

    class Factory:
        def __init__(self, *args):
            pass

        def __call__(self):
            return rt

    monkeypatch.setattr("tm_runtime.scene.ray_executor.RuntimeFactory", Factory)
    names = ["S2L2A", "s2l2a", "S2L2A"]  # one modality under any of its names: still one list of dates
    argv = ["predict", "unused", *[a for n, p in zip(names, paths) for a in ("--input", f"{n}={p}")], "--out",
            str(tmp_path / "m.tif"), "--padding", "none", "--no-progress"]
    assert main(argv) == 0
    assert rt.seen[0]["S2L2A"].shape == (1, 12, 3, 224, 224)
    with rasterio.open(paths[1]) as second:
        np.testing.assert_array_equal(rt.seen[0]["S2L2A"][0, :, 1], second.read().astype(np.float32))


def test_ray_workers_get_every_date(three_dates):
    from tm_runtime.scene.ray_executor import _as_paths

    paths, arrays = three_dates
    assert _as_paths({"S2L2A": paths, "S1GRD": paths[0]}) == {"S2L2A": [str(p) for p in paths], "S1GRD": str(paths[0])}
    with pytest.raises(ValueError, match="workers can open"):
        _as_paths({"S2L2A": [paths[0], arrays[1]]})


def test_in_memory_tiled_inference_of_date_stacks_equals_terratorch():
    """(C, T, H, W) arrays through ours and (1, C, T, H, W) through terratorch's tiled_inference,
    the same window function of the dates, defaults (reflect padding, blending): equal."""
    torch = pytest.importorskip("torch")
    tt = pytest.importorskip("terratorch.tasks.tiled_inference")
    from tm_runtime.scene import tiled_inference

    rng = np.random.default_rng(5)
    stack = np.stack([s2_array(300, 400, seed=80 + t)[:6] for t in range(3)], axis=1).astype(np.float32)
    weights = {"S2L2A": (rng.standard_normal((4, 6)) / 3000).astype(np.float32)}

    def forward(x: np.ndarray) -> np.ndarray:  # (B, C, T, h, w) -> (B, 4, h, w)
        assert x.ndim == 5 and x.shape[1:3] == (6, 3)
        return sum((t + 1) * window_function(weights, {"S2L2A": x[:, :, t]}) for t in range(x.shape[2]))

    ours = tiled_inference(forward, stack)
    with torch.no_grad():
        theirs = tt.tiled_inference(lambda x: torch.from_numpy(forward(x.numpy())), torch.from_numpy(stack[None]),
                                    verbose=False).numpy()[0]
    assert ours.shape == theirs.shape == (4, 300, 400)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
