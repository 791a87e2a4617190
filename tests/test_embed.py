"""The runtime's embed against the PyTorch reference on the same weights (no terratorch needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tm_runtime import TerraMindRuntime

from .conftest import random_inputs


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def runtime(tiny_export):
    return TerraMindRuntime(tiny_export)


def reference_layers(model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model({k: torch.from_numpy(v) for k, v in inputs.items()})]


@pytest.mark.parametrize("names", [["S2L2A"], ["S2L2A", "S1GRD"], ["DEM", "S1GRD", "S2L2A"]])
def test_all_layers_match_reference(runtime, tiny_reference, names):
    inputs = random_inputs(2, seed=1, modalities=names)
    ours = runtime.embed(inputs, merge_method=None, layers="all")
    ref = reference_layers(tiny_reference, inputs)
    assert len(ours) == len(ref) == 12
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape == (2, 196 * len(names), 192)
        assert rel(a, b) < 1e-4, f"layer {i}"


def test_merge_methods(runtime, tiny_reference):
    names = ["S1GRD", "S2L2A"]
    inputs = random_inputs(1, seed=2, modalities=names)
    last = reference_layers(tiny_reference, inputs)[-1].reshape(1, 2, 196, 192)
    np.testing.assert_allclose(runtime.embed(inputs, "mean"), last.mean(1), rtol=0, atol=1e-4)
    np.testing.assert_allclose(runtime.embed(inputs, "max"), last.max(1), rtol=0, atol=1e-4)
    as_dict = runtime.embed(inputs, "dict")
    assert list(as_dict) == names  # input order, as upstream
    np.testing.assert_allclose(as_dict["S2L2A"], last[:, 1], atol=1e-4)
    concat = runtime.embed(inputs, "concat")
    # present modalities in input order, then one zero block for the exported-but-missing DEM
    assert concat.shape == (1, 196, 3 * 192)
    np.testing.assert_allclose(concat[..., :192], last[:, 0], atol=1e-4)
    np.testing.assert_allclose(concat[..., 192:384], last[:, 1], atol=1e-4)
    assert not concat[..., 384:].any()


def test_layer_selection(runtime):
    inputs = random_inputs(1, seed=3, modalities=["DEM"])
    every = runtime.embed(inputs, layers="all")
    picked = runtime.embed(inputs, layers=[0, 5, -1])
    assert len(picked) == 3
    np.testing.assert_array_equal(picked[1], every[5])
    np.testing.assert_array_equal(picked[2], every[11])
    np.testing.assert_array_equal(runtime.embed(inputs, layers=-1), every[-1])
    np.testing.assert_array_equal(runtime.embed(inputs, layers=4), every[4])
    # only the last layer is normed: its per-token mean over channels is ~ weighted, the others are not
    assert not np.allclose(every[-1], every[-2])


def test_standardize_applies_pretraining_stats(runtime):
    raw = {"S1GRD": np.full((1, 2, 224, 224), -12.599, np.float32)}
    raw["S1GRD"][:, 1] = -20.293  # exactly the means -> standardised input is all zeros
    zeros = {"S1GRD": np.zeros((1, 2, 224, 224), np.float32)}
    np.testing.assert_allclose(runtime.embed(raw, standardize=True), runtime.embed(zeros), atol=1e-5)


def test_batch_rows_are_independent(runtime):
    inputs = random_inputs(3, seed=4, modalities=["S2L2A", "S1GRD"])
    batched = runtime.embed(inputs)
    single = runtime.embed({k: v[1:2] for k, v in inputs.items()})
    np.testing.assert_allclose(batched[1:2], single, atol=1e-5)


def test_name_aliases(runtime):
    inputs = random_inputs(1, seed=5, modalities=["S2L2A"])
    np.testing.assert_array_equal(runtime.embed({"s2l2a": inputs["S2L2A"]}), runtime.embed(inputs))
