"""Necks, decoders and heads beyond the official configs: our export modules load terratorch's
state_dict of each (every tensor random) and compute what terratorch's model computes; each head
graph then exports and validates on ONNX Runtime."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from tests.parity.upstream import rel_error

from .terratorch_side import build_task, randomize_all

pytestmark = pytest.mark.parity

BASE_ARGS = {
    "backbone": "terramind_v1_tiny", "backbone_pretrained": False, "backbone_modalities": ["S2L2A"],
    "necks": [{"name": "SelectIndices", "indices": [2, 5, 8, 11]}, {"name": "ReshapeTokensToImage"},
              {"name": "LearnedInterpolateToPyramidal"}],
}
PYRAMID = BASE_ARGS["necks"]
PLAIN = [{"name": "SelectIndices", "indices": [3, 7, -1]}, {"name": "ReshapeTokensToImage"}]

VARIANTS = {
    "upernet": {"necks": PYRAMID, "decoder": "UperNetDecoder", "decoder_channels": 32,
                "head_channel_list": [16], "num_classes": 3},
    "upernet_scale_modules": {"necks": [{"name": "SelectIndices", "indices": [2, 5, 8, 11]},
                                        {"name": "ReshapeTokensToImage"}],
                              "decoder": "UperNetDecoder", "decoder_channels": 24, "decoder_scale_modules": True,
                              "decoder_align_corners": False, "decoder_pool_scales": [1, 3], "num_classes": 2},
    "fcn": {"necks": PLAIN, "decoder": "FCNDecoder", "decoder_channels": 16, "decoder_num_convs": 2,
            "num_classes": 4},
    "identity_interpolate": {"necks": PLAIN + [{"name": "InterpolateToPyramidal", "mode": "bilinear"}],
                             "decoder": "IdentityDecoder", "decoder_out_index": 0, "num_classes": 2},
    # A regression head (PixelShuffle upscaler, conv-BN-ReLU, final activation) on a UNet with
    # scSE attention and no norm, fed a max-pooled pyramid plus a bottleneck feature.
    "regression_unet_scse": {"necks": PLAIN + [{"name": "MaxpoolToPyramidal"}, {"name": "AddBottleneckLayer"}],
                             "decoder": "UNetDecoder", "decoder_channels": [48, 32, 32, 16],
                             "decoder_use_batchnorm": False, "decoder_attention_type": "scse",
                             "head_learned_upscale_layers": 1, "head_channel_list": [8],
                             "head_final_act": "torch.nn.Sigmoid", "num_outputs": 1},
}


def variant_config(name: str) -> dict:
    args = {**copy.deepcopy(BASE_ARGS), **copy.deepcopy(VARIANTS[name])}
    task = "PixelwiseRegressionTask" if "num_outputs" in args else "SemanticSegmentationTask"
    return {"model": {"class_path": f"terratorch.tasks.{task}",
                      "init_args": {"model_factory": "EncoderDecoderFactory", "model_args": args}}}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_head_variant_matches_terratorch(name, tmp_path):
    import torch

    from tm_export.export import ExportConfig, export_graph
    from tm_export.task.checkpoint import strip_prefix
    from tm_export.task.config import parse_task_config
    from tm_export.task.export import head_spec
    from tm_export.task.model import build_task_model, load_task_state

    config = variant_config(name)
    task = build_task(config)
    randomize_all(task.model, seed=sum(map(ord, name)))
    task.eval()
    ours = build_task_model(parse_task_config(config))
    load_task_state(ours, strip_prefix(task.state_dict(), name), name)

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 12, 224, 224)).astype(np.float32))
    with torch.no_grad():
        want = task({"S2L2A": x}).output.numpy()
        layers = ours.encoder({"S2L2A": x})
        got = ours.head(*(layers[i] for i in ours.layers)).numpy()
    if want.ndim == 3:  # terratorch squeezes a single output channel; predict keeps (B, K, H, W)
        want = want[:, None]
    assert got.shape == want.shape
    assert rel_error(got, want) <= 1e-5

    entry = export_graph(head_spec(ours), tmp_path, ExportConfig(size="tiny", modalities=["S2L2A"], out=tmp_path),
                         log=lambda s: None)
    assert entry["validation"]["passed"], entry["validation"]


def test_regression_task_end_to_end_and_a_failed_re_export(tmp_path):
    """A regression task from a Lightning checkpoint through tm-export and ``predict``: terratorch's
    output, (B, 1, H, W) float32, and no classes or probabilities. Then a re-export that fails its
    validation (--rtol 1e-12) over it: the existing export stays as it was, no temp dir is left."""
    import hashlib

    import torch
    import yaml

    from tm_export.cli import main
    from tm_runtime import TerraMindRuntime

    from .terratorch_side import save_like_fit

    config = variant_config("regression_unet_scse")
    task = build_task(config)
    randomize_all(task.model, seed=31)
    task.eval()
    ckpt = save_like_fit(task, tmp_path / "last.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "export"
    argv = ["--task-config", str(tmp_path / "config.yaml"), "--ckpt", str(ckpt), "--out", str(out)]
    assert main(argv) == 0

    rt = TerraMindRuntime(out)
    assert rt.task.type == "regression" and rt.task.num_outputs == 1
    x = np.random.default_rng(1).standard_normal((2, 12, 224, 224)).astype(np.float32)
    got = rt.predict({"S2L2A": x}, standardize=False)
    with torch.no_grad():
        want = task({"S2L2A": torch.from_numpy(x)}).output.numpy()
    assert got.shape == (2, 1, 224, 224) and got.dtype == np.float32
    assert rel_error(got, want.reshape(got.shape)) <= 1e-4
    for output in ("classes", "probabilities"):
        with pytest.raises(ValueError, match=f"output='{output}' is for segmentation"):
            rt.predict({"S2L2A": x}, standardize=False, output=output)

    before = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert main(argv + ["--overwrite", "--rtol", "1e-12"]) == 1
    assert hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert TerraMindRuntime(out).predict({"S2L2A": x}, standardize=False).shape == (2, 1, 224, 224)
