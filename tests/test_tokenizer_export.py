"""Tokenizer units export to ONNX (legacy exporter, opset 17, symbolic batch) and run in
onnxruntime like in torch; strict loading; FSQ agrees with the numpy runtime. No terratorch."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tm_export.reference.tokenizers import (
    ClassMapEncoder,
    LulcDecoder,
    TokenizerEncoder,
    TokenizerLoadError,
    UNetStep,
    build_tokenizer,
    load_tokenizer,
    tokenizer_config,
)
from tm_runtime.fsq import FSQ

SIZE = 224
TOL = 1e-4
SMALL_VIT = {"dim": 64, "depth": 2, "num_heads": 4}
SMALL_UNET = {"model_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "attention_resolutions": (2, 4)}


def small_config(modality: str):
    return tokenizer_config(modality, encoder=SMALL_VIT, vit_decoder=SMALL_VIT, unet=SMALL_UNET)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (the default init zeroes biases and the UNet's output convs)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() >= 2 and not name.endswith("pos_emb"):
            p.copy_(noise / p[0].numel() ** 0.5)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)
    if hasattr(module, "encoder") and hasattr(module.encoder, "bake_positions"):
        module.encoder.bake_positions()  # pos_emb was changed in place, not loaded
    if hasattr(module, "decoder") and hasattr(module.decoder, "bake_positions"):
        module.decoder.bake_positions()
    return module.eval()


def export(module: torch.nn.Module, args: tuple, path, inputs: list[str], outputs: list[str],
           axes: dict[str, dict[int, str]]) -> tuple[ort.InferenceSession, set[str]]:
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=17, do_constant_folding=True, dynamo=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert "Einsum" not in ops
    for value in list(model.graph.input) + list(model.graph.output):
        # the declared axes are symbolic by name; every other dim must come out as a fixed size
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        symbolic = axes.get(value.name, {})
        assert all(d == symbolic[i] if i in symbolic else isinstance(d, int) and d > 0 for i, d in enumerate(dims)), \
            (value.name, dims)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ops


def rel_err(ours: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.double().numpy()
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


def test_unet_step_onnx(tmp_path):
    step = randomize_(UNetStep(small_config("S1GRD")), seed=1)
    gen = torch.Generator().manual_seed(2)
    sample = lambda b: (torch.randn(b, 2, SIZE, SIZE, generator=gen),  # noqa: E731
                        torch.randint(0, 1000, (b,), generator=gen),
                        torch.randint(0, 8, (b, 5, 14, 14), generator=gen) / 7.0)
    sess, _ = export(step, sample(2), tmp_path / "unet.onnx", ["x_t", "t", "quant"], ["x0"],
                  {"x_t": {0: "batch"}, "t": {0: "t_batch"}, "quant": {0: "batch"}, "x0": {0: "batch"}})
    for batch in (1, 3):
        x_t, t, quant = sample(batch)
        with torch.no_grad():
            ref = step(x_t, t, quant)
            ref_shared_t = step(x_t, t[:1], quant)
        feeds = {"x_t": x_t.numpy(), "quant": quant.numpy()}
        (out,) = sess.run(None, {**feeds, "t": t.numpy()})
        assert out.shape == (batch, 2, SIZE, SIZE)
        assert rel_err(out, ref) <= TOL
        # one timestep for the whole batch, as the DDIM loop feeds it
        (out,) = sess.run(None, {**feeds, "t": t[:1].numpy()})
        assert rel_err(out, ref_shared_t) <= TOL


def test_encoder_onnx(tmp_path):
    cfg = small_config("S2L2A")
    enc = randomize_(TokenizerEncoder(cfg), seed=3)
    gen = torch.Generator().manual_seed(4)
    sess, ops = export(enc, (torch.randn(2, 12, SIZE, SIZE, generator=gen),), tmp_path / "enc.onnx", ["image"],
                  ["quant", "ids"], {"image": {0: "batch"}, "quant": {0: "batch"}, "ids": {0: "batch"}})
    assert "Resize" not in ops  # the positional table is baked, not resized per call
    for batch in (1, 3):
        image = torch.randn(batch, 12, SIZE, SIZE, generator=gen)
        with torch.no_grad():
            quant, ids = enc(image)
        out_quant, out_ids = sess.run(None, {"image": image.numpy()})
        assert out_ids.dtype == np.int32 and out_ids.shape == (batch, 14, 14)
        # ids may only flip at a rounding tie, where the codes then differ by one level
        same = out_ids == ids.numpy()
        assert same.mean() >= 0.99
        assert rel_err(np.where(same[:, None], out_quant, quant.numpy()), quant) <= TOL


def test_lulc_units_onnx(tmp_path):
    cfg = small_config("LULC")
    tok = build_tokenizer(cfg)
    randomize_(tok.encoder, seed=5)
    randomize_(tok.decoder, seed=6)
    gen = torch.Generator().manual_seed(7)
    cm_enc = ClassMapEncoder(tok.encoder).eval()
    sess, ops = export(cm_enc, (torch.randint(0, 10, (2, SIZE, SIZE), generator=gen),), tmp_path / "cm.onnx",
                  ["class_map"], ["quant", "ids"], {"class_map": {0: "batch"}, "quant": {0: "batch"},
                                                    "ids": {0: "batch"}})
    assert "OneHot" not in ops
    dec_sess, _ = export(tok.decoder, (torch.rand(2, 5, 14, 14, generator=gen),), tmp_path / "dec.onnx", ["quant"],
                      ["logits"], {"quant": {0: "batch"}, "logits": {0: "batch"}})
    for batch in (1, 3):
        cm = torch.randint(0, 10, (batch, SIZE, SIZE), generator=gen)
        with torch.no_grad():
            quant, ids = tok.encoder.forward_class_map(cm)
            logits = tok.decoder(quant)
        out_quant, out_ids = sess.run(None, {"class_map": cm.numpy()})
        assert (out_ids == ids.numpy()).mean() >= 0.99
        (out_logits,) = dec_sess.run(None, {"quant": quant.numpy()})
        assert out_logits.shape == (batch, 10, SIZE, SIZE)
        assert rel_err(out_logits, logits) <= TOL


def test_fsq_matches_numpy_runtime():
    for levels_from in ("S2L2A", "LULC"):
        enc = TokenizerEncoder(small_config(levels_from))
        latent = torch.randn(2, 5, 14, 14, generator=torch.Generator().manual_seed(8)) * 3
        quant, ids = enc.quantize(latent)
        np_quant, np_ids = FSQ(enc.config.levels).quantize(latent.numpy())
        np.testing.assert_array_equal(ids.numpy(), np_ids)
        np.testing.assert_array_equal(quant.numpy(), np_quant)
        all_ids = torch.arange(enc.quantize.vocab_size, dtype=torch.int32).view(1, 1, -1)
        codes = enc.quantize.indices_to_codes(all_ids)
        np.testing.assert_array_equal(codes.numpy(), FSQ(enc.config.levels).indices_to_codes(all_ids.numpy()))
        assert torch.equal(enc.quantize(torch.logit(codes.clamp(1e-6, 1 - 1e-6)))[1], all_ids)


def test_official_key_space():
    """Spot checks against the upstream checkpoint layout (full key/shape equality is in the parity tests)."""
    with torch.device("meta"):  # shapes only, no memory
        tok = build_tokenizer(tokenizer_config("S2L2A"))
        lulc = build_tokenizer(tokenizer_config("LULC"))
    sd = tok.state_dict()
    assert len(sd) == 601
    assert sd["decoder.out.2.weight"].shape == (192, 256, 3, 3)
    assert sd["decoder.input_blocks.0.0.weight"].shape == (256, 197, 3, 3)
    assert sd["decoder.input_blocks.9.1.qkv.weight"].shape == (1536, 512, 1)
    assert sd["encoder.pos_emb"].shape == (1, 768, 16, 16)
    assert sd["quant_proj.weight"].shape == (5, 768, 1, 1)
    assert sum(v.numel() for v in sd.values()) == pytest.approx(289.29e6, rel=1e-3)
    lsd = lulc.state_dict()
    assert lsd["post_quant_proj.weight"].shape == (768, 5, 1, 1)
    assert lsd["decoder.out_proj.weight"].shape == (2560, 768)
    assert sum(v.numel() for v in lsd.values()) == pytest.approx(183.89e6, rel=1e-3)


def test_load_tokenizer_is_strict():
    cfg = small_config("DEM")
    source = build_tokenizer(cfg)
    randomize_(source.encoder, seed=9)
    sd = source.state_dict()
    tok = load_tokenizer("DEM", sd, cfg)
    for key, value in tok.state_dict().items():
        assert torch.equal(value, sd[key]), key
    # the baked positional table follows the loaded pos_emb
    assert torch.equal(tok.encoder.encoder.pos_table, source.encoder.encoder.pos_table)

    broken = dict(sd)
    del broken["decoder.out.2.bias"]
    broken["decoder.extra"] = torch.zeros(1)
    broken["quant_proj.weight"] = torch.zeros(5, 63, 1, 1)
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer("DEM", broken, cfg)
    message = str(info.value)
    assert "missing keys: decoder.out.2.bias" in message
    assert "unexpected keys: decoder.extra" in message
    assert "quant_proj.weight: checkpoint (5, 63, 1, 1) vs model (5, 64, 1, 1)" in message
    with pytest.raises(TokenizerLoadError, match="config is for DEM"):
        load_tokenizer("NDVI", sd, cfg)
    with pytest.raises(ValueError, match="no tokenizer for modality"):
        tokenizer_config("S2L1C")
    with pytest.raises(ValueError, match="no diffusion decoder"):
        UNetStep(small_config("LULC"))
    with pytest.raises(ValueError, match="no ViT decoder"):
        LulcDecoder(small_config("NDVI"))
