"""DDIM scheduler for the DiVAE diffusion decoders, in numpy.

It reproduces the scheduler TerraMind's DiVAE tokenizers build (1000 training steps, linear betas
1e-4..0.02 rescaled to zero terminal SNR, "trailing" timesteps, the UNet predicts x0 ("sample"),
x0 clamped to [-1, 1], eta = 0, alpha_prev = 1 past the last step). As in diffusers the pipeline
owns the loop::

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    x = rng.standard_normal(shape, dtype=np.float32)   # init_noise_sigma is 1
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, quant), t, x)

The noise table is built in float64 (upstream builds it in float32; the two agree to ~1e-7);
the step itself runs in float32 like upstream's.
"""
from __future__ import annotations

import numpy as np


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that alpha_bar at the last step is exactly 0 (Lin et al. 2023, arXiv:2305.08891).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    sqrt_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_bar[0], sqrt_bar[-1]
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    alpha_bar = sqrt_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


class DDIMScheduler:
    """Deterministic DDIM (eta = 0) with x0 ("sample") prediction, as configured by DiVAE."""

    init_noise_sigma: float = 1.0  # the start noise is a plain standard normal

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample_range: float = 1.0,
    ) -> None:
        if int(num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.clip_sample_range = float(clip_sample_range)
        self.betas: np.ndarray = _zero_terminal_snr(
            np.linspace(beta_start, beta_end, self.num_train_timesteps, dtype=np.float64)
        )
        self.alphas_cumprod: np.ndarray = np.cumprod(1.0 - self.betas)
        # The last x0 step has no "previous" alpha_bar; DiVAE uses 1, i.e. the output is the clipped x0.
        self.final_alpha_cumprod: float = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.arange(self.num_train_timesteps - 1, -1, -1, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps of the sampling loop ("trailing" spacing: start at the last training step).

        The stride is num_train_timesteps // num_inference_steps. When that does not divide
        num_train_timesteps the loop has one step more than asked (e.g. 3 -> 999, 666, 333, 0),
        exactly as upstream does.
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {num_inference_steps}"
            )
        self.num_inference_steps = int(num_inference_steps)
        stride = self.num_train_timesteps // self.num_inference_steps
        self.timesteps = np.arange(self.num_train_timesteps, 0, -stride, dtype=np.int64) - 1

    def previous_timestep(self, timestep: int) -> int:
        """The timestep a step from ``timestep`` lands on (negative past the end of the chain)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() before previous_timestep() or step()")
        return int(timestep) - self.num_train_timesteps // self.num_inference_steps

    def step_coefficients(self, timestep: int) -> np.ndarray:
        """[sqrt(a_prev), sqrt(1 - a_prev), sqrt(a_t), sqrt(1 - a_t)] as float32 (4,), the only
        per-step numbers of the update; a graph that fuses the update (the UNet graph's ``x_prev``
        output) takes them as an input, so the loop can stay on a GPU."""
        prev_timestep = self.previous_timestep(timestep)
        t = int(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.num_train_timesteps}), got {timestep}")
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        # float32 so the array arithmetic stays float32, like upstream's fp32 step.
        return np.sqrt(np.array([alpha_bar_prev, 1.0 - alpha_bar_prev, alpha_bar_t, 1.0 - alpha_bar_t])).astype(
            np.float32)

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """One DDIM update x_t -> x_prev from the model's x0 prediction; returns float32.

        The order matters and follows upstream: the noise estimate is taken from the *unclipped*
        x0, only then x0 is clamped, and x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps.
        """
        # (coefficients first: they check set_timesteps was called and the timestep's range)
        sqrt_a_prev, sqrt_one_minus_a_prev, sqrt_a_t, sqrt_one_minus_a_t = self.step_coefficients(timestep)
        x0 = np.asarray(model_output, dtype=np.float32)
        x_t = np.asarray(sample, dtype=np.float32)
        if x0.shape != x_t.shape:
            raise ValueError(f"model_output shape {x0.shape} differs from sample shape {x_t.shape}")
        eps = (x_t - sqrt_a_t * x0) / sqrt_one_minus_a_t
        # Upstream "dynamic thresholding" clamps |x0| at max(1, min(q99.5, 1)) = 1: a plain clamp.
        x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return (sqrt_a_prev * x0 + sqrt_one_minus_a_prev * eps).astype(np.float32, copy=False)

    def __len__(self) -> int:
        return self.num_train_timesteps
