"""Token sampling and token schedules: hand-made logits with known nuclei, and draw statistics."""
import numpy as np
import pytest

from tm_runtime.sampling import filter_logits, sample_from_uniforms, sample_tokens, sampling_probs
from tm_runtime.schedules import cosine_schedule, linear_schedule

# Probabilities 0.5 / 0.3 / 0.15 / 0.05, deliberately not in sorted order.
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = np.log(PROBS)


def kept(filtered):
    return set(np.flatnonzero(np.isfinite(filtered)).tolist())


def test_argmax_at_zero_temperature():
    logits = np.random.default_rng(0).normal(size=(2, 5, 30)).astype(np.float32)
    rng = np.random.default_rng(7)
    for t in (0.0, 1e-11):
        ids = sample_tokens(logits, rng, temperature=t, top_p=0.1, top_k=3)
        assert ids.dtype == np.int64 and ids.shape == (2, 5)
        np.testing.assert_array_equal(ids, logits.argmax(-1))
    # The greedy path consumes no randomness.
    assert rng.random() == np.random.default_rng(7).random()


@pytest.mark.parametrize("top_p, expected", [(0.4, {1}), (0.7, {1, 3}), (0.85, {1, 3, 0}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_exactly_the_nucleus(top_p, expected):
    # The nucleus is the smallest set of most likely tokens whose mass reaches p (cumsum 0.5, 0.8, 0.95, 1).
    assert kept(filter_logits(LOGITS, top_p=top_p)) == expected


@pytest.mark.parametrize("top_k, expected", [(1, {1}), (2, {1, 3}), (3, {0, 1, 3}), (4, {0, 1, 2, 3}), (9, {0, 1, 2, 3})])
def test_top_k(top_k, expected):
    assert kept(filter_logits(LOGITS, top_k=top_k)) == expected


def test_top_k_keeps_ties():
    assert kept(filter_logits(np.array([1.0, 3.0, 3.0, 0.0]), top_k=1)) == {1, 2}


def test_top_p_splits_a_tie_at_the_boundary_by_index():
    # Four equal tokens (0.25 each): the mass before the 4th is 0.75 > 0.6, before the 3rd 0.5.
    # The nucleus holds three of them, the first three by index, as a stable sort orders them.
    assert kept(filter_logits(np.zeros(4), top_p=0.6)) == {0, 1, 2}
    logits = np.array([0.0, 2.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    probs = np.exp(logits) / np.exp(logits).sum()
    # Both 2.0s hold 2 * probs[1] < 0.8; the 1.0 tokens follow in index order 2, 4, 5, 6.
    mass = 2 * probs[1] + np.cumsum(probs[[2, 4, 5, 6]])
    need = int(np.count_nonzero(np.concatenate([[2 * probs[1]], mass[:-1]]) <= 0.8))
    assert kept(filter_logits(logits, top_p=0.8)) == {1, 3} | set([2, 4, 5, 6][:need])
    assert 0 < need < 4  # the boundary does cut through the tie


def _nucleus_by_stable_argsort(logits, top_p):
    # The definition, written the slow way: sort (stable), cumulative softmax, shift by one.
    order = np.argsort(-logits, axis=-1, kind="stable")
    ordered = np.take_along_axis(logits, order, axis=-1)
    probs = np.exp(ordered - ordered[..., :1])
    cumulative = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
    drop_sorted = np.zeros(cumulative.shape, dtype=bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return ~drop


def test_top_p_matches_the_stable_sort_definition_on_tie_heavy_logits():
    rng = np.random.default_rng(11)
    for _ in range(300):
        shape = tuple(rng.integers(1, 4, size=rng.integers(0, 3))) + (int(rng.integers(1, 30)),)
        logits = rng.integers(-3, 4, size=shape) * float(rng.choice([0.5, 1.0, 2.0]))
        top_p = float(rng.choice([0.1, 0.3, 0.5, 0.8, 0.95]))
        got = np.isfinite(filter_logits(logits, top_p=top_p))
        np.testing.assert_array_equal(got, _nucleus_by_stable_argsort(logits, top_p), err_msg=f"{logits} p={top_p}")


def test_top_p_after_top_k_uses_renormalised_mass():
    # Alone, p = 0.52 needs two tokens (0.5 < 0.52). After top-3 the best token has 0.5 / 0.95 > 0.52.
    assert kept(filter_logits(LOGITS, top_p=0.52)) == {1, 3}
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.52)) == {1}


def test_filter_values_and_no_mutation():
    logits = LOGITS.astype(np.float32)
    before = logits.copy()
    out = filter_logits(logits, top_p=0.7)
    np.testing.assert_array_equal(logits, before)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out[[1, 3]], logits[[1, 3]].astype(np.float64))
    assert np.isneginf(out[[0, 2]]).all()


def test_temperature_applies_after_the_nucleus():
    hot = sampling_probs(LOGITS, temperature=1e6, top_p=0.7)
    np.testing.assert_allclose(hot, [0, 0.5, 0, 0.5], atol=1e-6)
    cold = sampling_probs(LOGITS, temperature=0.5, top_p=0.7)
    np.testing.assert_allclose(cold, [0, 0.5**2, 0, 0.3**2] / np.float64(0.5**2 + 0.3**2))


def test_sample_from_uniforms_is_inverse_cdf():
    probs = np.array([0.2, 0.0, 0.5, 0.3])
    u = np.array([0.0, 0.1, 0.25, 0.69, 0.71, 0.999999, np.nextafter(1.0, 0.0)])
    ids = sample_from_uniforms(np.broadcast_to(probs, (len(u), 4)), u)
    assert ids.tolist() == [0, 0, 2, 2, 3, 3, 3]
    # Trailing zero-probability tokens are never reached, even for u just below 1.
    assert sample_from_uniforms(np.array([0.5, 0.5, 0.0]), np.array(np.nextafter(1.0, 0.0))) == 1


def test_sample_tokens_is_sample_from_uniforms_with_the_same_stream():
    logits = np.random.default_rng(3).normal(scale=2.0, size=(2, 7, 50))
    ids = sample_tokens(logits, np.random.default_rng(11), temperature=0.8, top_k=20, top_p=0.9)
    u = np.random.default_rng(11).random(14).reshape(2, 7)
    np.testing.assert_array_equal(ids, sample_from_uniforms(sampling_probs(logits, 0.8, 20, 0.9), u))
    assert ids.shape == (2, 7) and ids.dtype == np.int64
    assert sample_tokens(logits[0, 0], np.random.default_rng(0)).shape == ()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.5, 5, 0.9)])
def test_empirical_distribution_matches_filtered_softmax(temperature, top_k, top_p):
    logits = np.random.default_rng(5).normal(scale=1.5, size=12)
    n = 200_000
    ids = sample_tokens(np.broadcast_to(logits, (n, 12)), np.random.default_rng(9), temperature, top_k, top_p)
    freq = np.bincount(ids, minlength=12) / n
    # Independent expectation: build the filtered, tempered softmax by hand.
    order = np.argsort(-logits)
    allowed = np.zeros(12, bool)
    allowed[order[: top_k or 12]] = True
    p_raw = np.where(allowed, np.exp(logits), 0.0)
    p_raw /= p_raw.sum()
    mass = 0.0
    nucleus = np.zeros(12, bool)
    for i in order:
        if allowed[i] and (mass < top_p or top_p == 1.0):
            nucleus[i] = True
            mass += p_raw[i]
    expected = np.where(nucleus, np.exp(logits / temperature), 0.0)
    expected /= expected.sum()
    assert (freq[~nucleus] == 0).all()
    np.testing.assert_allclose(freq, expected, atol=0.006)


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    for kwargs, exc in [
        (dict(top_p=0.0), ValueError),
        (dict(top_p=1.5), ValueError),
        (dict(top_p=-0.1), ValueError),
        (dict(temperature=-1.0), ValueError),
        (dict(temperature=float("nan")), ValueError),
        (dict(top_k=-1), ValueError),
        (dict(top_k=2.5), TypeError),
    ]:
        with pytest.raises(exc):
            sample_tokens(LOGITS, rng, **kwargs)
    with pytest.raises(TypeError, match="Generator"):
        sample_tokens(LOGITS, 42)
    with pytest.raises(ValueError, match="NaN"):
        sample_tokens(np.array([0.0, np.nan]), rng)
    with pytest.raises(ValueError, match="all -inf"):
        sample_tokens(np.array([-np.inf, -np.inf]), rng)
    with pytest.raises(TypeError):
        sample_tokens(np.array([1, 2]), rng)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sample_from_uniforms(PROBS, np.array(1.0))
    with pytest.raises(ValueError, match="shape"):
        sample_from_uniforms(PROBS, np.zeros(2))


@pytest.mark.parametrize(
    "steps, n, expected",
    [(4, 196, [49, 49, 49, 49]), (1, 196, [196]), (3, 10, [4, 3, 3]), (5, 3, [1, 1, 1]), (3, 196, [66, 65, 65])],
)
def test_linear_schedule(steps, n, expected):
    out = linear_schedule(steps, n)
    assert out.dtype == np.int64 and out.tolist() == expected


@pytest.mark.parametrize("steps, n, expected", [(4, 196, [29, 69, 69, 29]), (1, 196, [196]), (2, 10, [5, 5])])
def test_cosine_schedule(steps, n, expected):
    out = cosine_schedule(steps, n)
    assert out.dtype == np.int64 and out.tolist() == expected and out.sum() == n


def test_schedule_arguments():
    for fn in (linear_schedule, cosine_schedule):
        with pytest.raises(ValueError):
            fn(0, 196)
        with pytest.raises(ValueError):
            fn(4, 0)
        with pytest.raises(TypeError):
            fn(2.0, 196)
