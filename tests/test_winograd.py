"""Winograd F(m x m, 3 x 3) convolutions (``tm-export --winograd``): the rewrite against the direct
convolution in torch and after ONNX export, and a whole export whose UNet uses it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tm_export.export import ExportConfig, ExportError, export
from tm_export.winograd import WinogradConv2d, fold_batchnorm, is_winograd_eligible, use_winograd, winograd_copy
from tm_runtime import TerraMindRuntime


@pytest.mark.parametrize("tile", [2, 4])
# sizes the tile divides (no Pad/Slice), does not divide (the last tile padded), or divides on one side only
@pytest.mark.parametrize("size", [14, 17, 28, (16, 24), (16, 17), (18, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_direct_convolution(tile, size, bias):
    height, width = size if isinstance(size, tuple) else (size, size)
    torch.manual_seed(height * width)
    conv = nn.Conv2d(24, 16, 3, padding=1, bias=bias)
    x = torch.randn(2, 24, height, width)
    with torch.no_grad():
        ref = conv(x)
        got = WinogradConv2d(conv, tile)(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() / ref.abs().max() < (1e-6 if tile == 2 else 2e-5)


def test_small_maps_keep_the_direct_convolution():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    wino = WinogradConv2d(conv, 4, min_size=14)
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(wino(x), conv(x), rtol=0, atol=0)


def test_onnx_export_keeps_batch_symbolic(tmp_path):
    import onnxruntime as ort

    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 28, 28)
    torch.onnx.export(WinogradConv2d(conv, 4), (x,), str(tmp_path / "w.onnx"), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(tmp_path / "w.onnx"), providers=["CPUExecutionProvider"])
    assert "DepthToSpace" in {n.op_type for n in __import__("onnx").load(str(tmp_path / "w.onnx")).graph.node}
    for batch in (1, 3):
        xb = torch.randn(batch, 16, 28, 28)
        with torch.no_grad():
            ref = conv(xb).numpy()
        got = sess.run(None, {"x": xb.numpy()})[0]
        assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-5


def test_only_eligible_convolutions_are_replaced():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, stride=2, padding=1),
                          nn.Conv2d(64, 64, 1), nn.Sequential(nn.Conv2d(64, 128, 3, padding=1)),
                          nn.Conv2d(2, 64, 3, padding=1))
    assert not is_winograd_eligible(model[1]) and not is_winograd_eligible(model[2])
    assert use_winograd(model, 4, min_channels=64) == 2
    assert isinstance(model[0], WinogradConv2d) and isinstance(model[3][0], WinogradConv2d)
    assert isinstance(model[4], nn.Conv2d)  # 2 input channels: below min_channels
    with pytest.raises(ValueError, match="3x3, stride 1"):
        WinogradConv2d(nn.Conv2d(4, 4, 3, stride=2, padding=1))


def _random_norm(norm: nn.BatchNorm2d, gen: torch.Generator) -> nn.BatchNorm2d:
    with torch.no_grad():
        for t in (norm.weight, norm.bias, norm.running_mean):
            if t is not None:  # affine=False: no weight or bias
                t.copy_(torch.randn(t.shape, generator=gen))
        norm.running_var.copy_(0.5 + torch.rand(norm.running_var.shape, generator=gen))
    return norm.eval()


def test_batchnorm_folds_into_the_convolution_before_it():
    gen = torch.Generator().manual_seed(3)
    # a large eps and small variances, so that a fold that forgot eps fails the tolerance
    affine_norm = _random_norm(nn.BatchNorm2d(16, eps=0.1), gen)
    plain_norm = _random_norm(nn.BatchNorm2d(16, eps=0.1, affine=False), gen)
    with torch.no_grad():
        for norm in (affine_norm, plain_norm):
            norm.running_var.mul_(0.2)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), affine_norm, nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), plain_norm,
                          nn.BatchNorm2d(16).train())  # training mode, and after a norm: not folded
    original = {k: v.clone() for k, v in model.state_dict().items()}
    copy_ = winograd_copy(model, 4, (torch.randn(1, 8, 16, 16),), min_channels=8)[0]
    x = torch.randn(2, 8, 16, 16)
    model[5].eval()
    copy_[5].eval()
    with torch.no_grad():
        ref, got = model(x), copy_(x)
    assert isinstance(copy_[1], nn.Identity) and isinstance(copy_[4], nn.Identity)
    assert isinstance(copy_[5], nn.BatchNorm2d)
    assert isinstance(copy_[0], WinogradConv2d) and isinstance(copy_[3], WinogradConv2d)
    assert (got - ref).abs().max() / ref.abs().max() < 2e-5
    # the source model (whose tensors the copy shares) is untouched
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[0], nn.Conv2d)
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4).train())) == 0

    class Reversed(nn.Sequential):  # does not run its children in order: nothing to fold
        def forward(self, x):
            for child in reversed(self):
                x = child(x)
            return x

    assert fold_batchnorm(Reversed(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4).eval())) == 0


def test_upernet_convmodules_fold_and_rewrite():
    """terratorch's ConvModule (conv, norm, act) is a named Sequential here: its checkpoint keys stay
    ``conv.*``/``norm.*``, and the Winograd rewrite folds its BatchNorm."""
    from tm_export.task.decoders import UperNetDecoder

    decoder = UperNetDecoder([64, 64, 64, 64], pool_scales=[1, 2], channels=64).eval()
    gen = torch.Generator().manual_seed(4)
    for m in decoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_norm(m, gen)
    assert "bottleneck.conv.weight" in decoder.state_dict() and "bottleneck.norm.running_var" in decoder.state_dict()
    features = [torch.randn(1, 64, s, s) for s in (28, 28, 28, 28)]
    rewrite, count = winograd_copy(decoder, 4, (features,))
    assert count == 5  # bottleneck, 3 fpn_convs, fpn_bottleneck
    with torch.no_grad():
        ref, got = decoder(features), rewrite(features)
    assert (got - ref).abs().max() / ref.abs().max() < 2e-5


def test_export_with_winograd_unet(tmp_path):
    """The UNet graph is validated against the direct reference; decoding matches a direct export."""
    common = dict(size="tiny", modalities=["S2L2A"], output_modalities=["DEM"], random_init=True, seed=2,
                  tokenizer_size="small")
    export(ExportConfig(out=tmp_path / "direct", **common), log=lambda s: None)
    export(ExportConfig(out=tmp_path / "wino", winograd=4, **common), log=lambda s: None)
    entry = json.loads((tmp_path / "wino" / "manifest.json").read_text())["graphs"]["unet_DEM"]
    assert entry["winograd"]["tile"] == 4 and entry["winograd"]["convolutions"] > 0
    assert entry["validation"]["passed"] and entry["validation"]["max_rel"] < 1e-4
    ids = np.random.default_rng(0).integers(0, 15360, (2, 14, 14))
    noise = np.random.default_rng(1).standard_normal((2, 1, 224, 224)).astype(np.float32)
    a = TerraMindRuntime(tmp_path / "direct").decode_tokens("DEM", ids, timesteps=3, noise=noise)
    b = TerraMindRuntime(tmp_path / "wino").decode_tokens("DEM", ids, timesteps=3, noise=noise)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4
    with pytest.raises(ExportError, match="fp32"):
        export(ExportConfig(out=tmp_path / "x", winograd=4, precision="fp16", **common), log=lambda s: None)
    with pytest.raises(ExportError, match="tile must be one of"):
        export(ExportConfig(out=tmp_path / "x", winograd=3, **common), log=lambda s: None)
