"""Finite scalar quantisation (FSQ): token ids <-> codes, in numpy.

TerraMind's tokenizers have no learned codebook. Each of the 5 latent channels is squashed to
[0, 1] and rounded onto a grid of ``L_i`` levels; the token id is the mixed-radix number whose
digit ``i`` is the level of channel ``i`` (channel 0 is the least significant digit). The image
tokenizers use levels (8, 8, 8, 6, 5) -> 15360 ids, LULC uses (7, 5, 5, 5, 5) -> 4375 ids.

Arrays are laid out as the tokenizers use them: ids (B, h, w), codes and latents (B, D, h, w).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGE_LEVELS: tuple[int, ...] = (8, 8, 8, 6, 5)
LULC_LEVELS: tuple[int, ...] = (7, 5, 5, 5, 5)


class FSQ:
    """Finite scalar quantiser with the given number of levels per latent channel."""

    def __init__(self, levels: Sequence[int]) -> None:
        levels = tuple(int(level) for level in levels)
        if len(levels) == 0:
            raise ValueError("FSQ needs at least one level")
        if any(level < 2 for level in levels):
            # A single level would make the code n / (L - 1) a division by zero.
            raise ValueError(f"every FSQ level must be >= 2, got {levels}")
        self.levels: tuple[int, ...] = levels
        self._levels = np.asarray(levels, dtype=np.int64)
        # Place value of each digit: basis[i] = L_0 * ... * L_{i-1}.
        self.basis: np.ndarray = np.cumprod((1,) + levels[:-1], dtype=np.int64)
        self.vocab_size: int = int(np.prod(self._levels))
        if self.vocab_size > np.iinfo(np.int32).max:
            raise ValueError(f"vocabulary of {self.vocab_size} ids does not fit the int32 ids the tokenizers use")
        # Float32 divisors, so codes are the same correctly rounded n / (L - 1) the tokenizers compute.
        self._steps = (self._levels - 1).astype(np.float32)

    @property
    def dim(self) -> int:
        """Number of latent channels (5 for TerraMind)."""
        return len(self.levels)

    def __repr__(self) -> str:
        return f"FSQ(levels={self.levels}, vocab_size={self.vocab_size})"

    def indices_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """Token ids (B, h, w) -> codes (B, D, h, w) float32 in [0, 1]."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be an integer array, got dtype {ids.dtype}")
        if ids.ndim != 3:
            raise ValueError(f"token ids must have shape (B, h, w), got shape {ids.shape}")
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}) for levels {self.levels}, "
                    f"got values in [{low}, {high}]"
                )
        digits = (ids.astype(np.int64)[..., None] // self.basis) % self._levels  # (B, h, w, D)
        codes = digits.astype(np.float32) / self._steps
        return np.ascontiguousarray(codes.transpose(0, 3, 1, 2))

    def codes_to_indices(self, codes: np.ndarray) -> np.ndarray:
        """Codes (B, D, h, w) on the FSQ grid -> token ids (B, h, w) int32.

        Codes are snapped to the nearest level, so small float noise is tolerated; codes outside
        [0, 1] (beyond half a level) are rejected.
        """
        codes = self._check_latent_shape(codes, "codes")
        levels = np.round(codes.astype(np.float64).transpose(0, 2, 3, 1) * (self._levels - 1))
        if levels.size and (np.isnan(levels).any() or levels.min() < 0 or (levels > self._levels - 1).any()):
            raise ValueError("codes must lie in [0, 1] (one value per FSQ level), got values outside that range")
        return (levels.astype(np.int64) * self.basis).sum(axis=-1).astype(np.int32)

    def quantize(self, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latent (B, D, h, w) -> (codes (B, D, h, w) float32, ids (B, h, w) int32).

        n_i = round(sigmoid(z_i) * (L_i - 1)) with round-half-to-even (as torch.round and ONNX
        Round do); code_i = n_i / (L_i - 1).
        """
        latent = self._check_latent_shape(latent, "latent")
        if np.isnan(latent).any():
            raise ValueError("latent contains NaN; FSQ ids would be undefined")
        z = latent.astype(np.float64).transpose(0, 2, 3, 1)  # channels last, to broadcast with levels
        with np.errstate(over="ignore"):  # exp(-z) overflows to inf for very negative z: sigmoid -> 0, as wanted
            squashed = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        # Scale and round in float32 like the tokenizer does, so half-way cases resolve the same way.
        digits = np.round(squashed * self._steps)
        codes = (digits / self._steps).astype(np.float32)
        ids = (digits.astype(np.int64) * self.basis).sum(axis=-1).astype(np.int32)
        return np.ascontiguousarray(codes.transpose(0, 3, 1, 2)), ids

    def _check_latent_shape(self, array: np.ndarray, what: str) -> np.ndarray:
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{what} must be a float array, got dtype {array.dtype}")
        if array.ndim != 4 or array.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (B, {self.dim}, h, w), got shape {array.shape}")
        return array
