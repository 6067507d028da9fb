import numpy as np
import pytest

from sv_deploy.config import NormConfig
from sv_deploy.errors import UserError
from sv_deploy.normalize import (MAX_SAMPLES, cast, clip_to_dtype, denormalize, normalize, output_bounds, percentiles,
                                 valid_range)


def test_cast_rounds_and_clamps_integers_instead_of_wrapping():
    x = np.array([-3.6, 2.4, 2.6, 300.0], np.float32)
    np.testing.assert_array_equal(cast(x, np.uint8), [0, 2, 3, 255])
    np.testing.assert_array_equal(cast(x, np.float32), x)
    np.testing.assert_array_equal(clip_to_dtype(x, np.uint8), np.array([0.0, 2.4, 2.6, 255.0], np.float32))


@pytest.mark.parametrize("dtype", [np.int32, np.uint32])
def test_32_bit_integers_clamp_at_their_top_without_wrapping(dtype):
    """float32 rounds 2**31 - 1 (2**32 - 1) up past the type: a clamp there wrapped to the bottom."""
    top = np.iinfo(dtype).max
    x = np.array([top * 0.999, top, top * 1.01], np.float32)
    for y in (cast(x, dtype), cast(x.copy(), dtype, inplace=True), denormalize(x / top, 0.0, float(top), dtype)):
        assert y.dtype == dtype and (y > top // 2).all() and (top - y.astype(np.int64) < 0.002 * top).all(), y


def test_percentiles_of_a_sparse_volume_see_the_voxels_a_subsample_misses():
    vol = np.zeros(MAX_SAMPLES * 2 + 3, np.uint16)
    vol[1::MAX_SAMPLES] = 1000  # off the stride the subsample takes
    low, high = percentiles(vol.reshape(1, 1, -1), NormConfig())
    assert (low, high) == (0.0, 1000.0)
    bright = np.full((2, 50, 50), 700, np.uint16)
    bright[0, 0, :3] = 5  # almost all one value: both percentiles sit on it
    assert percentiles(bright, NormConfig()) == (5.0, 700.0)
    with pytest.raises(UserError, match="constant"):
        percentiles(np.full((2, 4, 4), 9, np.uint8), NormConfig())


def test_normalize_round_trip_and_valid_range():
    vol = np.array([[[10, 20, 30]]], np.uint16)
    x = normalize(vol, 10.0, 30.0)
    np.testing.assert_allclose(x.ravel(), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(denormalize(x, 10.0, 30.0, np.uint16), vol)
    lo, hi = valid_range(np.uint16, 10.0, 30.0, 10.0)
    assert lo == -0.5 and hi == (65535 - 10) / 20


def test_a_float_output_clamped_at_zero_stays_at_or_above_it():
    """Clamped to zero in normalized units, a value came back up to a rounding error below it."""
    below = 0
    for low in np.linspace(0.5, 40, 50):
        x = np.full(4, valid_range(np.float32, float(low), 300.0, 0.0)[0], np.float32)
        below += int((denormalize(x, float(low), 300.0, np.float32) < 0).any())
        y = denormalize(x, float(low), 300.0, np.float32, floor=output_bounds(np.float32, 0.0)[0])
        assert y.min() >= 0 and y.max() < 1e-4
    assert below > 0  # the case the floor is for does occur


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
