"""Token sampling from decoder logits, in numpy: temperature, top-k, top-p (nucleus), argmax.

Semantics follow TerraMind's generation sampler:

* temperature <= 1e-10 -> argmax (first maximum), top-k/top-p ignored;
* otherwise top-k then top-p are applied to the *raw* logits (temperature is applied only
  afterwards, so it reshapes the distribution inside the nucleus but does not change the nucleus);
* probs = softmax(filtered / temperature), then one categorical draw per row.

Deliberate differences from upstream, all at the edges:

* ``top_p=1.0`` means "no nucleus filter" (upstream runs the filter even at 1.0 and can drop
  tokens whose cumulative probability rounds above 1; upstream disables it with 0 instead);
* filtering works on a float64 copy and never modifies the caller's logits (upstream filters
  in place, in the logits' own precision);
* the draw is an inverse-CDF lookup fed with one ``rng.random()`` uniform per row, in row-major
  order, instead of ``torch.multinomial``: same distribution, different random stream. Use
  :func:`sample_from_uniforms` to reproduce a draw from given uniforms.
"""
from __future__ import annotations

import numbers

import numpy as np

ARGMAX_TEMPERATURE = 1e-10  # at or below this temperature sampling is greedy, as upstream's isclose(T, 0)


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError/TypeError for arguments outside temperature >= 0, top_k >= 0, top_p in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means argmax), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        # Upstream also reads a float top_k in (0, 1) as a fraction of the vocabulary; we do not.
        raise TypeError(f"top_k must be an int (0 disables it), got {type(top_k).__name__} {top_k!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"top_p must be a number, got {type(top_p).__name__}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables the nucleus filter), got {top_p}")


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"logits must be a float array, got dtype {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got shape {logits.shape}")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        # -inf is a legitimate "never pick"; NaN or +inf would turn the softmax into NaN.
        raise ValueError("logits contain NaN or +inf")
    if np.isneginf(logits).all(axis=-1).any():
        raise ValueError("a row of logits is all -inf: no token can be sampled")
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    # In place on one new array: sampling runs this on (rows, vocab) float64 arrays of ~50 MB.
    e = x - x.max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _nucleus_mask(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask (..., V) of the tokens inside the top-p nucleus of float64 ``logits``.

    The nucleus is a prefix of the tokens in (logit descending, index ascending) order. Instead of
    an argsort (the whole cost of sampling: ~0.6 s for 392 x 15360) this sorts the values only, finds
    how many positions the prefix holds, and maps that back with a threshold: every token above the
    last kept value, plus, of the tokens equal to it, the first ones by index. A tie group that
    straddles the boundary is therefore split exactly as a stable argsort would split it, and the
    cumulative sums are the same numbers (they depend on the sorted values, not on which of several
    equal tokens sits where).
    """
    descending = -np.sort(-logits, axis=-1)
    cumulative = np.cumsum(_softmax(descending), axis=-1)
    # A position is dropped when the mass before it already exceeds p; the position 0 never is.
    kept = 1 + np.count_nonzero(cumulative[..., :-1] <= top_p, axis=-1, keepdims=True)
    last_kept = np.take_along_axis(descending, kept - 1, axis=-1)
    above = logits > last_kept
    tied = logits == last_kept
    tied_kept = kept - np.count_nonzero(above, axis=-1, keepdims=True)
    split = (tied_kept < np.count_nonzero(tied, axis=-1, keepdims=True))[..., 0]
    if split.any():  # rare: only rows whose boundary cuts through equal logits need the index order
        tied[split] &= np.cumsum(tied[split], axis=-1) <= tied_kept[split]
    return above | tied


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Return a float64 copy of ``logits`` (..., V) with tokens outside top-k / top-p set to -inf.

    top-k keeps every token whose logit is >= the k-th largest (ties with it survive).
    top-p, applied after top-k: sort descending, cumulative softmax, drop tokens whose cumulative
    probability exceeds p, except that the first token crossing p is kept (so the nucleus is the
    smallest prefix whose mass reaches p, and is never empty).
    """
    check_sampling_args(1.0, top_k, top_p)
    out = _check_logits(logits).astype(np.float64)  # astype copies: the caller's array is untouched
    vocab = out.shape[-1]
    if top_k > 0 and top_k < vocab:
        kth_largest = np.partition(out, vocab - top_k, axis=-1)[..., vocab - top_k, None]
        out[out < kth_largest] = -np.inf
    if top_p < 1.0:
        out[~_nucleus_mask(out, top_p)] = -np.inf
    return out


def sampling_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """float64 probabilities (..., V) the sampler draws from: softmax(filter_logits(logits) / temperature)."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature <= ARGMAX_TEMPERATURE:
        raise ValueError("temperature ~0 means argmax; there is no distribution to return")
    filtered = filter_logits(logits, top_k, top_p)  # a fresh float64 array: scale it in place
    filtered /= temperature
    return _softmax(filtered)


def sample_from_uniforms(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF categorical draw: for each row the first id whose cumulative probability exceeds u * total.

    probs (..., V) non-negative (need not be normalised), uniforms (...) in [0, 1); returns int64 (...).
    Tokens with probability 0 are never chosen. Feeding a reference implementation the same
    uniforms reproduces the draw exactly (up to float rounding of the cumulative sums).
    """
    probs = np.asarray(probs, dtype=np.float64)
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if probs.ndim < 1 or probs.shape[:-1] != uniforms.shape:
        raise ValueError(f"uniforms must have shape probs.shape[:-1]; got probs {probs.shape}, uniforms {uniforms.shape}")
    if uniforms.size and (np.isnan(uniforms).any() or uniforms.min() < 0.0 or uniforms.max() >= 1.0):
        raise ValueError("uniforms must lie in [0, 1)")
    if probs.size and (np.isnan(probs).any() or probs.min() < 0.0):
        raise ValueError("probs must be non-negative")
    cdf = np.cumsum(probs, axis=-1)
    if (cdf[..., -1] <= 0.0).any():
        raise ValueError("every row of probs needs a positive total")
    target = uniforms[..., None] * cdf[..., -1:]
    ids = np.count_nonzero(cdf <= target, axis=-1)
    # u * total can round up to total; never step past the last token that has probability.
    last_positive = probs.shape[-1] - 1 - np.argmax(probs[..., ::-1] > 0.0, axis=-1)
    return np.minimum(ids, last_positive).astype(np.int64)


def sample_tokens(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """Sample one token id per row of ``logits`` (..., V); returns int64 ids of shape (...).

    Randomness: exactly ``rng.random(n)`` is consumed, n = number of rows (row-major order), so
    ``sample_from_uniforms(sampling_probs(logits, ...), that_draw.reshape(...))`` gives the same ids.
    With temperature <= 1e-10 the result is the argmax and ``rng`` is not used.
    """
    check_sampling_args(temperature, top_k, top_p)
    logits = _check_logits(logits)
    if temperature <= ARGMAX_TEMPERATURE:
        return np.argmax(logits, axis=-1).astype(np.int64)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    probs = sampling_probs(logits, temperature, top_k, top_p)
    rows = probs.shape[:-1]
    uniforms = rng.random(int(np.prod(rows, dtype=np.int64))).reshape(rows)
    return sample_from_uniforms(probs, uniforms)
