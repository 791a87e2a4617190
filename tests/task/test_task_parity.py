"""predict on exports of terratorch-written checkpoints == terratorch's task model, on raw inputs
standardised by the config's own statistics (terratorch's datamodule normalisers on its side)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.parity.upstream import rel_error

from .terratorch_side import standardize_like_datamodule

pytestmark = [pytest.mark.parity, pytest.mark.big_memory]  # official-size tokenizers or base weights
MAX_REL = 1e-4


def raw_s2(rng, batch: int, channels: int, *dates: int) -> np.ndarray:
    """Sentinel-2-like raw reflectance counts."""
    return rng.uniform(0, 5000, (batch, channels, *dates, 224, 224)).astype(np.float32)


def terratorch_output(case, raw: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    inputs = standardize_like_datamodule(case.config, raw)
    with torch.no_grad():
        return case.task(inputs).output.numpy()


def test_sen1floods11_tiny_matches_terratorch(floods_tiny):
    from tm_runtime import TerraMindRuntime

    rng = np.random.default_rng(0)
    raw = {"S2L1C": raw_s2(rng, 2, 13), "S1GRD": rng.normal(-15, 5, (2, 2, 224, 224)).astype(np.float32)}
    rt = TerraMindRuntime(floods_tiny.export)
    assert rt.task.type == "segmentation" and rt.task.num_classes == 2
    assert rt.task.class_names == ("Others", "Flood") and rt.task.modalities == ("S2L1C", "S1GRD")
    logits = rt.predict(raw)
    ref = terratorch_output(floods_tiny, raw)
    assert logits.shape == ref.shape == (2, 2, 224, 224) and logits.dtype == np.float32
    assert rel_error(logits, ref) <= MAX_REL
    # Any input order gives the same result (mean merge); outputs agree with the logits.
    swapped = rt.predict({"S1GRD": raw["S1GRD"], "S2L1C": raw["S2L1C"]})
    assert rel_error(swapped, ref) <= MAX_REL
    probabilities = rt.predict(raw, output="probabilities")
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    classes = rt.predict(raw, output="classes")
    assert classes.dtype == np.uint8 and classes.shape == (2, 224, 224)
    decided = np.abs(ref[:, 0] - ref[:, 1]) > 1e-3  # away from ties, the decision is terratorch's
    np.testing.assert_array_equal(classes[decided], ref.argmax(axis=1)[decided])


def test_fine_tuned_export_embeds_with_the_fine_tuned_encoder(floods_tiny):
    """embed works on a task export, and gives terratorch's fine-tuned backbone's layers."""
    import torch

    from tm_runtime import TerraMindRuntime

    rng = np.random.default_rng(1)
    raw = {"S2L1C": raw_s2(rng, 1, 13), "S1GRD": rng.normal(-15, 5, (1, 2, 224, 224)).astype(np.float32)}
    standardized = {k: v.numpy() for k, v in standardize_like_datamodule(floods_tiny.config, raw).items()}
    ours = TerraMindRuntime(floods_tiny.export).embed(standardized, layers=[2, 11])
    with torch.no_grad():
        theirs = floods_tiny.task.model.encoder({k: torch.from_numpy(v) for k, v in standardized.items()})
    for got, want in zip(ours, (theirs[2], theirs[11])):
        assert rel_error(got, want.numpy()) <= MAX_REL


def test_band_subset_matches_terratorch(burnscars_tiny):
    from tm_runtime import TerraMindRuntime

    rng = np.random.default_rng(2)
    raw = {"S2L2A": rng.uniform(0, 0.4, (1, 6, 224, 224)).astype(np.float32)}  # reflectance, as HLS burn scars
    rt = TerraMindRuntime(burnscars_tiny.export)
    assert rt.task.bands["S2L2A"] == ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
    assert rt.manifest.modalities["S2L2A"].num_channels == 6
    ref = terratorch_output(burnscars_tiny, raw)
    assert rel_error(rt.predict(raw), ref) <= MAX_REL


def test_temporal_concat_three_dates_matches_terratorch(crop_tiny):
    from tm_runtime import TerraMindRuntime

    rng = np.random.default_rng(3)
    raw = {"S2L2A": raw_s2(rng, 1, 6, 3)}  # (B, C, T, H, W)
    rt = TerraMindRuntime(crop_tiny.export)
    assert rt.task.temporal.pooling == "concat" and rt.task.temporal.n_timestamps == 3
    assert rt.task.num_classes == 13 and len(rt.task.class_names) == 13
    # The datamodule's built-in statistics: terratorch's own normaliser runs on its side.
    ref = terratorch_output(crop_tiny, raw)
    logits = rt.predict(raw)
    assert logits.shape == ref.shape == (1, 13, 224, 224)
    assert rel_error(logits, ref) <= MAX_REL
    with pytest.raises(ValueError, match="exactly 3"):
        rt.predict({"S2L2A": raw["S2L2A"][:, :, :2]})


@pytest.mark.slow
def test_sen1floods11_base_matches_terratorch(floods_base):
    from tm_runtime import TerraMindRuntime

    rng = np.random.default_rng(4)
    raw = {"S2L1C": raw_s2(rng, 1, 13), "S1GRD": rng.normal(-15, 5, (1, 2, 224, 224)).astype(np.float32)}
    rt = TerraMindRuntime(floods_base.export)
    assert rt.manifest.model["size"] == "base" and rt.task.layers == (2, 5, 8, 11)
    assert rel_error(rt.predict(raw), terratorch_output(floods_base, raw)) <= MAX_REL
