"""Tokenizer reference vs upstream terratorch (DiVAE / VQVAE and their parts), at 224x224.

Every upstream parameter is randomised first (upstream zero-initialises the UNet's output convs,
which would hide most decoder bugs), then copied into ours with strict=True. Shrunken
architectures are built from the upstream building blocks directly (the DiVAE/VQVAE constructors
hard-wire the sizes); the real S1GRD and LULC tokenizers are built from the upstream classes
exactly as terratorch's registry builds them.

Errors are relative: max|ours - upstream| / max|upstream|.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

terratorch = pytest.importorskip("terratorch", reason="parity tests compare against upstream terratorch")
# Importing terratorch lowers the float32 matmul precision globally; parity needs full fp32.
torch.set_float32_matmul_precision("highest")

from terratorch.models.backbones.terramind.tokenizer.models.unet.unet import PatchedUNetCondCat  # noqa: E402
from terratorch.models.backbones.terramind.tokenizer.models.vit_models import (  # noqa: E402
    ViTDecoder as UpViTDecoder,
)
from terratorch.models.backbones.terramind.tokenizer.models.vit_models import (  # noqa: E402
    ViTEncoder as UpViTEncoder,
)
from terratorch.models.backbones.terramind.tokenizer.quantizers import FiniteScalarQuantizer  # noqa: E402
from terratorch.models.backbones.terramind.tokenizer.vqvae import VQ, VQVAE, DiVAE  # noqa: E402

from tm_export.reference.tokenizers import (  # noqa: E402
    ClassMapEncoder,
    LulcDecoder,
    TokenizerEncoder,
    UNetStep,
    load_tokenizer,
    tokenizer_config,
)

pytestmark = pytest.mark.parity

SIZE = 224
TOL = 1e-5
MAX_TIE_FRACTION = 1e-3  # ids may differ only where the upstream latent sits on a rounding boundary
TIE_WIDTH = 1e-4  # |frac(sigmoid(z) (L-1)) - 0.5| below this counts as a rounding tie
SMALL_VIT = {"dim": 64, "depth": 2, "num_heads": 4}
CODEBOOKS = {"unet": "8-8-8-6-5", "vit": "7-5-5-5-5"}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter a random value of a sensible scale (fan-in scaled weights, norm
    weights around 1, small biases, random positional tables)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("pos_emb"):
            p.copy_(noise)
        elif p.dim() >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):  # LayerNorm / GroupNorm scales
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)
    return module.eval()


class Parts(nn.Module):
    """Upstream submodules under the checkpoint's attribute names, so that the upstream
    ``VQ.encode`` / ``VQVAE.decode_quant`` can run on shrunken pieces."""

    undo_std = False
    cls_emb = None
    prepare_input = VQ.prepare_input

    def __init__(self, **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)


def small_config(modality: str, **changes):
    return tokenizer_config(modality, encoder=SMALL_VIT, vit_decoder=SMALL_VIT, **changes)


def upstream_small_encoder(cfg) -> Parts:
    vit = UpViTEncoder(in_channels=cfg.in_channels, patch_size=16, resolution=256, dim_tokens=cfg.encoder.dim,
                       depth=cfg.encoder.depth, num_heads=cfg.encoder.num_heads, mlp_ratio=4.0, qkv_bias=True,
                       post_mlp=True)
    return Parts(encoder=vit, quant_proj=nn.Conv2d(cfg.encoder.dim, cfg.latent_dim, 1),
                 quantize=FiniteScalarQuantizer(codebook_size=CODEBOOKS[cfg.decoder]))


def check_fsq(ours: tuple[torch.Tensor, torch.Tensor], up_quant: torch.Tensor, up_ids: torch.Tensor,
              up_latent: torch.Tensor, levels: tuple[int, ...]) -> int:
    """Ids equal except at rounding ties; codes equal wherever ids are. Returns the tie count."""
    quant, ids = ours
    assert quant.dtype == torch.float32 and ids.dtype == torch.int32
    assert quant.shape == up_quant.shape and ids.shape == up_ids.shape
    differ = ids != up_ids
    n_ties = int(differ.sum())
    if n_ties:
        steps = torch.tensor([lv - 1 for lv in levels], dtype=torch.float32).view(1, -1, 1, 1)
        scaled = torch.sigmoid(up_latent) * steps
        tie_distance = ((scaled - scaled.floor()) - 0.5).abs()  # 0 exactly on a rounding boundary
        channel_differs = (quant != up_quant) & differ.unsqueeze(1)
        assert bool((tie_distance[channel_differs] < TIE_WIDTH).all()), "ids differ away from a rounding tie"
        assert n_ties / ids.numel() <= MAX_TIE_FRACTION
    keep = (~differ).unsqueeze(1).expand_as(quant)
    assert torch.equal(quant[keep], up_quant[keep])
    return n_ties


# --- encoders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", ["S2L2A", "S1GRD", "DEM", "NDVI", "LULC"])
@torch.no_grad()
def test_encoder_small(modality):
    cfg = small_config(modality)
    up = randomize_(upstream_small_encoder(cfg), seed=1)
    ours = TokenizerEncoder(cfg).eval()
    ours.load_state_dict(up.state_dict(), strict=True)
    x = torch.randn(2, cfg.in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(2))

    up_quant, _, up_ids = VQ.encode(up, x)
    up_latent = up.quant_proj(up.encoder(x))
    assert rel_err(ours.latent(x), up_latent) <= TOL
    n_ties = check_fsq(ours(x), up_quant, up_ids, up_latent, cfg.levels)
    print(f"{modality} small encoder: latent rel {rel_err(ours.latent(x), up_latent):.2e}, ties {n_ties}")
    # ids -> codes inverts the quantiser exactly, like upstream's lookup
    quant, ids = ours(x)
    assert torch.equal(ours.quantize.indices_to_codes(ids), quant)
    assert torch.equal(up.quantize.indices_to_embedding(up_ids).float(), up_quant)


@torch.no_grad()
def test_lulc_class_map_small():
    cfg = small_config("LULC")
    up = randomize_(upstream_small_encoder(cfg), seed=3)
    ours = TokenizerEncoder(cfg).eval()
    ours.load_state_dict(up.state_dict(), strict=True)
    class_map_encoder = ClassMapEncoder(ours)
    assert set(class_map_encoder.state_dict()) == set(ours.state_dict())
    cm = torch.randint(0, 10, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(4))
    onehot = torch.nn.functional.one_hot(cm, 10).permute(0, 3, 1, 2).float()
    assert torch.equal(ours.one_hot(cm), onehot)
    up_latent = up.quant_proj(up.encoder(onehot))
    for class_map in (cm, cm[:, None]):  # (B, H, W) and (B, 1, H, W)
        up_quant, _, up_ids = VQ.encode(up, class_map)
        check_fsq(class_map_encoder(class_map), up_quant, up_ids, up_latent, cfg.levels)
        quant, ids = ours(onehot)
        assert torch.equal(class_map_encoder(class_map)[1], ids)


# --- shrunken UNet step ----------------------------------------------------------------------------

@pytest.mark.parametrize("modality, num_heads", [("S2L2A", 2), ("DEM", 1)])
@torch.no_grad()
def test_unet_step_small(modality, num_heads):
    unet = {"model_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
            "attention_resolutions": (2, 4), "num_heads": num_heads}
    cfg = small_config(modality, unet=unet)
    up_unet = PatchedUNetCondCat(in_channels=cfg.in_channels, out_channels=cfg.in_channels, cond_channels=5,
                                 patch_size=4, image_size=256, model_channels=32, channel_mult=(1, 2, 2),
                                 num_res_blocks=1, attention_resolutions=[2, 4], num_heads=num_heads)
    up = randomize_(Parts(decoder=up_unet), seed=5)
    ours = UNetStep(cfg).eval()
    ours.load_state_dict(up.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(6)
    x_t = torch.randn(2, cfg.in_channels, SIZE, SIZE, generator=gen)
    quant = torch.randint(0, 8, (2, 5, SIZE // 16, SIZE // 16), generator=gen) / 7.0
    for t in (999, 499, 0):
        ref = up.decoder(x_t, t, quant)
        errs = [rel_err(ours(x_t, t, quant), ref),
                rel_err(ours(x_t, torch.tensor(t), quant), ref),
                rel_err(ours(x_t, torch.full((2,), t, dtype=torch.int64), quant), ref),
                rel_err(ours(x_t, torch.full((1,), float(t)), quant), ref)]
        print(f"{modality} small UNet t={t}: rel {max(errs):.2e}")
        assert max(errs) <= TOL
    # per-sample timesteps
    t = torch.tensor([999, 0])
    assert rel_err(ours(x_t, t, quant), up.decoder(x_t, t, quant)) <= TOL


@torch.no_grad()
def test_lulc_decoder_small():
    cfg = small_config("LULC")
    up = randomize_(Parts(post_quant_proj=nn.Conv2d(5, 64, 1),
                          decoder=UpViTDecoder(out_channels=10, patch_size=16, resolution=256, dim_tokens=64,
                                               depth=2, num_heads=4, post_mlp=True)), seed=7)
    ours = LulcDecoder(cfg).eval()
    ours.load_state_dict(up.state_dict(), strict=True)
    quant = torch.rand(2, 5, SIZE // 16, SIZE // 16, generator=torch.Generator().manual_seed(8))
    ref = VQVAE.decode_quant(up, quant)
    out = ours(quant)
    assert out.shape == (2, 10, SIZE, SIZE)
    assert rel_err(out, ref) <= TOL


# --- real configurations ----------------------------------------------------------------------------

REGISTRY_KWARGS = dict(image_size=256, post_mlp=True, patch_size=16, quant_type="fsq", latent_dim=5)


@pytest.fixture(scope="module")
def real_s1grd():
    up = DiVAE(n_channels=2, prediction_type="sample", patch_size_dec=4, codebook_size="8-8-8-6-5",
               clip_sample=True, **REGISTRY_KWARGS)
    randomize_(up, seed=11)
    tok = load_tokenizer("S1GRD", up.state_dict())
    yield up, tok
    del up, tok


@pytest.fixture(scope="module")
def real_lulc():
    up = VQVAE(n_channels=10, codebook_size="7-5-5-5-5", **REGISTRY_KWARGS)
    randomize_(up, seed=12)
    tok = load_tokenizer("LULC", up.state_dict())
    yield up, tok
    del up, tok


@torch.no_grad()
def test_real_s1grd_unet_step(real_s1grd):
    up, tok = real_s1grd
    gen = torch.Generator().manual_seed(13)
    x_t = torch.randn(1, 2, SIZE, SIZE, generator=gen)
    quant = up.quantize.indices_to_embedding(torch.randint(0, 15360, (1, 14, 14), generator=gen)).float()
    for t in (999, 499, 0):
        ref = up.decoder(x_t, t, quant)
        err = rel_err(tok.decoder(x_t, torch.tensor([t]), quant), ref)
        print(f"S1GRD real UNet t={t}: rel {err:.2e}")
        assert err <= TOL


@torch.no_grad()
def test_real_s1grd_encoder(real_s1grd):
    up, tok = real_s1grd
    x = torch.randn(2, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(14))
    up_quant, _, up_ids = up.encode(x)
    up_latent = up.quant_proj(up.encoder(x))
    err = rel_err(tok.encoder.latent(x), up_latent)
    n_ties = check_fsq(tok.encoder(x), up_quant, up_ids, up_latent, tok.config.levels)
    print(f"S1GRD real encoder: latent rel {err:.2e}, ties {n_ties}/{up_ids.numel()}")
    assert err <= TOL


@torch.no_grad()
def test_real_lulc_decode_and_class_map(real_lulc):
    up, tok = real_lulc
    gen = torch.Generator().manual_seed(15)
    quant = up.quantize.indices_to_embedding(torch.randint(0, 4375, (1, 14, 14), generator=gen)).float()
    err = rel_err(tok.decoder(quant), up.decode_quant(quant))
    print(f"LULC real decoder: rel {err:.2e}")
    assert err <= TOL

    cm = torch.randint(0, 10, (1, 1, SIZE, SIZE), generator=gen)
    up_quant, _, up_ids = up.encode(cm)
    up_latent = up.quant_proj(up.encoder(tok.encoder.one_hot(cm)))
    err = rel_err(tok.encoder.latent(tok.encoder.one_hot(cm)), up_latent)
    n_ties = check_fsq(tok.encoder.forward_class_map(cm), up_quant, up_ids, up_latent, tok.config.levels)
    print(f"LULC real class-map encoder: latent rel {err:.2e}, ties {n_ties}")
    assert err <= TOL
