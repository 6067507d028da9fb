import numpy as np
import pytest

from sv_deploy.resize import BAND_BLOCK, downsample, phase_weights, resize, resize_matrix, upsample


@pytest.mark.parametrize("n,scale", [(9, 0.5), (16, 0.25), (10, 2.0), (7, 3.0), (12, 1 / 3)])
def test_rows_sum_to_one_so_constants_stay_constant(n, scale):
    w = resize_matrix(n, scale)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    vol = np.full((n, n, n), 7.5, np.float32)
    np.testing.assert_allclose(resize(vol, (scale,) * 3), 7.5, rtol=1e-6)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_linear_ramp_stays_a_ramp_away_from_borders(factor):
    n = 48
    ramp = np.arange(n, dtype=np.float32)
    down = resize(ramp, [1 / factor])
    # Output sample j sits at input coordinate (j + 0.5) * factor - 0.5 (0-based).
    expected = (np.arange(down.size) + 0.5) * factor - 0.5
    inner = slice(3, -3)
    np.testing.assert_allclose(down[inner], expected[inner], atol=1e-4)
    up = resize(ramp, [float(factor)])
    expected_up = (np.arange(up.size) + 0.5) / factor - 0.5
    np.testing.assert_allclose(up[3 * factor : -3 * factor], expected_up[3 * factor : -3 * factor], atol=1e-4)


def test_smooth_volume_round_trips_closely():
    z, y, x = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing="ij")
    vol = (np.sin(z / 5.0) * np.cos(y / 9.0) + np.sin(x / 11.0)).astype(np.float32)
    back = upsample(downsample(vol, (2, 2, 2)), (2, 2, 2))
    assert back.shape == vol.shape
    inner = (slice(3, -3), slice(6, -6), slice(6, -6))
    assert np.abs(back - vol)[inner].max() < 0.02 * np.ptp(vol)


def test_per_axis_factors_give_per_axis_shapes():
    vol = np.random.default_rng(0).random((5, 20, 30)).astype(np.float32)
    assert downsample(vol, (1, 2, 3)).shape == (5, 10, 10)
    assert upsample(vol, (1, 2, 4)).shape == (5, 40, 120)
    np.testing.assert_array_equal(downsample(vol, (1, 1, 1)), vol)


@pytest.mark.parametrize("scales", [(2.0, 0.5, 3.0), (0.5, 2.0, 0.5), (1.0, 1.0, 2.0)])
def test_resize_is_the_product_of_the_axis_matrices(scales):
    """Each axis takes its own route (first, middle, last); all must equal the plain matrix product,
    for a batch of volumes and for a non-contiguous view."""
    rng = np.random.default_rng(1)
    batch = rng.random((2, 6, 12, 10)).astype(np.float32)
    long = rng.random((1, 2 * BAND_BLOCK + 3, 3 * BAND_BLOCK - 5, 2 * BAND_BLOCK + 7)).astype(np.float32)  # several blocks
    for vol in (batch, batch[:, :, ::-1, :], batch[0], long):
        expected = vol.astype(np.float64)
        for offset, s in enumerate(scales):
            if s != 1:
                axis = vol.ndim - 3 + offset
                w = resize_matrix(vol.shape[axis], s).astype(np.float64)
                expected = np.moveaxis(np.tensordot(w, expected, axes=([1], [axis])), 0, axis)
        got = resize(vol, scales)
        assert got.flags.c_contiguous and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_phase_weights_are_the_interior_rows_of_the_upsampling_matrix():
    for factor in (2, 3, 4):
        w = resize_matrix(20, float(factor))
        phases = phase_weights(factor)
        s = 10  # an interior LR voxel
        for i in range(factor):
            np.testing.assert_allclose(w[s * factor + i, s - 2 : s + 3], phases[i], atol=1e-6)


def test_known_matlab_weights():
    # imresize(x, 2, 'cubic') interior weights.
    np.testing.assert_allclose(phase_weights(2)[0, 1:], [0.2265625, 0.8671875, -0.0703125, 0.0], atol=1e-7)


def test_back_projection_reach_is_bounded_and_grows_with_iterations():
    from sv_deploy.resize import bp_reach, support_radius

    assert bp_reach(1, 10) == 0 and bp_reach(2, 0) == 0
    reaches = [bp_reach(2, k) for k in (1, 2, 5, 10, 20)]
    assert reaches == sorted(reaches)
    assert all(r <= k * support_radius(2) for r, k in zip(reaches, (1, 2, 5, 10, 20)))
    assert bp_reach(2, 10) < 10 * support_radius(2)  # far below the linear bound that made tiles huge


def test_back_projection_beyond_its_reach_changes_nothing_measurable():
    """Data beyond bp_reach of a voxel moves that voxel's back-projected value by < 1e-6 of the range."""
    from sv_deploy.enhance import back_project
    from sv_deploy.resize import bp_reach, upsample

    rng = np.random.default_rng(0)
    lr = rng.random((6, 8, 60)).astype(np.float32)
    y0 = upsample(lr, (1, 1, 2)) + 0.1 * rng.standard_normal((6, 8, 120)).astype(np.float32)
    reach = bp_reach(2, 10)
    cut = 30 + reach + 1  # keep LR x < cut; compare at x = 30 (HR 60..61)
    full = back_project(y0, lr, (1, 1, 2), 10)
    part = back_project(y0[..., : cut * 2], lr[..., :cut], (1, 1, 2), 10)
    assert np.abs(full[..., 60:62] - part[..., 60:62]).max() < 1e-6
    # and the reach is not padding: cutting well inside it does change the result
    near = back_project(y0[..., : 33 * 2], lr[..., :33], (1, 1, 2), 10)
    assert np.abs(full[..., 60:62] - near[..., 60:62]).max() > 1e-4


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 3)])
def test_back_projection_at_lr_size_equals_the_iteration_it_replaces(factors):
    """back_project runs the iterations on LR-size residuals; it must equal y += U(lr - D y), 10 times."""
    from sv_deploy.enhance import back_project
    from sv_deploy.resize import round_trip, upsample

    rng = np.random.default_rng(1)
    lr = rng.random((7, 18, 15)).astype(np.float32)
    y = upsample(lr, factors) + 0.2 * rng.standard_normal(
        tuple(n * f for n, f in zip(lr.shape, factors))).astype(np.float32)
    np.testing.assert_allclose(round_trip(lr, factors), downsample(upsample(lr, factors), factors), atol=2e-6)
    expected = y.copy()
    for _ in range(10):
        expected = expected + upsample(lr - downsample(expected, factors), factors)
    got = back_project(y, lr, factors, 10)
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(lr - downsample(got, factors)).max() < np.abs(lr - downsample(y, factors)).max() / 2


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (4, 4, 4), (2, 1, 1), (1, 1, 3), (1, 1, 1)])
def test_upsample_add_equals_adding_the_upsampled_array(factors, monkeypatch):
    """The in-place add back-projection uses, in chunks smaller than one output plane, gives what
    adding a whole upsampled array gives."""
    import sv_deploy.resize as resize_module

    monkeypatch.setattr(resize_module, "ADD_CHUNK", 64)  # several chunks per band even on a small array
    rng = np.random.default_rng(3)
    x = rng.random((2, 5, 7, 9), dtype=np.float32)
    y = rng.random((2, *(n * f for n, f in zip(x.shape[1:], factors))), dtype=np.float32)
    expected = y + upsample(x, factors)
    got = resize_module.upsample_add(x, factors, y)
    assert got is y
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="C-contiguous"):
        resize_module.upsample_add(x, factors, np.asfortranarray(y))
