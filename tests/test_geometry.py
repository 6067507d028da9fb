import numpy as np
import pytest

from sv_deploy.enhance import predict_ensemble
from sv_deploy.geometry import ensemble_transforms, forward, inverse


def test_eight_members_for_square_factors_four_when_y_and_x_differ():
    assert len(ensemble_transforms((2, 2, 2))) == 8
    assert len(set(ensemble_transforms((2, 2, 2)))) == 8
    assert ensemble_transforms((1, 2, 3)) == [(0, False), (0, True), (2, False), (2, True)]
    assert ensemble_transforms((2, 2, 2), full=False) == [(0, False)]


@pytest.mark.parametrize("t", ensemble_transforms((2, 2, 2)))
def test_each_transform_is_undone_exactly(t):
    x = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    y = forward(x, t)
    if t[0] % 2:
        assert y.shape == (3, 7, 5)
    np.testing.assert_array_equal(inverse(y, t), x)


def test_members_are_distinct_views_of_an_asymmetric_volume():
    x = np.random.default_rng(0).random((2, 6, 6)).astype(np.float32)
    views = {forward(x, t).tobytes() for t in ensemble_transforms((2, 2, 2))}
    assert len(views) == 8


def test_on_a_single_plane_the_members_are_the_eight_2d_views():
    """A 2D image's ensemble: the four turns, each with and without an x flip (the z flip is void)."""
    x = np.random.default_rng(1).random((1, 6, 6)).astype(np.float32)
    views = {forward(x, t).tobytes() for t in ensemble_transforms((1, 2, 2))}
    turned = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    assert views == {v.tobytes() for v in turned} | {np.flip(v, 2).tobytes() for v in turned}
    assert len(views) == 8


def test_members_are_rotations_half_of_them_turning_z_over():
    """Proper rotations (no mirror images) that keep z along z: the coordinates of a marked voxel
    move as a rotation matrix with determinant +1 would move them."""
    shape = (3, 5, 5)
    turned_over = 0
    for t in ensemble_transforms((2, 2, 2)):
        moved = []
        for p in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
            x = np.zeros(shape, np.float32)
            x[1 + p[0], 2 + p[1], 2 + p[2]] = 1  # a unit step from the centre (1, 2, 2)
            z, y, xx = np.argwhere(forward(x, t))[0]
            moved.append((z - 1, y - 2, xx - 2))
        m = np.array(moved).T  # columns: where the z, y and x steps went, in (z, y, x)
        assert round(np.linalg.det(m)) == 1
        assert abs(m[0, 0]) == 1  # z stays along z
        turned_over += m[0, 0] == -1
    assert turned_over == 4


class ZLeaningUpsampler:
    """An upsampler whose output leans one voxel towards +z (wrapping round): the error the
    ensemble's z-turned members cancel."""

    name = "leaning"

    def predict(self, stage, x):
        for axis in (2, 3, 4):
            x = np.repeat(x, 2, axis=axis)
        return np.roll(x, 1, axis=2)


def test_ensemble_cancels_a_lean_in_z():
    x = np.random.default_rng(3).random((4, 6, 6)).astype(np.float32)
    up = x.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    averaged = predict_ensemble(ZLeaningUpsampler(), 0, x, ensemble_transforms((2, 2, 2)))
    np.testing.assert_allclose(averaged, (np.roll(up, 1, 0) + np.roll(up, -1, 0)) / 2, atol=1e-6)


class NearestUpsampler:
    """An equivariant 'network': with a correct ensemble every member agrees exactly."""

    name = "nearest"

    def __init__(self, factors):
        self.factors = factors

    def predict(self, stage, x):
        for axis, f in zip((2, 3, 4), self.factors):
            x = np.repeat(x, f, axis=axis)
        return x


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 3)])
def test_ensemble_of_equivariant_net_equals_single_pass(factors):
    x = np.random.default_rng(2).random((3, 6, 8)).astype(np.float32)
    net = NearestUpsampler(factors)
    single = net.predict(0, x[None, None])[0, 0]
    averaged = predict_ensemble(net, 0, x, ensemble_transforms(factors))
    np.testing.assert_allclose(averaged, single, atol=1e-6)
