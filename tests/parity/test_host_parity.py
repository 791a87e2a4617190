"""Host-side generation pieces against upstream terratorch: FSQ, DDIM, top-k/top-p, token schedules.

Skipped when terratorch is not installed (pip install -e .[parity]).
"""
import numpy as np
import pytest

terratorch = pytest.importorskip("terratorch", reason="parity tests compare against upstream terratorch (pip install terratorch)")
torch = pytest.importorskip("torch")
# `import terratorch` lowers float32 matmul precision globally; restore full precision for references.
torch.set_float32_matmul_precision("highest")

from terratorch.models.backbones.terramind.model import generate as tt_generate  # noqa: E402
from terratorch.models.backbones.terramind.tokenizer.quantizers.quantize_finite_scalar import (  # noqa: E402
    FiniteScalarQuantizer,
)
from terratorch.models.backbones.terramind.tokenizer.scheduling import DDIMScheduler as TTDDIMScheduler  # noqa: E402

from tm_runtime.fsq import FSQ, IMAGE_LEVELS, LULC_LEVELS  # noqa: E402
from tm_runtime.sampling import filter_logits, sample_from_uniforms, sampling_probs  # noqa: E402
from tm_runtime.scheduler import DDIMScheduler  # noqa: E402
from tm_runtime.schedules import cosine_schedule, linear_schedule  # noqa: E402

pytestmark = pytest.mark.parity

LEVELS = pytest.mark.parametrize("levels", [IMAGE_LEVELS, LULC_LEVELS], ids=["image", "lulc"])


def upstream_fsq(levels):
    return FiniteScalarQuantizer("-".join(str(level) for level in levels))


def divae_scheduler():
    # The arguments DiVAE (tokenizer/vqvae.py) passes; the rest are the class defaults.
    return TTDDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type="sample",
        clip_sample=True,
        thresholding=True,
        zero_terminal_snr=True,
    )


# ---------------------------------------------------------------------------------------------- FSQ


@LEVELS
def test_fsq_decode_all_ids(levels):
    ours, ref = FSQ(levels), upstream_fsq(levels)
    assert ours.vocab_size == ref.codebook_size
    assert ours.basis.tolist() == ref._basis.tolist()
    ids = np.arange(ours.vocab_size, dtype=np.int64).reshape(5, -1, 1)
    expected = ref.indices_to_embedding(torch.from_numpy(ids)).numpy()
    got = ours.indices_to_codes(ids)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@LEVELS
def test_fsq_encode_random(levels):
    ours, ref = FSQ(levels), upstream_fsq(levels)
    z = np.random.default_rng(0).normal(scale=2.5, size=(3, 5, 14, 14)).astype(np.float32)
    codes_ref, _, ids_ref = ref(torch.from_numpy(z))
    codes, ids = ours.quantize(z)
    assert ids.dtype == np.int32 and ids_ref.dtype == torch.int32
    np.testing.assert_array_equal(ids, ids_ref.numpy())
    np.testing.assert_array_equal(codes, codes_ref.numpy())


@LEVELS
def test_fsq_encode_near_rounding_boundaries(levels):
    # Latents whose sigmoid * (L - 1) lands within a few ulps of k + 0.5. torch's float32 sigmoid is not
    # correctly rounded (it is off by one ulp for about a third of all inputs), we round a float64 sigmoid
    # to float32; so right at a boundary the two may pick neighbouring levels, and only there.
    ours, ref = FSQ(levels), upstream_fsq(levels)
    rng = np.random.default_rng(1)
    steps = np.array(levels, dtype=np.float64)[None, :, None, None] - 1
    k = rng.integers(0, steps.astype(int).min(), size=(4, 5, 16, 16))
    p = (k + 0.5) / steps
    boundary = np.log(p / (1 - p)).astype(np.float32)
    near = boundary + rng.integers(-3, 4, size=boundary.shape).astype(np.float32) * np.spacing(boundary)
    codes_ref, _, _ = ref(torch.from_numpy(near))
    codes, _ = ours.quantize(near)
    level_diff = np.abs(np.round((codes - codes_ref.numpy()) * steps))
    assert level_diff.max() <= 1
    # A hair (1e-4 in z) away from the boundary both agree exactly.
    away = boundary + np.float32(1e-4) * np.sign(rng.standard_normal(boundary.shape)).astype(np.float32)
    codes_ref, _, ids_ref = ref(torch.from_numpy(away))
    codes, ids = ours.quantize(away)
    np.testing.assert_array_equal(ids, ids_ref.numpy())
    np.testing.assert_array_equal(codes, codes_ref.numpy())


# --------------------------------------------------------------------------------------------- DDIM


def test_ddim_tables_and_timesteps():
    ours, ref = DDIMScheduler(), divae_scheduler()
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=0, atol=1e-6)
    assert float(ref.final_alpha_cumprod) == ours.final_alpha_cumprod
    for steps in range(1, 1001):
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert ours.timesteps.tolist() == ref.timesteps.tolist(), steps


def fake_x0_model(x, t):
    # Deterministic stand-in for the UNet; overshoots [-1, 1] on purpose so clipping matters.
    return (1.6 * np.tanh(x * (1.0 + t / 1000.0)) + 0.05 * np.cos(3.0 * x)).astype(np.float32)


@pytest.mark.parametrize("steps", [2, 10, 50])
def test_ddim_steps(steps):
    ours, ref = DDIMScheduler(), divae_scheduler()
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    x = np.random.default_rng(steps).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for t_ref, t in zip(ref.timesteps, ours.timesteps):
        x0 = fake_x0_model(x, int(t))
        expected = ref.step(torch.from_numpy(x0), t_ref, torch.from_numpy(x)).prev_sample.numpy()
        got = ours.step(x0, t, x)
        assert got.dtype == np.float32 and got.shape == expected.shape
        # atol covers entries near 0, where upstream's float32 noise table (~4e-7 off) dominates.
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6, err_msg=f"t={int(t)}")
        x = expected  # both sides continue from the same state
    # The last step lands on the clipped prediction.
    np.testing.assert_array_equal(got, np.clip(x0, -1, 1))


# ----------------------------------------------------------------------------------------- sampling


def upstream_filter(logits, top_k, top_p):
    # The method filters in place; hand it a copy. Our top_p=1 means "off", upstream's off is 0.
    fn = tt_generate.GenerationSampler.top_k_top_p_filtering
    return fn(None, logits.clone(), top_k=top_k, top_p=0.0 if top_p == 1.0 else top_p)


FILTERS = pytest.mark.parametrize(
    "top_k, top_p", [(0, 0.8), (0, 0.95), (0, 0.3), (50, 1.0), (1, 1.0), (100, 0.8), (3000, 0.9)]
)


@FILTERS
def test_filter_kept_set_float64(top_k, top_p):
    logits = np.random.default_rng(top_k + int(100 * top_p)).normal(scale=3.0, size=(64, 15360))
    ref = upstream_filter(torch.from_numpy(logits), top_k, top_p).numpy()
    got = filter_logits(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_array_equal(got[np.isfinite(got)], ref[np.isfinite(ref)])


@FILTERS
def test_filter_kept_set_float32(top_k, top_p):
    # Upstream filters fp32 logits in fp32, we in fp64: they may disagree only on the one token whose
    # cumulative probability is within float32 rounding of p.
    logits = np.random.default_rng(7 + top_k).normal(scale=3.0, size=(64, 15360)).astype(np.float32)
    ref = np.isfinite(upstream_filter(torch.from_numpy(logits), top_k, top_p).numpy())
    got = np.isfinite(filter_logits(logits, top_k, top_p))
    differ_rows = np.flatnonzero((got != ref).any(-1))
    assert len(differ_rows) <= 2
    for row in differ_rows:
        assert abs(int(got[row].sum()) - int(ref[row].sum())) == 1
        p = np.exp(logits[row].astype(np.float64) - logits[row].max())
        p /= p.sum()
        boundary = np.sort(p[got[row] & ref[row]]).sum()
        assert abs(boundary - top_p) < 1e-5


def torch_draw(logits, uniforms, temperature, top_k, top_p):
    """Upstream filtering + softmax, then an inverse-CDF draw fed with the given uniforms."""
    filtered = upstream_filter(logits, top_k, top_p)
    probs = torch.softmax(filtered / temperature, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True)[:, 0]
    return torch.minimum(ids, torch.tensor(probs.shape[-1] - 1)), probs


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.8), (0.7, 0, 0.9), (1.3, 20, 1.0), (1.0, 100, 0.5)])
def test_draw_for_draw_with_shared_uniforms(temperature, top_k, top_p):
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(196, 15360))
    uniforms = rng.random(196)
    ref_ids, ref_probs = torch_draw(torch.from_numpy(logits), torch.from_numpy(uniforms), temperature, top_k, top_p)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(probs, ref_probs.numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_array_equal(sample_from_uniforms(probs, uniforms), ref_ids.numpy())


def test_argmax_matches_upstream():
    logits = torch.from_numpy(np.random.default_rng(0).normal(size=(32, 4375)).astype(np.float32))
    ref, _ = tt_generate.GenerationSampler.sample_tokens(None, logits.clone(), temperature=0.0, top_p=0.8)
    from tm_runtime.sampling import sample_tokens

    got = sample_tokens(logits.numpy(), np.random.default_rng(0), temperature=0.0, top_p=0.8)
    np.testing.assert_array_equal(got, ref.numpy())


# ---------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name, ours", [("linear_schedule", linear_schedule), ("cosine_schedule", cosine_schedule)])
def test_token_schedules(name, ours):
    ref_fn = getattr(tt_generate, name)
    for steps in range(1, 41):
        for n in list(range(1, 300, 7)) + [196, 784]:
            ref = np.asarray(ref_fn(steps, n))
            got = ours(steps, n)
            assert got.tolist() == ref.tolist(), (name, steps, n)
