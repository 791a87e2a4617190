"""DDIM scheduler: timesteps, noise table and the update rule, checked against hand-derived values."""
import numpy as np
import pytest

from tm_runtime.scheduler import DDIMScheduler


@pytest.fixture
def sched():
    return DDIMScheduler()


@pytest.mark.parametrize(
    "steps, expected",
    [
        (10, list(range(999, 0, -100))),
        (50, list(range(999, 0, -20))),
        (1, [999]),
        (2, [999, 499]),
        (1000, list(range(999, -1, -1))),
        # 1000 // 3 = 333 does not divide 1000: upstream's trailing spacing yields one extra step.
        (3, [999, 666, 333, 0]),
    ],
)
def test_trailing_timesteps(sched, steps, expected):
    sched.set_timesteps(steps)
    assert sched.timesteps.dtype == np.int64
    assert sched.timesteps.tolist() == expected


def test_alphas_cumprod_known_values(sched):
    a = sched.alphas_cumprod
    assert a.shape == (1000,)
    assert a[0] == pytest.approx(0.9999, abs=1e-12)
    assert a[999] == 0.0
    assert a[99] == pytest.approx(0.89638, abs=1e-5)
    assert a[499] == pytest.approx(0.07603, abs=1e-5)
    assert a[899] == pytest.approx(1.0613e-4, rel=1e-3)
    assert np.all(np.diff(a) < 0)


def test_zero_terminal_snr_is_affine_in_sqrt_alpha_bar(sched):
    # Independent restatement: sqrt(new alpha_bar) = c * (sqrt(old) - sqrt(old_T)) with c fixing t = 0.
    old = np.sqrt(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    np.testing.assert_allclose(np.sqrt(sched.alphas_cumprod), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.cumprod(1.0 - sched.betas), sched.alphas_cumprod, atol=1e-15)


def test_first_step_from_pure_noise(sched):
    # At t = 999 alpha_bar = 0, so the noise estimate is the sample itself.
    sched.set_timesteps(10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    x0 = rng.uniform(-1, 1, x.shape).astype(np.float32)
    out = sched.step(x0, 999, x)
    a_prev = sched.alphas_cumprod[899]
    np.testing.assert_allclose(out, np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * x, rtol=1e-6, atol=1e-6)
    assert out.dtype == np.float32


def test_last_step_returns_clipped_x0(sched):
    sched.set_timesteps(10)
    x = np.float32([[0.3, -2.0, 5.0]])
    x0 = np.float32([[0.5, -1.7, 1.2]])
    np.testing.assert_array_equal(sched.step(x0, 99, x), np.float32([[0.5, -1.0, 1.0]]))


def test_noise_estimate_uses_unclipped_x0(sched):
    sched.set_timesteps(10)
    t, prev = 499, 399
    a_t, a_p = sched.alphas_cumprod[t], sched.alphas_cumprod[prev]
    x = np.float32([0.7, -0.2])
    x0_raw = np.float32([3.0, -0.5])
    eps = (x - np.sqrt(a_t) * x0_raw) / np.sqrt(1 - a_t)  # from the raw prediction
    expected = np.sqrt(a_p) * np.clip(x0_raw, -1, 1) + np.sqrt(1 - a_p) * eps
    np.testing.assert_allclose(sched.step(x0_raw, t, x), expected, rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 3, 10, 50])
def test_perfect_model_recovers_target(sched, steps):
    # A model that always predicts the true x0 must land on it after the loop.
    rng = np.random.default_rng(1)
    target = rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    x = rng.standard_normal(target.shape).astype(np.float32) * np.float32(sched.init_noise_sigma)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(target, t, x)
    np.testing.assert_allclose(x, target, atol=1e-6)


def test_bad_arguments(sched):
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match=r"\[1, 1000\]"):
            sched.set_timesteps(bad)
    with pytest.raises(TypeError):
        sched.set_timesteps(2.5)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        DDIMScheduler().step(np.zeros(3, np.float32), 999, np.zeros(3, np.float32))
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(np.zeros(3, np.float32), 1000, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="shape"):
        sched.step(np.zeros(3, np.float32), 999, np.zeros(4, np.float32))
