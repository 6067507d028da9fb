import dataclasses

import numpy as np
import pytest
import torch

from sv_deploy.backends import TorchBackend
from sv_deploy.config import ArchConfig, TrainConfig
from sv_deploy.enhance import InferenceOptions, back_project, enhance_volume
from sv_deploy.errors import UserError
from sv_deploy.metrics import score
from sv_deploy.model import SVStage
from sv_deploy.normalize import normalize
from sv_deploy.resize import upsample
from sv_deploy.train import _average_into, fit_patch, holdout_split, sample_patches, train_stage, training_loss


def test_short_real_training_lowers_the_loss_and_beats_tricubic(trained_small, flybrain_pair):
    stage, report, x, (lo, hi) = trained_small
    truth, lr = flybrain_pair
    assert report.best_val_loss < report.interp_val_loss
    assert report.gain_db > 0.2 and not report.is_dead()
    assert 0 < report.bp_gain_db < report.gain_db  # back-projection recovers part of the gain on its own
    backend = TorchBackend([stage], torch.device("cpu"))
    net_only = enhance_volume(backend, [(2, 2, 2)], ArchConfig(), x, InferenceOptions(ensemble=False, bp_iters=0))
    full = enhance_volume(backend, [(2, 2, 2)], ArchConfig(), x, InferenceOptions())
    ref = normalize(truth, lo, hi)
    cubic = upsample(x, (2, 2, 2))
    cubic_bp = back_project(cubic, x, (2, 2, 2), 10)
    assert score(net_only, ref).psnr > score(cubic, ref).psnr + 0.1
    assert score(full, ref).psnr > score(cubic_bp, ref).psnr


def test_same_seed_repeats_exactly_on_cpu(flybrain_pair):
    _, lr = flybrain_pair
    x = normalize(lr, float(lr.min()), float(lr.max()))
    cfg = TrainConfig(steps=4, batch=2, patch=(8, 32, 32), val_every=2, val_patches=4)
    runs = [train_stage(x, (2, 2, 2), ArchConfig(), cfg, torch.device("cpu"), progress=False) for _ in range(2)]
    for a, b in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b)
    assert runs[0][1].final_train_loss == runs[1][1].final_train_loss


def test_patch_is_fitted_to_small_volumes_and_refused_when_too_small():
    assert fit_patch((5, 128, 128), (16, 48, 48), (2, 2, 2)) == (4, 48, 48)
    assert fit_patch((1, 64, 64), (1, 48, 48), (1, 2, 2)) == (1, 48, 48)
    with pytest.raises(UserError, match="smaller than one training patch"):
        fit_patch((3, 64, 64), (16, 48, 48), (2, 2, 2))
    with pytest.raises(UserError, match="smaller than one training patch"):
        fit_patch((8, 10, 64), (16, 48, 48), (2, 2, 2))


def test_augmented_patches_are_crops_of_the_volume_up_to_flips_and_turns():
    vol = np.random.default_rng(0).random((6, 20, 20)).astype(np.float32)
    patches = sample_patches(vol, (4, 8, 8), 5, np.random.default_rng(1))
    assert patches.shape == (5, 4, 8, 8)
    values = set(np.round(vol.ravel(), 6))
    assert set(np.round(patches.ravel(), 6)) <= values


def test_patches_are_not_turned_where_y_and_x_are_scaled_differently():
    """A volume that varies along x only: turned patches would put that variation on y."""
    vol = np.broadcast_to(np.arange(40, dtype=np.float32), (6, 40, 40)).copy()
    turned = sample_patches(vol, (4, 16, 16), 200, np.random.default_rng(2))
    kept = sample_patches(vol, (4, 16, 16), 200, np.random.default_rng(2), turns=False)
    along_y = lambda p: np.abs(np.diff(p, axis=3)).sum(axis=(1, 2, 3)) == 0  # noqa: E731 - constant along x
    assert 0.3 < along_y(turned).mean() < 0.7 and not along_y(kept).any()


def test_validation_strip_is_disjoint_from_training_and_skipped_when_too_small():
    train, val = holdout_split((20, 128, 96), (16, 48, 48), (2, 2, 2))
    assert train[1] == slice(0, 102) and val[1] == slice(102, 128)
    assert train[2] == val[2] == slice(None)
    whole = (slice(None),) * 3
    assert holdout_split((20, 24, 24), (16, 48, 48), (2, 2, 2)) == (whole, whole)


def test_a_stage_that_learns_nothing_is_exactly_interpolation(flybrain_pair):
    _, lr = flybrain_pair
    x = normalize(lr, float(lr.min()), float(lr.max()))
    cfg = TrainConfig(steps=2, batch=2, patch=(8, 32, 32), lr=1e-9, val_every=1, val_patches=4)
    stage, report = train_stage(x, (2, 2, 2), ArchConfig(), cfg, torch.device("cpu"), progress=False)
    # the measured gain is reported as it was (about zero here), and the stage is interpolation
    assert report.is_dead() and abs(report.gain_db) < 0.01
    assert report.bp_gain_db == 0.0  # the stage is interpolation, so it equals interpolation + back-projection
    block = torch.from_numpy(x[None, None, :6, :20, :20].copy())
    with torch.no_grad():
        assert torch.equal(stage(block), stage.interpolate(block))
    # so inference may skip the network: the same result through ensemble, tiles and back-projection
    calls = []

    class Spy(TorchBackend):
        def predict(self, i, batch):
            calls.append(batch.shape)
            return super().predict(i, batch)

    volume = x[:12, :40, :40]
    small = InferenceOptions(tile=(6, 16, 16))
    with_net = enhance_volume(Spy([stage], torch.device("cpu")), [(2, 2, 2)], ArchConfig(), volume, small)
    assert calls
    calls.clear()
    skipped = dataclasses.replace(small, interpolate=(0,))
    without = enhance_volume(Spy([stage], torch.device("cpu")), [(2, 2, 2)], ArchConfig(), volume, skipped)
    assert not calls
    np.testing.assert_allclose(without, with_net, atol=1e-5)


@pytest.mark.parametrize("weight, best", [(0.0, 0.1), (0.1, 0.06), (0.5, 0.0)])
def test_absolute_error_term_pulls_a_sparse_target_toward_its_background(weight, best):
    """The constant best fitting 90 % zeros and 10 % ones: their mean under squared error alone,
    0.1 - 0.4 w with the term (the derivative 2 (c - 0.1) + w (0.9 - 0.1) is zero there), and the
    background itself once w reaches 0.25."""
    from scipy.optimize import minimize_scalar

    target = torch.zeros(1, 1, 2, 5, 10)
    target.view(-1)[::10] = 1.0
    got = minimize_scalar(lambda c: float(training_loss(torch.full_like(target, c), target, weight)),
                          bounds=(-1.0, 2.0), method="bounded", options={"xatol": 1e-7})
    assert got.x == pytest.approx(best, abs=1e-5)


def test_weight_average_update():
    torch.manual_seed(0)
    a, b = (SVStage((1, 2, 2), ArchConfig()) for _ in range(2))
    before = [p.detach().clone() for p in a.parameters()]
    _average_into(a, b, 0.9)
    for x, old, new in zip(a.parameters(), before, b.parameters()):
        assert torch.allclose(x, 0.9 * old + 0.1 * new, atol=1e-7)
    _average_into(a, b, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_averaged_networks_train_apart_and_the_first_is_the_single_run(flybrain_pair):
    _, lr = flybrain_pair
    x = normalize(lr, float(lr.min()), float(lr.max()))
    cfg = TrainConfig(steps=4, batch=2, patch=(8, 32, 32), val_every=2, val_patches=4)
    single, _ = train_stage(x, (2, 2, 2), ArchConfig(), cfg, torch.device("cpu"), progress=False)
    merged, report = train_stage(x, (2, 2, 2), ArchConfig(members=2), cfg, torch.device("cpu"), progress=False)
    assert merged.arch.members == 2 and len(report.member_gains_db) == 2
    features = ArchConfig().features
    first, second = merged.extract[0].weight[:features], merged.extract[0].weight[features:]
    assert torch.equal(first, single.extract[0].weight)  # member 0 keeps the run's seed and patches
    assert not torch.allclose(first, second)  # the other starts from its own seed


def test_too_few_slices_for_z_names_the_lateral_only_scale():
    import pytest

    from sv_deploy.errors import UserError

    with pytest.raises(UserError, match="--scale 1,2,2"):
        fit_patch((3, 128, 128), (16, 48, 48), (2, 2, 2))
    assert fit_patch((3, 128, 128), (16, 48, 48), (1, 2, 2)) == (3, 48, 48)


def test_only_dead_stages_of_mirroring_models_skip_the_network():
    from sv_deploy.config import ModelConfig, Provenance, StageReport

    def report(gain):
        return StageReport((2, 2, 2), 10, 5, 1e-3, 1e-3, 1e-3, gain, 1.0)

    prov = Provenance("v.tif", "0" * 64, (8, 8, 8), "uint16", (report(0.01), report(0.3)), 2.0, "cpu", "now", ())
    config = ModelConfig(stages=((2, 2, 2), (2, 2, 2)), provenance=prov)
    assert config.interpolation_stages() == (0,)
    older = dataclasses.replace(config, arch=ArchConfig(interp_border="replicate"))
    assert older.interpolation_stages() == ()
    assert ModelConfig.from_json(config.to_json()).interpolation_stages() == (0,)


def test_a_stage_is_dead_when_it_adds_nothing_over_interpolation_or_over_back_projection():
    from sv_deploy.config import DEAD_GAIN_DB, StageReport

    def report(gain, bp_gain):
        return StageReport((2, 2, 2), 10, 10, 1.0, 1.0, 1.0, gain, 1.0, bp_gain_db=bp_gain)

    assert report(DEAD_GAIN_DB / 2, 0.0).is_dead()
    assert report(0.3, DEAD_GAIN_DB / 2).is_dead()  # what it learned, back-projection recovers alone
    assert report(0.3, -0.1).is_dead()
    assert not report(0.3, 0.2).is_dead()
    assert not report(0.3, None).is_dead()  # a file written before the back-projection gain existed


def test_only_the_last_stage_of_a_chain_is_checked_against_back_projection(flybrain_pair):
    """Inference back-projects the chain's output only: an earlier stage must beat interpolation,
    and a back-projection it never gets is no reason to discard it."""
    from sv_deploy.train import train_stages

    _, lr = flybrain_pair
    x = normalize(lr, float(lr.min()), float(lr.max()))
    cfg = dataclasses.replace(TrainConfig(seed=0), steps=2, batch=2, patch=(8, 32, 32))
    logs = []
    _, reports = train_stages(x[:8, :48, :48], ((2, 2, 2), (2, 2, 2)), ArchConfig(mid_layers=0), cfg,
                              torch.device("cpu"), progress=False, log=logs.append)
    assert reports[0].bp_gain_db is None and reports[1].bp_gain_db is not None
    assert any(m.startswith("stage 1/2") and "not back-projected itself" in m for m in logs)
