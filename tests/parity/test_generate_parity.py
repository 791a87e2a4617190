"""Generation parity with upstream terratorch ``terramind_v1_<size>_generate``: the same randomised
backbone and the REAL tokenizer configurations (S1GRD DiVAE, LULC VQVAE) in terratorch and in our
export; decoder logits, tokenizer ids, one UNet step, the DDIM decode, the LULC decode and the full
argmax generate with the same diffusion noise."""
from __future__ import annotations

import numpy as np
import pytest

from .upstream import import_terratorch, randomize_state, rel_error, terramesh_tile

pytestmark = [pytest.mark.parity, pytest.mark.big_memory]  # official-size tokenizers or base weights
import_terratorch()

import torch  # noqa: E402
from terratorch.models.backbones.terramind.model.generate import (  # noqa: E402
    init_empty_target_modality,
    init_full_input_modality,
)
from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO  # noqa: E402
from terratorch.registry import FULL_MODEL_REGISTRY  # noqa: E402

from tm_export import weights as W  # noqa: E402
from tm_export.export import ExportConfig, export  # noqa: E402
from tm_runtime import TerraMindRuntime  # noqa: E402
from tm_runtime.modalities import get_modality  # noqa: E402

REF_TOL, RUNTIME_TOL = 1e-5, 1e-4
INPUTS = ["S2L2A", "S1RTC"]
TIMESTEPS = 2


def build_upstream(size: str, outputs: list[str], seed: int):
    model = FULL_MODEL_REGISTRY.build(f"terramind_v1_{size}_generate", pretrained=False, modalities=INPUTS,
                                      output_modalities=outputs, timesteps=TIMESTEPS, temps=0.0,
                                      standardize=True).eval()
    torch.set_float32_matmul_precision("highest")
    backbone = model.sampler.model
    state = randomize_state(backbone, seed)
    for key in list(state):  # the checkpoint ties to_logits to token_emb: keep them equal
        if key.endswith("to_logits.weight"):
            state[key] = state[key.replace("to_logits", "token_emb")]
    backbone.load_state_dict(state, strict=True)
    tokenizers = {}
    for key, tok in model.tokenizer.items():
        tstate = W.random_state(tok.state_dict(), seed=seed + len(tokenizers) + 1, keep=())
        tok.load_state_dict(tstate, strict=True)
        tokenizers[key] = tok.eval()
    return model, {k: v for k, v in backbone.state_dict().items()}, tokenizers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    outputs = ["S1GRD", "LULC"]
    model, state, tokenizers = build_upstream("tiny", outputs, seed=21)
    root = tmp_path_factory.mktemp("gen_parity")
    torch.save(state, root / "TerraMind_v1_tiny.pt")
    ckpts = {}
    for name, key in (("S1GRD", "tok_sen1grd@224"), ("LULC", "tok_lulc@224")):
        ckpts[name] = root / f"TerraMind_Tokenizer_{name}.pt"
        torch.save(tokenizers[key].state_dict(), ckpts[name])
    out = root / "export"
    # Every graph is compared to terratorch below, so the export skips its own validation and the
    # simplifier (minutes on the 785 MB UNet); tests/test_generate.py covers simplified graphs.
    export(ExportConfig(size="tiny", modalities=INPUTS, output_modalities=outputs, out=out,
                        ckpt=root / "TerraMind_v1_tiny.pt", tokenizer_ckpts=ckpts, validate=False, simplify=False),
           log=lambda s: None)
    return {"model": model, "tokenizers": tokenizers, "runtime": TerraMindRuntime(out)}


def real_inputs(batch: int = 1) -> dict[str, np.ndarray]:
    return {m: np.stack([terramesh_tile(m, i) for i in range(batch)]) for m in INPUTS}


def standardized(x: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for name, v in x.items():
        mod = get_modality(name)
        mean = np.asarray(mod.mean, np.float32)[None, :, None, None]
        std = np.asarray(mod.std, np.float32)[None, :, None, None]
        out[name] = torch.from_numpy((v - mean) / std)
    return out


def upstream_logits(model, x_std: dict[str, torch.Tensor], target_key: str) -> np.ndarray:
    """One decoder pass through upstream's own generation plumbing, put back in position order."""
    batch = next(iter(x_std.values())).shape[0]
    mod_dict = {}
    for name, tensor in x_std.items():
        key = get_modality(name).key
        value = {"tensor": tensor, "input_mask": torch.zeros(batch, 196, dtype=torch.bool),
                 "target_mask": torch.ones(batch, 196, dtype=torch.bool),
                 "decoder_attention_mask": torch.zeros(batch, 196, dtype=torch.bool)}
        mod_dict[key] = init_full_input_modality(value, MODALITY_INFO, key, "cpu")
    mod_dict[target_key] = init_empty_target_modality(MODALITY_INFO, target_key, batch, 196, "cpu")
    with torch.no_grad():
        logits, positions = model.sampler.forward_enc_dec_roar_batched(mod_dict, target_key, 196, seed=0)
    ordered = torch.empty_like(logits)
    ordered.scatter_(1, positions[..., None].expand_as(logits), logits)
    return ordered.numpy()


@pytest.mark.parametrize("target, key", [("S1GRD", "tok_sen1grd@224"), ("LULC", "tok_lulc@224")])
def test_decoder_logits(tiny, target, key):
    x = real_inputs(2)
    ref = upstream_logits(tiny["model"], standardized(x), key)
    got = tiny["runtime"].logits(x, target, standardize=True)
    assert got.shape == ref.shape
    assert rel_error(got, ref) <= RUNTIME_TOL


def test_tokenizer_ids_are_exact(tiny):
    image = standardized({"S1RTC": np.stack([terramesh_tile("S1RTC", i) for i in range(2)])})["S1RTC"]
    with torch.no_grad():
        quant, _, ids = tiny["tokenizers"]["tok_sen1grd@224"].encode(image)
    got = tiny["runtime"].tokenize("S1GRD", image.numpy())
    np.testing.assert_array_equal(got, ids.numpy())
    with torch.no_grad():
        _, _, lulc_ids = tiny["tokenizers"]["tok_lulc@224"].encode(
            torch.nn.functional.one_hot(torch.from_numpy(terramesh_tile("LULC")[0]).long(), 10)
            .permute(2, 0, 1)[None].float())
    onehot = np.eye(10, dtype=np.float32)[terramesh_tile("LULC")[0].astype(int)].transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(tiny["runtime"].tokenize("LULC", onehot), lulc_ids.numpy())


@pytest.mark.parametrize("t", [999, 499, 0])
def test_one_unet_step(tiny, t):
    rng = np.random.default_rng(t)
    x_t = rng.standard_normal((1, 2, 224, 224)).astype(np.float32)
    ids = rng.integers(0, 15360, (1, 14, 14))
    tok = tiny["tokenizers"]["tok_sen1grd@224"]
    with torch.no_grad():
        quant = tok.tokens_to_embedding(torch.from_numpy(ids))
        ref = tok.decoder(torch.from_numpy(x_t), torch.tensor([t]), quant).numpy()
    ddim = np.array([0.9, 0.4, 0.3, 0.95], np.float32)
    got, x_prev = tiny["runtime"].backend.run("unet_S1GRD", {"x_t": x_t, "t": np.array([t]), "quant": quant.numpy(),
                                                             "ddim": ddim}, ["x0", "x_prev"])
    assert rel_error(got, ref) <= RUNTIME_TOL
    # the fused DDIM update: x_prev = sqrt(a_prev) clip(x0) + sqrt(1-a_prev) (x_t - sqrt(a_t) x0) / sqrt(1-a_t)
    expected = ddim[0] * np.clip(ref, -1, 1) + ddim[1] * (x_t - ddim[2] * ref) / ddim[3]
    assert rel_error(x_prev, expected) <= RUNTIME_TOL


def test_ddim_decode_with_same_tokens_and_noise(tiny):
    ids = np.random.default_rng(1).integers(0, 15360, (1, 14, 14))
    noise = torch.randn((1, 2, 224, 224), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiny["tokenizers"]["tok_sen1grd@224"].decode_tokens(
            torch.from_numpy(ids), timesteps=TIMESTEPS, image_size=(224, 224),
            generator=torch.Generator().manual_seed(7)).numpy()
    got = tiny["runtime"].decode_tokens("S1GRD", ids, timesteps=TIMESTEPS, noise=noise.numpy())
    assert rel_error(got, ref) <= RUNTIME_TOL


def test_lulc_decode(tiny):
    ids = np.random.default_rng(2).integers(0, 4375, (2, 14, 14))
    with torch.no_grad():
        ref = tiny["tokenizers"]["tok_lulc@224"].decode_tokens(torch.from_numpy(ids)).numpy()
    got = tiny["runtime"].decode_tokens("LULC", ids)
    assert got.shape == ref.shape == (2, 10, 224, 224)
    assert rel_error(got, ref) <= RUNTIME_TOL


def test_full_generate_argmax_same_noise(tiny, monkeypatch):
    """terratorch's generate at temperature 0 vs ours, the diffusion noise captured from upstream."""
    x = real_inputs(1)
    captured = []
    real_randn = torch.randn

    def recording_randn(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        if out.dim() == 4:
            captured.append(out.clone())
        return out

    monkeypatch.setattr(torch, "randn", recording_randn)
    with torch.no_grad():
        ref = tiny["model"]({k: torch.from_numpy(v) for k, v in x.items()}, timesteps=TIMESTEPS)
    monkeypatch.undo()
    assert len(captured) == 1  # S1GRD only: LULC decodes in one pass
    images, tokens = tiny["runtime"].generate(x, ["S1GRD", "LULC"], timesteps=TIMESTEPS, temperature=0.0,
                                              noise={"S1GRD": captured[0].numpy()}, return_tokens=True)
    for name in ("S1GRD", "LULC"):
        assert images[name].shape == tuple(ref[name].shape)
        assert rel_error(images[name], ref[name].numpy()) <= RUNTIME_TOL, name


def test_base_decoder_logits(tmp_path):
    """The base decoder (SwiGLU, 12 blocks): reference and runtime against terratorch."""
    from tm_export.export import build_reference

    model, state, tokenizers = build_upstream("base", ["LULC"], seed=4)
    torch.save(state, tmp_path / "TerraMind_v1_base.pt")
    torch.save(tokenizers["tok_lulc@224"].state_dict(), tmp_path / "TerraMind_Tokenizer_LULC.pt")
    cfg = ExportConfig(size="base", modalities=INPUTS, output_modalities=["LULC"], out=tmp_path / "export",
                       ckpt=tmp_path / "TerraMind_v1_base.pt", validate=False,
                       tokenizer_ckpts={"LULC": tmp_path / "TerraMind_Tokenizer_LULC.pt"})
    export(cfg, log=lambda s: None)
    reference, _ = build_reference(cfg, log=lambda s: None)
    x = real_inputs(1)
    x_std = standardized(x)
    ref = upstream_logits(model, x_std, "tok_lulc@224")
    with torch.no_grad():
        ours = reference.logits(x_std, "LULC").numpy()
    assert rel_error(ours, ref) <= REF_TOL
    got = TerraMindRuntime(cfg.out).logits(x, "LULC", standardize=True)
    assert rel_error(got, ref) <= RUNTIME_TOL
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.999
