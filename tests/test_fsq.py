"""FSQ ids <-> codes: expectations worked out by hand from the mixed-radix definition."""
import numpy as np
import pytest

from tm_runtime.fsq import FSQ, IMAGE_LEVELS, LULC_LEVELS


@pytest.fixture(params=[IMAGE_LEVELS, LULC_LEVELS], ids=["image", "lulc"])
def fsq(request):
    return FSQ(request.param)


def test_vocab_and_basis():
    image, lulc = FSQ(IMAGE_LEVELS), FSQ(LULC_LEVELS)
    assert image.vocab_size == 15360 and lulc.vocab_size == 4375
    assert image.basis.tolist() == [1, 8, 64, 512, 3072]
    assert lulc.basis.tolist() == [1, 7, 35, 175, 875]
    assert image.dim == 5


def test_extreme_ids(fsq):
    ids = np.array([[[0, fsq.vocab_size - 1]]])
    codes = fsq.indices_to_codes(ids)
    assert codes.shape == (1, 5, 1, 2) and codes.dtype == np.float32
    assert (codes[..., 0] == 0).all() and (codes[..., 1] == 1).all()


def test_channel_zero_is_least_significant():
    fsq = FSQ(IMAGE_LEVELS)
    # id 1 -> digit 1 of 8 in channel 0; id 8 -> digit 1 in channel 1; 3072 -> digit 1 of 5 in channel 4.
    codes = fsq.indices_to_codes(np.array([[[1, 8, 3072, 5 + 3 * 512]]]))[0, :, 0]
    np.testing.assert_array_equal(codes[:, 0], np.float32([1 / 7, 0, 0, 0, 0]))
    np.testing.assert_array_equal(codes[:, 1], np.float32([0, 1 / 7, 0, 0, 0]))
    np.testing.assert_array_equal(codes[:, 2], np.float32([0, 0, 0, 0, 1 / 4]))
    np.testing.assert_array_equal(codes[:, 3], np.float32([5 / 7, 0, 0, 3 / 5, 0]))


def test_round_trip_all_ids(fsq):
    ids = np.arange(fsq.vocab_size).reshape(5, -1, 1)
    codes = fsq.indices_to_codes(ids)
    assert codes.min() == 0 and codes.max() == 1
    back = fsq.codes_to_indices(codes)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, ids)
    # Every id has its own code.
    flat = codes.transpose(0, 2, 3, 1).reshape(-1, 5)
    assert len(np.unique(flat, axis=0)) == fsq.vocab_size


def test_quantize_matches_decode(fsq):
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(2, 5, 14, 14)).astype(np.float32)
    codes, ids = fsq.quantize(z)
    assert codes.shape == z.shape and codes.dtype == np.float32
    assert ids.shape == (2, 14, 14) and ids.dtype == np.int32
    np.testing.assert_array_equal(fsq.indices_to_codes(ids), codes)
    np.testing.assert_array_equal(fsq.codes_to_indices(codes), ids)


def test_quantize_known_values():
    fsq = FSQ(IMAGE_LEVELS)
    z = np.zeros((1, 5, 1, 3), np.float32)
    z[:, :, 0, 1] = 50.0  # sigmoid -> 1 -> top level everywhere
    z[:, :, 0, 2] = -50.0  # sigmoid -> 0
    codes, ids = fsq.quantize(z)
    # z = 0: sigmoid 0.5 -> 3.5, 3.5, 3.5, 2.5, 2.0 -> half-to-even 4, 4, 4, 2, 2.
    assert ids[0, 0].tolist() == [4 + 4 * 8 + 4 * 64 + 2 * 512 + 2 * 3072, 15359, 0]
    np.testing.assert_array_equal(codes[0, :, 0, 0], np.float32([4 / 7, 4 / 7, 4 / 7, 2 / 5, 2 / 4]))


def test_bad_ids_raise(fsq):
    with pytest.raises(ValueError, match=r"\[0, %d\)" % fsq.vocab_size):
        fsq.indices_to_codes(np.array([[[fsq.vocab_size]]]))
    with pytest.raises(ValueError, match="got values in"):
        fsq.indices_to_codes(np.array([[[-1, 3]]]))
    with pytest.raises(TypeError):
        fsq.indices_to_codes(np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        fsq.indices_to_codes(np.zeros((1, 4), np.int64))


def test_bad_codes_and_latents_raise(fsq):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fsq.codes_to_indices(np.full((1, 5, 1, 1), 1.5, np.float32))
    with pytest.raises(ValueError, match=r"\(B, 5, h, w\)"):
        fsq.quantize(np.zeros((1, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        fsq.quantize(np.full((1, 5, 1, 1), np.nan, np.float32))


def test_bad_levels_raise():
    with pytest.raises(ValueError):
        FSQ([8, 1, 5])
    with pytest.raises(ValueError):
        FSQ([])
