import numpy as np

from sv_deploy.normalize import cast, clip_to_dtype, denormalize, normalize, valid_range


def test_cast_rounds_and_clamps_integers_instead_of_wrapping():
    x = np.array([-3.6, 2.4, 2.6, 300.0], np.float32)
    np.testing.assert_array_equal(cast(x, np.uint8), [0, 2, 3, 255])
    np.testing.assert_array_equal(cast(x, np.float32), x)
    np.testing.assert_array_equal(clip_to_dtype(x, np.uint8), np.array([0.0, 2.4, 2.6, 255.0], np.float32))


def test_normalize_round_trip_and_valid_range():
    vol = np.array([[[10, 20, 30]]], np.uint16)
    x = normalize(vol, 10.0, 30.0)
    np.testing.assert_allclose(x.ravel(), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(denormalize(x, 10.0, 30.0, np.uint16), vol)
    lo, hi = valid_range(np.uint16, 10.0, 30.0)
    assert lo == -0.5 and hi == (65535 - 10) / 20
    assert valid_range(np.float32, 10.0, 30.0) is None
