"""embed and generate over scenes with real (tiny, random-weight) exports."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from tests.conftest import DATA_DIR  # noqa: E402
from tm_runtime import TerraMindRuntime  # noqa: E402
from tm_runtime.scene import TilingParams, embed_scene, generate_scene  # noqa: E402
from tm_runtime.scene.ops import window_seed  # noqa: E402
from tm_runtime.scene.tiling import plan_windows  # noqa: E402

from .fakes import s2_array, write_scene  # noqa: E402

TILE = DATA_DIR / "S2L2A" / "282D_485L_3_3.tif"


@pytest.fixture(scope="module")
def tiny_rt(tiny_export):
    return TerraMindRuntime(tiny_export, threads=2)


def _unshuffle(a: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, C*256, H/16, W/16): a patch becomes one pixel with 256 x C channels."""
    b, c, h, w = a.shape
    return a.reshape(b, c, h // 16, 16, w // 16, 16).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * 256, h // 16, w // 16)


def _shuffle(a: np.ndarray) -> np.ndarray:
    b, k, h, w = a.shape
    return a.reshape(b, k // 256, 16, 16, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, k // 256, h * 16, w * 16)


@pytest.mark.parity
def test_embedding_map_equals_terratorch_tiling_in_patch_space(tiny_rt, tmp_path):
    """Our embedding map is terratorch's tiled_inference run on the patch grid: a scene whose
    16 x 16 patches are its pixels, windows of 14 x 14 patches every 12, blended with its masks."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("terratorch")
    from terratorch.tasks.tiled_inference import tiled_inference

    array = s2_array(304, 400, seed=3)  # 19 x 25 patches: 2 x 2 windows of 14 patches, overlapping both ways
    path = write_scene(tmp_path / "s2.tif", array)
    out = tmp_path / "emb.tif"
    summary = embed_scene(tiny_rt, {"S2L2A": path}, out, tiling=TilingParams(batch_size=4))

    def forward(t):
        emb = tiny_rt.embed({"S2L2A": _shuffle(t.numpy())}, standardize=True)
        b, n, d = emb.shape
        return torch.from_numpy(emb.reshape(b, 14, 14, d).transpose(0, 3, 1, 2).copy())

    torch.set_float32_matmul_precision("highest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = tiled_inference(forward, torch.from_numpy(_unshuffle(array[None].astype(np.float32))), crop=14,
                                   stride=12, delta=0, padding=False, batch_size=4).numpy()[0]
    with rasterio.open(out) as emb, rasterio.open(path) as src:
        np.testing.assert_allclose(emb.read(), expected, rtol=0, atol=1e-4)
        assert emb.shape == (19, 25) and emb.count == 192 and emb.crs == src.crs
        assert emb.transform == src.transform * src.transform.scale(16)
        assert emb.descriptions[0] == "embedding_0000" and emb.dtypes[0] == "float32"
    assert summary["tiling"]["units"] == "patches" and summary["windows"]["total"] == 4


@pytest.mark.skipif(not TILE.exists(), reason=f"TerraMesh tiles not found at {DATA_DIR}")
def test_one_tile_is_one_window(tiny_rt, tmp_path):
    """A real 224 x 224 TerraMesh tile: the map is exactly rt.embed of the tile, with S1 (RTC, as
    the tiles hold it) from its own file; float16 on request."""
    s1 = DATA_DIR / "S1RTC" / TILE.name
    out = tmp_path / "emb.tif"
    embed_scene(tiny_rt, {"S2L2A": TILE, "S1GRD": s1}, out, dtype="float16", quicklook=True)
    with rasterio.open(TILE) as a, rasterio.open(s1) as b:
        expected = tiny_rt.embed({"S2L2A": a.read().astype(np.float32)[None],
                                  "S1GRD": b.read().astype(np.float32)[None]}, standardize=True)
        transform = a.transform
    with rasterio.open(out) as emb:
        got = emb.read()
        assert emb.tags(1, ns="IMAGE_STRUCTURE")["NBITS"] == "16" and emb.transform == transform * transform.scale(16)
    np.testing.assert_allclose(got.astype(np.float32), expected.reshape(14, 14, -1).transpose(2, 0, 1),
                               rtol=2e-3, atol=2e-3)
    assert (tmp_path / "emb.png").exists()


@pytest.fixture(scope="module")
def gen_rt(small_generate_export):
    return TerraMindRuntime(small_generate_export, threads=2)


def test_generate_scene_per_window_seeds(gen_rt, tmp_path):
    """Each window's draws come from the scene seed and its place in the grid: the map does not
    depend on batch_size; one window equals rt.generate with that window's seed."""
    array = s2_array(208, 300, seed=9)  # padded by delta: one row of two windows
    path = write_scene(tmp_path / "s2.tif", array)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    kwargs = dict(timesteps=1, seed=5)
    summary = generate_scene(gen_rt, {"S2L2A": path}, {"DEM": a}, tiling=TilingParams(batch_size=1), **kwargs)
    generate_scene(gen_rt, {"S2L2A": path}, {"DEM": b}, tiling=TilingParams(batch_size=2), **kwargs)
    with rasterio.open(a) as first, rasterio.open(b) as second:
        np.testing.assert_array_equal(first.read(), second.read())  # (the tags record batch_size)
    assert summary["windows"]["total"] == 2 and summary["op"]["seed"] == 5
    with rasterio.open(a) as dem:
        got = dem.read(1)
        assert dem.units == ("m",) and dem.descriptions == ("DEM",) and dem.dtypes[0] == "float32"
    # Columns 0..91 come from the first window alone (delta 8 dropped at its edges): they equal
    # rt.generate of that window with that window's seed.
    first = plan_windows(208, 300, TilingParams()).windows[0]
    window = np.pad(array.astype(np.float32), ((0, 0), (8, 8), (8, 8)), mode="reflect")[None, :, :224, :224]
    direct = gen_rt.generate({"S2L2A": window}, ["DEM"], seed=window_seed(5, first), timesteps=1)["DEM"][0, 0]
    np.testing.assert_allclose(got[:, :92], direct[8:216, 8:100], rtol=1e-5, atol=1e-3)
    # Another scene seed, another window seed, other draws.
    assert window_seed(6, first) != window_seed(5, first)
    other = gen_rt.generate({"S2L2A": window}, ["DEM"], seed=window_seed(6, first), timesteps=1)["DEM"][0, 0]
    assert not np.allclose(other[8:216, 8:100], got[:, :92], atol=1e-3)
