import numpy as np
import pytest

from sv_deploy.errors import UserError
from sv_deploy.factors import parse_scale, split_stages
from sv_deploy.simulate import bead_pair, beads


def test_scale_parsing():
    assert parse_scale("2") == (2, 2, 2)
    assert parse_scale("4", is_2d=True) == (1, 4, 4)
    assert parse_scale("1,2,2") == (1, 2, 2)
    assert parse_scale("x2") == (2, 2, 2) and parse_scale("x1x2x2") == parse_scale("1x2x2") == (1, 2, 2)
    for bad in ("5", "2,2", "x", "1", "2,", ",2,2,2"):
        with pytest.raises(UserError):
            parse_scale(bad)
    with pytest.raises(UserError, match="2D"):
        parse_scale("2,2,2", is_2d=True)


def test_x4_is_two_x2_stages():
    assert split_stages((4, 4, 4)) == ((2, 2, 2), (2, 2, 2))
    assert split_stages((1, 4, 2)) == ((1, 2, 2), (1, 2, 1))
    assert split_stages((3, 3, 3)) == ((3, 3, 3),)


def test_beads_are_blurred_points_normalised_to_one():
    hr = beads((20, 64, 64), count=10, sigma=(2.5, 1, 1), window=13, seed=3)
    assert hr.max() == pytest.approx(1.0) and hr.min() >= 0
    lr = bead_pair(hr, (4, 4, 4))
    assert lr.shape == (5, 16, 16) and lr.min() >= 0
    # a bead's profile along x follows the Gaussian: neighbour/peak = exp(-1/2) for sigma 1
    z, y, x = np.unravel_index(np.argmax(hr), hr.shape)
    if 0 < x < 63:
        assert hr[z, y, x + 1] / hr[z, y, x] == pytest.approx(np.exp(-0.5), rel=0.15)


def test_simulate_writes_the_low_resolution_file_with_coarser_voxels(tmp_path):
    from click.testing import CliRunner

    from sv_deploy.cli import main
    from sv_deploy.volume_io import read_volume

    result = CliRunner().invoke(main, ["simulate", "beads", str(tmp_path), "--shape", "8,32,32", "--scale", "1,2,2",
                                       "--beads", "10", "--voxel-size", "0.4,0.1,0.1"])
    assert result.exit_code == 0, result.output
    hr, lr = read_volume(tmp_path / "beads_hr.tif"), read_volume(tmp_path / "beads_lr.tif")
    assert hr.voxel_size == pytest.approx((0.4, 0.1, 0.1))
    assert lr.data.shape == (8, 16, 16) and lr.voxel_size == pytest.approx((0.4, 0.2, 0.2))
    # an even PSF window cannot be centred on a voxel: refused in one line, nothing written
    even = CliRunner().invoke(main, ["simulate", "beads", str(tmp_path / "even"), "--window", "12"])
    assert even.exit_code != 0 and "--window 12 must be odd" in even.stderr and "Traceback" not in even.output
    assert not (tmp_path / "even").exists()


def test_simulate_writes_both_volumes_or_neither(tmp_path, monkeypatch):
    from sv_deploy import demo

    calls = []

    def second_fails(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, *args)

    real = demo.write_volume
    monkeypatch.setattr(demo, "write_volume", second_fails)
    with pytest.raises(OSError):
        demo.write_beads(tmp_path, (8, 32, 32), 10, (1.0, 1.0, 1.0), 7, "2", (0.4, 0.1, 0.1), 0, False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
