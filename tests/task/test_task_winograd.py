"""``tm-export --task-config ... --winograd``: the task head's 3x3 convolutions as Winograd
F(4x4, 3x3) with the BatchNorms folded in, validated against the direct head and equal to
terratorch through ``predict``; the options it cannot go with."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.parity.upstream import rel_error

from .test_task_parity import raw_s2, terratorch_output

pytestmark = [pytest.mark.parity]


@pytest.fixture(scope="module")
def floods_winograd(floods_tiny, tmp_path_factory):
    from tm_export.cli import main

    out = tmp_path_factory.mktemp("floods_winograd") / "export"
    assert main(["--task-config", str(floods_tiny.config_path), "--ckpt", str(floods_tiny.ckpt), "--out", str(out),
                 "--winograd"]) == 0
    return out


def test_winograd_head_matches_terratorch(floods_tiny, floods_winograd):
    import onnx

    from tm_runtime import TerraMindRuntime

    manifest = json.loads((floods_winograd / "manifest.json").read_text())
    head = manifest["graphs"]["head"]
    # the tiny config's UNetDecoder [256, 128, 64, 32]: the last block's 32-channel convolutions stay direct
    assert head["winograd"] == {"tile": 4, "convolutions": 6}
    assert head["validation"]["passed"] and head["validation"]["max_rel"] < 1e-4
    nodes = onnx.load(str(floods_winograd / "head.onnx"), load_external_data=False).graph.node
    assert "DepthToSpace" in {n.op_type for n in nodes}  # rewritten
    # the decoder's norms are folded into the Winograd weights (the neck's, after a ConvTranspose, stay)
    assert not [n.name for n in nodes if n.op_type == "BatchNormalization" and not n.name.startswith("/neck")]
    direct = json.loads((floods_tiny.export / "manifest.json").read_text())["graphs"]
    assert "winograd" not in direct["head"] and direct["encoder"]["sha256"] == manifest["graphs"]["encoder"]["sha256"]

    rng = np.random.default_rng(5)
    raw = {"S2L1C": raw_s2(rng, 2, 13), "S1GRD": rng.normal(-15, 5, (2, 2, 224, 224)).astype(np.float32)}
    logits = TerraMindRuntime(floods_winograd).predict(raw)
    ref = terratorch_output(floods_tiny, raw)
    assert rel_error(logits, ref) <= 1e-4
    assert rel_error(logits, TerraMindRuntime(floods_tiny.export).predict(raw)) > 0  # a different graph ran


@pytest.mark.parametrize("extra,match", [
    (["--precision", "fp16"], "fp32 graphs on ONNX Runtime CPU"),
    (["--precision", "int8", "--gate-data", ".", "--int8-graphs", "encoder", "head"], "--int8-graphs head"),
])
def test_winograd_refuses_what_it_cannot_go_with(floods_tiny, tmp_path, capsys, extra, match):
    from tm_export.cli import main

    out = tmp_path / "export"
    code = main(["--task-config", str(floods_tiny.config_path), "--ckpt", str(floods_tiny.ckpt), "--out", str(out),
                 "--winograd", *extra])
    assert code != 0 and match in capsys.readouterr().err
    assert not out.exists()


def test_winograd_head_in_an_int8_export(floods_tiny, tmp_path):
    """int8 quantises the encoder; the Winograd head stays fp32 and the gates (which run predict
    through it) pass."""
    from tests.conftest import DATA_DIR
    from tm_export.cli import main

    if not (DATA_DIR / "S2L1C").is_dir():
        pytest.skip(f"TerraMesh tiles not found at {DATA_DIR}")
    out = tmp_path / "export"
    assert main(["--task-config", str(floods_tiny.config_path), "--ckpt", str(floods_tiny.ckpt), "--out", str(out),
                 "--winograd", "--precision", "int8", "--gate-data", str(DATA_DIR)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    graphs = manifest["graphs"]
    assert graphs["encoder"]["precision"] == "int8" and graphs["head"]["precision"] == "fp32"
    assert graphs["head"]["winograd"]["convolutions"] == 6
    assert manifest["accuracy"]["int8_vs_fp32"]["passed"]
