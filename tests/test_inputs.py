"""Bad input -> a ValueError/TypeError naming the modality and what was expected against what came."""
from __future__ import annotations

import numpy as np
import pytest

from tm_runtime import TerraMindRuntime

from .conftest import random_inputs


@pytest.fixture(scope="module")
def runtime(tiny_export):
    return TerraMindRuntime(tiny_export)


def s2(batch=1, channels=12, size=224, dtype=np.float32):
    return np.zeros((batch, channels, size, size), dtype)


@pytest.mark.parametrize("inputs, error, pattern", [
    ({}, ValueError, "empty"),
    # a modality TerraMind has but this export lacks is "not exported"; a name nobody knows is "unknown"
    ({"S2L1C": s2(channels=13)}, ValueError,
     r"modality S2L1C was not exported \(exported modalities: S2L2A, S1GRD, DEM\); re-export with S2L1C"),
    ({"Optical": s2()}, ValueError, "unknown modality 'Optical'; known input modalities: .*NDVI, coords .*"
                                    "this export has S2L2A, S1GRD, DEM"),
    ({"S2L2A": s2(channels=10)}, ValueError, r"S2L2A: expected 12 channels .*got 10"),
    ({"S2L2A": np.zeros((12, 224, 224), np.float32)}, ValueError, r"S2L2A: expected a 4-D array.*\(12, 224, 224\)"),
    ({"S2L2A": s2(dtype=np.int16)}, TypeError, "S2L2A: expected a floating-point array.*int16"),
    ({"S2L2A": s2().tolist()}, TypeError, "S2L2A: expected a numpy.ndarray, got list"),
    # a size no export takes gets no re-export hint; one another export takes does
    ({"S2L2A": s2(size=200)}, ValueError,
     "S2L2A: expected 224x224 .*got 200x200; exports take square sizes that are multiples of 16: crop or pad"),
    ({"S2L2A": s2(size=256)}, ValueError, "S2L2A: expected 224x224 .*got 256x256; re-export with --image-size 256"),
    ({"S2L2A": s2(batch=2), "S1GRD": np.zeros((3, 2, 224, 224), np.float32)}, ValueError,
     "same batch size, got S2L2A=2, S1GRD=3"),
    ({"S2L2A": s2(batch=0)}, ValueError, "S2L2A: batch size must be at least 1"),
    ("S2L2A", TypeError, "dict"),
])
def test_bad_inputs(runtime, inputs, error, pattern):
    with pytest.raises(error, match=pattern):
        runtime.embed(inputs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_an_error_by_default(runtime, bad):
    image = s2()
    image[0, 3, 10, 10] = bad
    with pytest.raises(ValueError, match="S2L2A: input contains 1 NaN or Inf"):
        runtime.embed({"S2L2A": image})
    out = runtime.embed({"S2L2A": image}, check_finite=False)  # allowed when asked for
    assert out.shape == (1, 196, 192)


def test_bad_arguments(runtime):
    inputs = random_inputs(1, modalities=["DEM"])
    with pytest.raises(ValueError, match="merge_method"):
        runtime.embed(inputs, merge_method="sum")
    with pytest.raises(ValueError, match="out of range.*12 layers"):
        runtime.embed(inputs, layers=12)
    with pytest.raises(ValueError, match="layers must be"):
        runtime.embed(inputs, layers="last")
    with pytest.raises(TypeError, match="layer indices must be ints"):
        runtime.embed(inputs, layers=[1.5])


def test_float64_and_float16_are_accepted(runtime):
    ref = runtime.embed({"DEM": np.ones((1, 1, 224, 224), np.float32)})
    for dtype in (np.float64, np.float16):
        got = runtime.embed({"DEM": np.ones((1, 1, 224, 224), dtype)})
        np.testing.assert_allclose(got, ref, atol=1e-6)
