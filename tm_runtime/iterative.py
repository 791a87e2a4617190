"""Multi-step token decoding (``decoding_steps > 1``), an extension beyond upstream.

Upstream's public generate decodes every image output in one pass; asking it for more steps crashes
(its first step already takes all tokens). Here each step decodes a share of the positions (the
linear schedule), and the tokens decoded so far enter the encoder through the output's token
embedding, so later steps are conditioned on them (as 4M-style ROAR intends):

* ``roar``: a random order of positions (one permutation, drawn from the Generator); each step
  samples the next positions in that order.
* ``maskgit``: each step samples every still-unknown position and keeps the most confident ones
  (highest probability of the sampled token under the sampling distribution).

The decoder graph scores all positions at once (its queries attend to each other); upstream's
ROAR would score only the selected subset, so results are not comparable draw for draw with it.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .sampling import ARGMAX_TEMPERATURE, sample_from_uniforms, sample_tokens, sampling_probs
from .schedules import linear_schedule

SCHEMES = ("roar", "maskgit")
# (ids (N,), known (N,) bool) -> logits (N, V) of every position given the known tokens
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_decoding(decoding_steps: int, scheme: str, num_positions: int) -> None:
    if isinstance(decoding_steps, bool) or not isinstance(decoding_steps, (int, np.integer)):
        raise TypeError(f"decoding_steps must be an int, got {type(decoding_steps).__name__}")
    if not 1 <= decoding_steps <= num_positions:
        raise ValueError(f"decoding_steps must be between 1 and {num_positions} (the token count), got {decoding_steps}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")


def _sample_with_confidence(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int,
                            top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """``sample_tokens``'s ids (the same draws from the same ``rng``) and each id's probability
    under the distribution it was drawn from, computed once."""
    if temperature <= ARGMAX_TEMPERATURE:
        ids = sample_tokens(logits, rng, temperature=temperature)
        shifted = logits - logits.max(-1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    else:
        probs = sampling_probs(logits, temperature, top_k, top_p)
        ids = sample_from_uniforms(probs, rng.random(probs.shape[0]))
    return ids, np.take_along_axis(probs, ids[:, None], axis=-1)[:, 0]


def iterative_decode(
    logits_fn: LogitsFn,
    num_positions: int,
    decoding_steps: int,
    scheme: str,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.8,
) -> np.ndarray:
    """Token ids (N,) of one image, decoded in ``decoding_steps`` passes of ``logits_fn``."""
    check_decoding(decoding_steps, scheme, num_positions)
    ids = np.zeros(num_positions, dtype=np.int64)
    known = np.zeros(num_positions, dtype=bool)
    order = rng.permutation(num_positions) if scheme == "roar" else None
    cursor = 0
    for count in linear_schedule(decoding_steps, num_positions):
        logits = logits_fn(ids, known)
        if order is not None:
            chosen = order[cursor:cursor + count]
            cursor += count
            ids[chosen] = sample_tokens(logits[chosen], rng, temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            unknown = np.flatnonzero(~known)
            sampled, confidence = _sample_with_confidence(logits[unknown], rng, temperature, top_k, top_p)
            best = np.argsort(-confidence, kind="stable")[:count]
            chosen = unknown[best]
            ids[chosen] = sampled[best]
        known[chosen] = True
    return ids
