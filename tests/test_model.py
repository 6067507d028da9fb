import numpy as np
import pytest
import torch

from sv_deploy.config import ArchConfig
from sv_deploy.model import SVStage, count_parameters, pixel_shuffle_3d
from sv_deploy.resize import upsample

from reference import shuffle_reference


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 3), (3, 2, 1), (1, 4, 4)])
@pytest.mark.parametrize("channels_out", [1, 2])
def test_pixel_shuffle_matches_numpy_reference(factors, channels_out):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, channels_out * int(np.prod(factors)), 3, 4, 5)).astype(np.float32)
    got = pixel_shuffle_3d(torch.from_numpy(x), factors).numpy()
    np.testing.assert_array_equal(got, shuffle_reference(x, factors))


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (1, 3, 3)])
def test_untrained_stage_is_cubic_interpolation_inside(factors):
    stage = SVStage(factors)
    torch.nn.init.zeros_(stage.expand.weight)
    x = np.random.default_rng(0).random((6, 12, 12)).astype(np.float32)
    got = stage(torch.from_numpy(x)[None, None])[0, 0].detach().numpy()
    ref = upsample(x, factors)
    f = factors
    inner = tuple(slice(2 * fa, -2 * fa) if fa > 1 else slice(None) for fa in f)
    np.testing.assert_allclose(got[inner], ref[inner], atol=1e-5)


def test_parameter_count_in_papers_range():
    full = count_parameters(SVStage((2, 2, 2)))
    assert 8_000 <= full <= 22_000
    assert count_parameters(SVStage((2, 2, 2), ArchConfig(groups=2))) < full


def test_two_d_input_keeps_depth_one():
    stage = SVStage((1, 2, 2))
    y = stage(torch.rand(1, 1, 1, 10, 12))
    assert tuple(y.shape) == (1, 1, 1, 20, 24)
