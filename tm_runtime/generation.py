"""Any-to-any generation on top of the graphs: argument checks, the diffusion decode loop and the
per-target pipeline. The runtime (``TerraMindRuntime.generate``) wires these to its backend.

Randomness comes from one ``numpy.random.Generator``. Per output modality, in the order given:
first the token draws (one uniform per token, see ``sampling.sample_tokens``), then the initial
diffusion noise (``standard_normal``, float32). A reference that consumes the same Generator the
same way reproduces the run draw for draw.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import numpy as np

from .fsq import FSQ
from .scheduler import DDIMScheduler

# (x_t (B, C, H, W), t (B,) int64, codes (B, 5, h, w), DDIM coefficients (4,)) -> predicted x0
UNetCall = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Progress = Callable[[str, int, int], None]


def check_timesteps(timesteps: int) -> int:
    if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral):
        raise TypeError(f"timesteps must be an int (diffusion denoising steps), got {type(timesteps).__name__}")
    if not 1 <= timesteps <= 1000:
        raise ValueError(f"timesteps must be between 1 and 1000 (diffusion denoising steps), got {timesteps}")
    return int(timesteps)


def as_output_list(output_modalities: str | Sequence[str]) -> list[str]:
    names = [output_modalities] if isinstance(output_modalities, str) else list(output_modalities)
    if not names:
        raise ValueError("output_modalities is empty: name at least one modality to generate")
    return names


def check_tokens(modality: str, tokens: np.ndarray, vocab_size: int, grid: int) -> np.ndarray:
    """Token ids (B, grid, grid) or (B, grid*grid) of integer dtype within the vocabulary."""
    if not isinstance(tokens, np.ndarray):
        raise TypeError(f"{modality} tokens: expected a numpy.ndarray, got {type(tokens).__name__}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{modality} tokens: expected integer ids, got dtype {tokens.dtype}")
    if tokens.ndim == 2 and tokens.shape[1] == grid * grid:
        tokens = tokens.reshape(tokens.shape[0], grid, grid)
    if tokens.ndim != 3 or tokens.shape[1:] != (grid, grid) or tokens.shape[0] < 1:
        raise ValueError(f"{modality} tokens: expected shape (B, {grid}, {grid}), got {tuple(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{modality} tokens: ids must lie in [0, {vocab_size}), got values in [{low}, {high}]")
    return tokens.astype(np.int64)


def check_noise(modality: str, noise: object, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(noise, np.ndarray):
        raise TypeError(f"{modality} noise: expected a numpy.ndarray, got {type(noise).__name__}")
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"{modality} noise: expected shape {tuple(shape)}, got {tuple(noise.shape)}")
    if not np.issubdtype(noise.dtype, np.floating) or not np.isfinite(noise).all():
        raise ValueError(f"{modality} noise: expected finite floating-point values")
    return np.ascontiguousarray(noise, dtype=np.float32)


def _scheduler(timesteps: int) -> DDIMScheduler:
    """The DiVAE tokenizers' DDIM scheduler, set to ``timesteps`` denoising steps."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(timesteps)
    return scheduler


def diffusion_decode(
    unet: UNetCall,
    codes: np.ndarray,
    noise: np.ndarray,
    timesteps: int,
    progress: Progress | None = None,
    label: str = "",
) -> np.ndarray:
    """DDIM from ``noise`` (B, C, H, W) conditioned on FSQ ``codes``; returns x0 in [-1, 1]
    (standardised units). The loop lives on the host; each step is one UNet graph call."""
    scheduler = _scheduler(timesteps)
    x = noise
    batch = x.shape[0]
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        x0 = unet(x, np.full((batch,), int(t), dtype=np.int64), codes, scheduler.step_coefficients(int(t)))
        x = scheduler.step(x0, int(t), x)
        if progress:
            progress(label, i + 1, steps)
    return x


def diffusion_decode_device(
    run_device: Callable[[dict], object],
    to_host: Callable[[object], np.ndarray],
    codes: np.ndarray,
    noise: np.ndarray,
    timesteps: int,
    progress: Progress | None = None,
    label: str = "",
) -> np.ndarray:
    """The same loop for a GPU backend: the UNet graph's fused ``x_prev`` output is fed straight
    back as the next ``x_t`` on the device; only t and the 4 DDIM coefficients go up per step,
    and x comes down once at the end."""
    scheduler = _scheduler(timesteps)
    x: object = noise
    batch = noise.shape[0]
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        x = run_device({"x_t": x, "t": np.full((batch,), int(t), dtype=np.int64), "quant": codes,
                        "ddim": scheduler.step_coefficients(int(t))})
        if progress:
            progress(label, i + 1, steps)
    return to_host(x)


def destandardize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return image * s + m


def codes_for(levels: Sequence[int], ids: np.ndarray) -> np.ndarray:
    return FSQ(levels).indices_to_codes(ids)
