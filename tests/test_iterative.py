"""Multi-step token decoding (ROAR, MaskGIT): the schedule, the order, the conditioning."""
from __future__ import annotations

import numpy as np
import pytest

from tm_runtime.iterative import iterative_decode
from tm_runtime.schedules import linear_schedule


class Recorder:
    """A fake decoder: fixed logits; records which tokens were known at every call."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, ids: np.ndarray, known: np.ndarray) -> np.ndarray:
        self.calls.append((ids.copy(), known.copy()))
        return self.logits


def test_roar_follows_one_permutation_and_the_linear_schedule():
    n, steps = 20, 3
    logits = np.random.default_rng(0).standard_normal((n, 50))
    fake = Recorder(logits)
    ids = iterative_decode(fake, n, steps, "roar", np.random.default_rng(5), temperature=0.0)
    order = np.random.default_rng(5).permutation(n)  # the first draw of the same Generator
    counts = linear_schedule(steps, n)
    assert len(fake.calls) == steps
    done = 0
    for (_, known), count in zip(fake.calls, counts):
        assert set(np.flatnonzero(known)) == set(order[:done])  # each pass sees what was decoded before
        done += count
    np.testing.assert_array_equal(ids, logits.argmax(-1))  # argmax: every position gets its best token


def test_maskgit_keeps_the_most_confident_positions_first():
    n, v = 8, 4
    logits = np.zeros((n, v))
    confidence_rank = [3, 7, 0, 5, 1, 6, 2, 4]  # position 2 most confident, then 4, 6, 0, ...
    for pos, rank in enumerate(confidence_rank):
        logits[pos, pos % v] = 10.0 - rank  # a peak whose height sets the confidence
    fake = Recorder(logits)
    ids = iterative_decode(fake, n, 2, "maskgit", np.random.default_rng(0), temperature=0.0)
    first_known = np.flatnonzero(fake.calls[1][1])
    assert sorted(first_known) == sorted(np.argsort(confidence_rank)[:4])
    np.testing.assert_array_equal(ids, np.arange(n) % v)


def test_sampling_consumes_the_generator_reproducibly():
    logits = np.random.default_rng(1).standard_normal((30, 100))
    a = iterative_decode(Recorder(logits), 30, 4, "roar", np.random.default_rng(3), temperature=1.0, top_p=0.9)
    b = iterative_decode(Recorder(logits), 30, 4, "roar", np.random.default_rng(3), temperature=1.0, top_p=0.9)
    c = iterative_decode(Recorder(logits), 30, 4, "maskgit", np.random.default_rng(3), temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(a, b)
    assert a.shape == c.shape == (30,)


@pytest.mark.parametrize("steps, scheme, error, pattern", [
    (0, "roar", ValueError, "decoding_steps must be between 1 and 20"),
    (21, "roar", ValueError, "decoding_steps must be between 1 and 20"),
    (2.0, "roar", TypeError, "decoding_steps must be an int"),
    (2, "random", ValueError, "scheme must be one of roar, maskgit"),
])
def test_bad_arguments(steps, scheme, error, pattern):
    with pytest.raises(error, match=pattern):
        iterative_decode(Recorder(np.zeros((20, 3))), 20, steps, scheme, np.random.default_rng(0))
