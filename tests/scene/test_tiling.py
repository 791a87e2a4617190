"""Windows, padding and blending against terratorch's tiled_inference (pure numpy on our side)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from tm_runtime.scene.accumulate import BandAccumulator
from tm_runtime.scene.arrays import tiled_inference
from tm_runtime.scene.tiling import TilingParams, blend_mask, plan_windows, source_indices

from .fakes import window_function

torch = pytest.importorskip("torch")


def _forward(seed: int, channels: int, classes: int = 3):
    rng = np.random.default_rng(seed)
    weights = {"x": rng.standard_normal((classes, channels)).astype(np.float32)}
    return lambda batch: window_function(weights, {"x": batch})


def _terratorch(forward, x: np.ndarray, **kw) -> np.ndarray:
    from terratorch.tasks.tiled_inference import tiled_inference as upstream

    torch.set_float32_matmul_precision("highest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = upstream(lambda t: torch.from_numpy(forward(t.numpy())), torch.from_numpy(x)[None], **kw)
    return out.numpy()[0]


@pytest.mark.parity
@pytest.mark.parametrize("crop,stride,delta", [(224, 192, 8), (224, 192, 0), (14, 12, 0), (224, 200, 4),
                                               (224, 224, 0), (64, 16, 8), (64, 40, 30)])
def test_blend_mask_equals_terratorch(crop, stride, delta):
    pytest.importorskip("terratorch")
    from terratorch.tasks.tiled_inference import get_blend_mask

    delta = min(delta, (crop - stride) // 2)
    expected = get_blend_mask(crop, stride, crop, stride, delta).numpy()
    np.testing.assert_allclose(blend_mask(crop, stride, delta), expected, rtol=0, atol=1e-7)


SMALL = {"crop": 64, "stride": 48, "delta": 4}  # the same rules at a quarter of the size, to keep CI fast
CASES = [
    ((600, 700), {}),  # terratorch's defaults
    ((417, 1000), {"padding": False, "average_patches": False, "batch_size": 5}),
    ((224, 224), {}),  # exactly one window: terratorch's single forward pass
    ((224, 500), {}),
    ((150, 170), SMALL),
    ((150, 170), {**SMALL, "padding": False}),
    ((150, 170), {**SMALL, "blend_overlaps": False}),
    ((150, 170), {**SMALL, "average_patches": False}),
    ((150, 170), {**SMALL, "padding": "replicate"}),
    ((150, 170), {**SMALL, "padding": "constant"}),
    ((150, 170), {**SMALL, "stride": 60, "delta": 0, "padding": False, "average_patches": False}),
    ((97, 211), {**SMALL, "padding": False, "blend_overlaps": False}),
    ((97, 111), {**SMALL, "stride": 56, "delta": 4, "padding": False}),
    ((100, 130), {"crop": 64, "stride": 32, "delta": 12}),  # delta above half the overlap: reduced, as upstream
    ((193, 611), {"crop": 64, "stride": 48, "delta": 2, "average_patches": False}),
]


@pytest.mark.parity
@pytest.mark.parametrize("shape,options", CASES, ids=[f"{s[0]}x{s[1]}-{o}" for s, o in CASES])
def test_tiled_inference_equals_terratorch(shape, options):
    pytest.importorskip("terratorch")
    seed = abs(hash((shape, tuple(sorted(options.items()))))) % 2**31
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, *shape)).astype(np.float32)
    forward = _forward(seed, 5)
    expected = _terratorch(forward, x, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = tiled_inference(forward, x, TilingParams(**options))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
    assert np.abs(ours - expected).max() < 1e-5  # only summation order differs


def test_delta_reduced_with_terratorchs_warning():
    with pytest.warns(UserWarning, match="reducing delta to 16"):
        plan = plan_windows(300, 300, TilingParams(stride=192, delta=20))
    assert plan.params.delta == 16


@pytest.mark.parametrize("shape,options", [((450, 225), {"padding": False}), ((209, 300), {}),
                                           ((97, 169), {**SMALL, "stride": 56, "delta": 4})])
def test_windows_terratorch_would_miss_are_added(shape, options):
    """terratorch raises 'Some pixels did not receive a classification' where its window grid skips
    the first window (a padded side of crop + 1, e.g. 209 px with the defaults); we add it."""
    pytest.importorskip("terratorch")
    x = np.random.default_rng(1).standard_normal((5, *shape)).astype(np.float32)
    forward = _forward(1, 5)
    with pytest.raises(RuntimeError, match="did not receive"):
        _terratorch(forward, x, **options)
    plan = plan_windows(*shape, TilingParams(**options))
    assert min(w.dst[0] for w in plan.windows) == 0 and min(w.dst[2] for w in plan.windows) == 0
    out = tiled_inference(forward, x, TilingParams(**options))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("bad,match", [({"padding": "circular"}, "circular"), ({"stride": 300}, "gaps"),
                                       ({"crop": 0}, "crop"), ({"delta": -1}, "delta"), ({"padding": "wrap"}, "padding"),
                                       ({"batch_size": 0}, "batch_size")])
def test_bad_tiling_parameters(bad, match):
    with pytest.raises(ValueError, match=match):
        TilingParams(**bad)


def test_patch_units_need_whole_patches():
    with pytest.raises(ValueError, match="multiple of 16"):
        TilingParams(stride=200).in_units(16)
    assert TilingParams().in_units(16) == TilingParams(14, 12, 0)


def test_scene_smaller_than_a_window_is_padded():
    """Documented behaviour: the window is padded (reflect) to crop x crop and the output cropped;
    terratorch would call the model on the smaller image instead."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 100, 130)).astype(np.float32)
    forward = _forward(3, 5)
    ours = tiled_inference(forward, x, TilingParams())
    padded = np.pad(x, ((0, 0), (0, 124), (0, 94)), mode="reflect")
    np.testing.assert_allclose(ours, forward(padded[None])[0, :, :100, :130], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,numpy_mode", [("reflect", "reflect"), ("replicate", "edge")])
def test_source_indices_pad_like_numpy(mode, numpy_mode):
    line = np.arange(7)
    idx, inside = source_indices(-5, 20, 7, mode)
    expected = np.pad(line, (5, 13), mode=numpy_mode)
    np.testing.assert_array_equal(line[idx], expected)
    assert inside.all()


def test_accumulator_memory_does_not_grow_with_scene_height():
    """The band holds one window row across the width, whatever the height; tall scenes stream."""
    params = TilingParams()
    sizes = {}
    for height in (600, 6000, 60000):
        plan = plan_windows(height, 700, params)
        acc = BandAccumulator(plan, channels=10)
        sizes[height] = acc.nbytes
        assert plan.band_rows <= params.crop
    assert sizes[600] == sizes[6000] == sizes[60000]
    assert sizes[600] <= 224 * 700 * (10 * 4 + 4 + 1)


def test_tall_scene_streams_through_small_band():
    """A scene 10 windows tall, blended band by band, equals the one-shot blend (terratorch)."""
    pytest.importorskip("terratorch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 1000, 160)).astype(np.float32)
    forward = _forward(5, 2, classes=2)
    options = {"crop": 64, "stride": 48, "delta": 4}
    np.testing.assert_allclose(tiled_inference(forward, x, TilingParams(**options)),
                               _terratorch(forward, x, **options), rtol=0, atol=1e-5)
