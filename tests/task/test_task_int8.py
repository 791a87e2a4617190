"""``tm-export --task-config ... --precision int8``: a fine-tuned task model quantised, gated through
``predict`` (tm_runtime.task_accuracy) on real tiles, and still close to terratorch; the gates'
tile reading (band subsets by name, dates, units) and their failure on a broken calibration set."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import DATA_DIR

from .terratorch_side import standardize_like_datamodule

needs_tiles = pytest.mark.skipif(not (DATA_DIR / "S2L1C").is_dir(), reason=f"TerraMesh tiles not found at {DATA_DIR}")
CONFIGS = Path(__file__).parent / "configs"


@pytest.fixture(scope="module")
def floods_int8(floods_tiny, tmp_path_factory):
    """The terratorch-written sen1floods11 tiny checkpoint as an int8 export (default graphs: the
    encoder; the head stays fp32)."""
    from tm_export.cli import main

    out = tmp_path_factory.mktemp("floods_int8") / "export"
    code = main(["--task-config", str(floods_tiny.config_path), "--ckpt", str(floods_tiny.ckpt), "--out", str(out),
                 "--precision", "int8", "--gate-data", str(DATA_DIR)])
    assert code == 0
    return out


@needs_tiles
def test_int8_task_export_is_gated_and_stays_close_to_terratorch(floods_tiny, floods_int8):
    import torch

    from tm_runtime import TerraMindRuntime
    from tm_runtime.task_accuracy import task_tiles

    manifest = json.loads((floods_int8 / "manifest.json").read_text())
    precisions = {name: g["precision"] for name, g in manifest["graphs"].items()}
    assert precisions == {"embed_S2L1C": "fp32", "embed_S1GRD": "fp32", "encoder": "int8", "head": "fp32"}
    report = manifest["accuracy"]["int8_vs_fp32"]
    assert report["passed"] and report["tiles"] == 5
    assert report["task"]["largest_class_share"] < 0.9  # two classes on the map: agreement can fail
    assert set(report["gates"]) == {"token_cosine_min", "token_cosine_mean", "class_agreement", "psnr_db[logits]"}
    assert [row["layer"] for row in report["token_cosine_per_layer"]] == [2, 5, 8, 11]  # what the head reads
    assert report["data"]["substituted"] == {"S1GRD": "S1RTC"}

    rt = TerraMindRuntime(floods_int8)
    raw, _ = task_tiles(DATA_DIR, rt.task, limit=2)
    got = rt.predict(raw)
    with torch.no_grad():
        ref = floods_tiny.task(standardize_like_datamodule(floods_tiny.config, raw)).output.numpy()
    fp32 = TerraMindRuntime(floods_tiny.export).predict(raw)
    assert np.abs(fp32 - ref).max() <= 1e-4 * np.abs(ref).max()  # the fp32 twin is terratorch
    # int8 is not exact, but close to terratorch: most pixels keep their class, logits near.
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
    assert 0 < np.abs(got - ref).max() <= 0.2 * ref.std()


def _noise_tiles(folder: Path, count: int = 2) -> Path:
    """A broken calibration set: uniform noise over +-45 standard deviations of each band (a misread
    file still in plausible units, so the units check lets it through)."""
    tifffile = pytest.importorskip("tifffile")
    from tm_runtime.modalities import get_modality

    rng = np.random.default_rng(0)
    for modality, source in (("S2L1C", "S2L1C"), ("S1GRD", "S1RTC")):
        (folder / modality).mkdir(parents=True)
        m = get_modality(modality)
        for f in sorted((DATA_DIR / source).glob("*.tif"))[:count]:
            shape = tifffile.imread(f).shape  # (H, W, C)
            noise = np.asarray(m.mean) + np.asarray(m.std) * rng.uniform(-45, 45, shape)
            tifffile.imwrite(folder / modality / f.name, noise.astype(np.float32))
    return folder


@needs_tiles
def test_static_int8_task_export_fails_its_gate_with_a_broken_calibration_set(tmp_path, capsys):
    from tm_export.cli import main

    out = tmp_path / "int8"
    code = main(["--task-config", str(CONFIGS / "sen1floods11_tiny.yaml"), "--random-init", "--seed", "3",
                 "--no-validate", "--precision", "int8", "--int8-method", "static",
                 "--calibration-data", str(_noise_tiles(tmp_path / "broken")), "--gate-data", str(DATA_DIR),
                 "--out", str(out)])
    assert code == 1
    assert "int8 accuracy gate(s) failed: token_cosine_min" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".int8*"))


@needs_tiles
def test_tm_bench_accuracy_gates_a_task_export(floods_tiny, floods_int8, capsys):
    from tm_bench.cli import main

    base = ["accuracy", str(floods_int8), "--data", str(DATA_DIR), "--tiles", "1"]
    assert main(base) == 2  # int8 graphs cannot be their own reference
    assert "--reference" in capsys.readouterr().err
    assert main(base + ["--reference", str(floods_tiny.export)]) == 0
    out = capsys.readouterr().out
    assert "class_agreement" in out and "psnr_db[logits]" in out and "all gates: PASS" in out
    assert main(base + ["--reference", str(floods_tiny.export), "--tile-scale", "S2L2A=0.0001"]) == 2
    assert "S2L2A, which this task model does not take" in capsys.readouterr().err


# -- the gate tiles -----------------------------------------------------------------------------
def _info(modalities, bands, standardization=None, temporal=None):
    return SimpleNamespace(modalities=tuple(modalities), bands=bands, standardization=standardization,
                           temporal=temporal)


def _band_tiles(folder: Path, modality: str, channels: int, count: int = 3) -> None:
    """Tiles whose band b, tile i holds the value 100 * i + b."""
    tifffile = pytest.importorskip("tifffile")
    (folder / modality).mkdir(parents=True)
    for i in range(count):
        tile = np.broadcast_to(100 * i + np.arange(channels, dtype=np.float32), (8, 8, channels))
        tifffile.imwrite(folder / modality / f"t{i}.tif", np.ascontiguousarray(tile))


def test_task_tiles_pick_bands_by_name_and_lay_out_dates(tmp_path):
    from tm_runtime.task import TemporalInfo
    from tm_runtime.task_accuracy import task_tiles

    _band_tiles(tmp_path, "S2L2A", 12)
    bands = {"S2L2A": ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")}
    tiles, source = task_tiles(tmp_path, _info(["S2L2A"], bands))
    assert tiles["S2L2A"].shape == (3, 6, 8, 8)
    np.testing.assert_array_equal(tiles["S2L2A"][2, :, 0, 0], [201, 202, 203, 208, 210, 211])
    temporal = TemporalInfo("concat", 3, None)
    tiles, source = task_tiles(tmp_path, _info(["S2L2A"], bands, temporal=temporal), scale={"S2L2A": 0.5})
    assert tiles["S2L2A"].shape == (3, 6, 3, 8, 8) and source["dates"] == 3 and source["scale"] == {"S2L2A": 0.5}
    # date t of sample i is tile (i + t) mod 3, scaled
    np.testing.assert_array_equal(tiles["S2L2A"][2, 0, :, 0, 0], [0.5 * 201, 0.5 * 1, 0.5 * 101])


def test_task_tiles_refuse_other_units_and_unknown_scales(tmp_path):
    from tm_runtime.task_accuracy import task_tiles

    _band_tiles(tmp_path, "S2L2A", 12)
    stats = {"S2L2A": (np.full(2, 0.05, np.float32), np.full(2, 0.02, np.float32))}  # reflectance statistics
    info = _info(["S2L2A"], {"S2L2A": ("BLUE", "GREEN")}, standardization=stats)
    with pytest.raises(ValueError, match=r"S2L2A: the tiles are not in the units .* --tile-scale S2L2A=FACTOR"):
        task_tiles(tmp_path, info)
    assert task_tiles(tmp_path, info, scale={"S2L2A": 1e-4})[0]["S2L2A"].shape == (3, 2, 8, 8)
    with pytest.raises(ValueError, match="tile scale given for S1GRD, which this task model does not take"):
        task_tiles(tmp_path, info, scale={"S1GRD": 2.0})
    shutil.rmtree(tmp_path / "S2L2A")
    _band_tiles(tmp_path, "S2L2A", 6)
    with pytest.raises(ValueError, match=r"S2L2A: the tiles in S2L2A have 6 bands, expected every S2L2A band"):
        task_tiles(tmp_path, info, scale={"S2L2A": 1e-4})


def test_tile_scale_is_checked_before_anything_is_traced(tmp_path, capsys):
    from tm_export.cli import main

    task = ["--task-config", str(CONFIGS / "sen1floods11_tiny.yaml"), "--random-init", "--out", str(tmp_path / "a")]
    assert main(task + ["--tile-scale", "S2L1C=0.5"]) == 1  # without --precision int8
    assert "--tile-scale scales the tiles of --precision int8" in capsys.readouterr().err
    backbone = ["--model", "tiny", "--modalities", "S2L2A", "--random-init", "--out", str(tmp_path / "b")]
    assert main(backbone + ["--tile-scale", "S2L2A=0.5"]) == 1
    assert "--tile-scale is for --task-config exports" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(task + ["--tile-scale", "S2L1C"])
    assert "expected MODALITY=FACTOR" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
