"""predict's host-side steps (modality merge, date pooling, standardisation) against terratorch,
and its input checks: every error names the modality and what was expected."""
from __future__ import annotations

import numpy as np
import pytest

from tests.parity.upstream import rel_error

from .terratorch_side import standardize_like_datamodule


def multi_inputs(batch: int = 1, dates: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"S2L2A": rng.uniform(0, 4000, (batch, 4, dates, 224, 224)).astype(np.float32),
            "S1GRD": rng.normal(0, 1, (batch, 2, dates, 224, 224)).astype(np.float32)}


@pytest.fixture(scope="module")
def multi_rt(multi_case):
    from tm_runtime import TerraMindRuntime

    return TerraMindRuntime(multi_case.export)


@pytest.mark.parity
def test_concat_merge_and_date_subsets_match_terratorch(multi_case, multi_rt):
    """Two modalities concatenated along channels, dates averaged in subsets [1, 2] then pooled."""
    import torch

    if multi_case.task is None:
        pytest.skip("terratorch not installed")
    raw = multi_inputs(batch=2)
    inputs = standardize_like_datamodule(multi_case.config, {"S2L2A": raw["S2L2A"]})
    inputs["S1GRD"] = torch.from_numpy(raw["S1GRD"])  # no statistics for S1GRD: given standardised
    with torch.no_grad():
        ref = multi_case.task(inputs).output.numpy()
    # S1GRD has no statistics, so standardise S2L2A ourselves for the call without standardize.
    std = {"S2L2A": inputs["S2L2A"].numpy(), "S1GRD": raw["S1GRD"]}
    got = multi_rt.predict(std, standardize=False)
    assert got.shape == ref.shape == (2, 3, 224, 224)
    assert rel_error(got, ref) <= 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("pooling,subsets,dates", [("mean", None, 3), ("max", None, 3), ("diff", None, 2),
                                                   ("concat", None, 3), ("max", (2, 1), 3), ("diff", (1, 2), 3)])
def test_pool_dates_is_the_temporal_wrapper(pooling, subsets, dates):
    """Our numpy pooling == terratorch's TemporalWrapper on ViT tokens (B*T, L, C)."""
    pytest.importorskip("terratorch")
    import torch
    from terratorch.models.utils import TemporalWrapper

    from tm_runtime.task import TemporalInfo, pool_dates

    batch, tokens, dim = 2, 5, 6
    x = np.random.default_rng(1).standard_normal((batch * dates, tokens, dim)).astype(np.float32)
    class Tokens(torch.nn.Module):  # a backbone whose layer output is x, for any input
        out_channels = [dim]

        def forward(self, flat):
            return [torch.from_numpy(x)]

    wrapper = TemporalWrapper(Tokens(), pooling=pooling, n_timestamps=dates,
                              subset_lengths=list(subsets) if subsets else None)
    want = wrapper(torch.zeros(batch, 1, dates, 1, 1))[0].numpy()
    got = pool_dates(x, batch, TemporalInfo(pooling, dates, subsets))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parity
def test_per_date_statistics_standardise_as_terratorch():
    """(C, T) means/stds, which terratorch's Normalize accepts for (B, C, T, H, W) images."""
    pytest.importorskip("terratorch")
    import torch
    from terratorch.datamodules.utils import Normalize

    from tm_runtime.task import TaskInfo, TaskPipeline

    rng = np.random.default_rng(2)
    mean, std = rng.uniform(0, 10, (2, 3)), rng.uniform(1, 3, (2, 3))
    image = rng.normal(5, 3, (1, 2, 3, 4, 4)).astype(np.float32)
    want = Normalize(mean.tolist(), std.tolist())({"image": torch.from_numpy(image)})["image"].numpy()
    pipeline = TaskPipeline.__new__(TaskPipeline)
    pipeline.info = TaskInfo.__new__(TaskInfo)
    object.__setattr__(pipeline.info, "standardization", {"X": (mean.astype(np.float32), std.astype(np.float32))})
    np.testing.assert_allclose(pipeline._standardize("X", image), want, rtol=1e-6)


def test_task_facts(multi_rt):
    task = multi_rt.task
    assert task.type == "segmentation" and task.num_classes == 3 and task.class_names == ("a", "b", "c")
    assert task.modalities == ("S2L2A", "S1GRD") and task.merge_method == "concat"
    assert task.bands["S2L2A"] == ("BLUE", "GREEN", "RED", "NIR_NARROW")
    assert task.temporal.pooling == "mean" and task.temporal.subset_lengths == (1, 2)
    assert task.layers == (1, 4, 7, 10) and task.num_channels == 3
    assert multi_rt.manifest.data["files"]["task_config"]["file"] == "task_config.yaml"


def test_outputs(multi_rt):
    x = multi_inputs()
    logits = multi_rt.predict(x, standardize=False)
    assert logits.shape == (1, 3, 224, 224) and logits.dtype == np.float32
    probabilities = multi_rt.predict(x, standardize=False, output="probabilities")
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    classes = multi_rt.predict(x, standardize=False, output="classes")
    assert classes.dtype == np.uint8 and classes.shape == (1, 224, 224)
    np.testing.assert_array_equal(classes, logits.argmax(axis=1))


@pytest.mark.parametrize("inputs,standardize,match", [
    (lambda x: {**x, "S2L1C": x["S2L2A"]}, False,
     "modality S2L1C was not exported .* task config's backbone_modalities"),
        (lambda x: {**x, "S3OLCI": x["S2L2A"]}, False, "unknown modality 'S3OLCI'"),
    (lambda x: {"S2L2A": x["S2L2A"]}, False, "needs all of S2L2A, S1GRD; missing: S1GRD"),
    (lambda x: {**x, "S2L2A": x["S2L2A"][:, :, 0]}, False, r"S2L2A: this temporal model takes \(batch, 4, dates"),
    (lambda x: {**x, "S1GRD": x["S1GRD"][:, :, :2]}, False, "S1GRD: 2 dates, but another modality has 3"),
    (lambda x: {k: v[:, :, :2] for k, v in x.items()}, False, r"sum to 3"),
    (lambda x: {**x, "S2L2A": x["S2L2A"][:, :3]}, False, r"S2L2A: expected 4 channels \(BLUE, GREEN, RED, NIR_NARROW\)"),
    (lambda x: {k: v[..., :208, :208] for k, v in x.items()}, False, "expected 224x224 pixels"),
    (lambda x: {**x, "S1GRD": x["S1GRD"].astype(np.int16)}, False, "S1GRD: expected a floating-point array"),
    (lambda x: x, True, "S1GRD: the task config's data: section has no means/stds for S1GRD"),
    (lambda x: {**x, "S1GRD": np.where(x["S1GRD"] > 2, np.nan, x["S1GRD"]).astype(np.float32)}, False,
     "NaN or Inf"),
])
def test_bad_inputs(multi_rt, inputs, standardize, match):
    with pytest.raises((ValueError, TypeError), match=match):
        multi_rt.predict(inputs(multi_inputs()), standardize=standardize)


def test_bad_output_and_arguments(multi_rt):
    x = multi_inputs()
    with pytest.raises(ValueError, match="output must be one of 'logits', 'probabilities', 'classes'"):
        multi_rt.predict(x, standardize=False, output="labels")
    with pytest.raises(TypeError, match="tim_temperature"):
        multi_rt.predict(x, standardize=False, tim_temperature=0.0)


def test_predict_on_a_backbone_export_says_how_to_export_a_task(tiny_export):
    from tm_runtime import TerraMindRuntime

    rt = TerraMindRuntime(tiny_export)
    assert rt.task is None
    with pytest.raises(ValueError, match="--task-config"):
        rt.predict({"S2L2A": np.zeros((1, 12, 224, 224), np.float32)})


def test_predict_without_statistics_in_the_config(multi_rt, tmp_path):
    """A config whose data: section has no means/stds at all: standardize=True says what to do."""
    import json
    import shutil

    from tm_runtime import TerraMindRuntime

    copy = tmp_path / "export"
    shutil.copytree(multi_rt.manifest.directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["task"]["standardization"] = None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no standardisation: the task config's data: section gives no means/stds"):
        TerraMindRuntime(copy).predict(multi_inputs())


def test_an_edited_task_config_is_refused(multi_rt, tmp_path):
    """The config travels with the export as its record, sha256-checked like the graphs (ONNX Runtime
    reads no graph before its first run, so the check is on rt.task)."""
    import shutil

    from tm_runtime import TerraMindRuntime
    from tm_runtime.manifest import ManifestError

    copy = tmp_path / "export"
    shutil.copytree(multi_rt.manifest.directory, copy)
    with (copy / "task_config.yaml").open("a") as f:
        f.write("# edited\n")
    with pytest.raises(ManifestError, match="task_config.yaml has sha256"):
        TerraMindRuntime(copy).predict(multi_inputs())
    assert TerraMindRuntime(copy, verify=False).task is not None


@pytest.mark.parametrize("dates", [2, 4])
def test_concat_pooling_needs_exactly_n_timestamps_dates(multi_rt, tmp_path, dates):
    """A model whose temporal wrapper concatenates n_timestamps dates refuses any other count,
    before any graph runs (the manifest of the temporal export, pooling set to concat)."""
    import json
    import shutil

    from tm_runtime import TerraMindRuntime

    copy = tmp_path / "export"
    shutil.copytree(multi_rt.manifest.directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["task"]["temporal"] = {"pooling": "concat", "n_timestamps": 3, "subset_lengths": None}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    x = {m: np.zeros((1, v.shape[1], dates, 224, 224), np.float32) for m, v in multi_inputs().items()}
    with pytest.raises(ValueError, match=f"{dates} dates, but this model concatenates exactly 3"):
        TerraMindRuntime(copy).predict(x, standardize=False)
