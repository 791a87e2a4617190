"""tm-run: the command line over the scene API (run in-process)."""
from __future__ import annotations

import json

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from tm_runtime.scene.cli import main  # noqa: E402

from .fakes import s2_array, write_scene  # noqa: E402


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("cli") / "s2.tif", s2_array(208, 240, seed=11))


def test_embed_json_quicklook_and_overwrite(tiny_export, small_scene, tmp_path, capsys):
    out, summary = tmp_path / "emb.tif", tmp_path / "run.json"
    argv = ["embed", str(tiny_export), "--input", f"S2L2A={small_scene}", "--out", str(out), "--json", str(summary),
            "--quicklook", "--batch", "2", "--threads", "2", "--no-progress"]
    assert main(argv) == 0
    info = json.loads(summary.read_text())
    assert info["command"] == "embed" and info["outputs"]["embedding"]["path"] == str(out)
    assert info["windows"]["total"] == 2 and info["tiling"]["crop"] == 14 and info["crs"] == "EPSG:32632"
    with rasterio.open(out) as emb:
        assert emb.shape == (13, 15) and emb.count == 192
    assert (tmp_path / "emb.png").exists()
    # A second run without --overwrite refuses, and leaves the file alone.
    before = out.read_bytes()
    assert main(argv) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(argv + ["--overwrite", "--no-blend", "--padding", "replicate"]) == 0


@pytest.mark.parametrize("extra,message", [
    (["--padding", "circular"], "circular"),
    (["--precision", "bf16"], "--precision applies"),
    (["--bands", "S2L2A=1,2"], "2 bands selected"),
    (["--bands", "S2L2A=B01"], "no band descriptions"),
    (["--stride", "200"], "multiple of 16"),
    (["--input", "S1GRD=/nonexistent.tif"], "no such file"),
])
def test_errors_are_one_line_and_write_nothing(tiny_export, small_scene, tmp_path, capsys, extra, message):
    out = tmp_path / "emb.tif"
    code = main(["embed", str(tiny_export), "--input", f"S2L2A={small_scene}", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("tm-run: error:") and message in err
    assert list(tmp_path.iterdir()) == []


def test_predict_needs_a_task_export(tiny_export, small_scene, tmp_path, capsys):
    assert main(["predict", str(tiny_export), "--input", f"S2L2A={small_scene}", "--out", str(tmp_path / "m.tif")]) == 1
    assert "fine-tuned task export" in capsys.readouterr().err


def test_generate_outputs_by_modality(small_generate_export, tmp_path, capsys):
    scene = write_scene(tmp_path / "s2.tif", s2_array(100, 120, seed=12))
    dem = tmp_path / "dem.tif"
    code = main(["generate", str(small_generate_export), "--input", f"S2L2A={scene}", "--output", f"DEM={dem}",
                 "--timesteps", "1", "--seed", "3", "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["op"]["seed"] == 3 and info["op"]["output_modalities"] == ["DEM"]
    with rasterio.open(dem) as out, rasterio.open(scene) as src:
        assert out.shape == (100, 120) and out.transform == src.transform and np.isfinite(out.read()).all()
    assert main(["generate", str(small_generate_export), "--input", f"S2L2A={scene}", "--output",
                 f"LULC={tmp_path / 'x.tif'}"]) == 1
    assert "LULC was not exported" in capsys.readouterr().err
