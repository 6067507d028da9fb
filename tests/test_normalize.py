import numpy as np

from sv_deploy.normalize import cast, clip_to_dtype, denormalize, normalize, output_bounds, valid_range


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
    lo, hi = valid_range(np.uint16, 10.0, 30.0, 10.0)
    assert lo == -0.5 and hi == (65535 - 10) / 20


def test_output_bounds_do_not_depend_on_the_storage_type():
    # the same non-negative data stored three ways: never below zero, the type's top as the ceiling
    assert output_bounds(np.uint16, 5.0) == (0.0, 65535.0)
    assert output_bounds(np.int32, 5.0) == (0.0, float(2**31 - 1))
    assert output_bounds(np.float32, 5.0) == (0.0, np.inf)
    # data that goes below zero (background-subtracted) keeps its own floor
    assert output_bounds(np.float32, -3.5) == (-3.5, np.inf)
    assert output_bounds(np.int16, -40000 + 10000) == (-30000.0, 32767.0)
    lo, hi = valid_range(np.float32, 10.0, 30.0, 12.0)
    assert lo == -0.5 and hi == np.inf
