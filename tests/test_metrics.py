import numpy as np

from sv_deploy.evaluate import evaluate, infer_factors
from sv_deploy.metrics import match_minmse, psnr, score, ssim


def test_gain_and_offset_do_not_decide_the_matched_score():
    ref = np.random.default_rng(0).random((6, 20, 20)).astype(np.float32)
    scaled = 4.0 * ref + 3.0
    matched, a, b = match_minmse(scaled, ref)
    assert abs(a - 0.25) < 1e-6 and abs(b + 0.75) < 1e-6
    assert np.abs(matched - ref).max() < 1e-5
    assert score(scaled, ref, match=True).psnr > 100
    assert score(scaled, ref, match=False).psnr < 10


def test_ssim_is_one_for_identity_and_drops_with_noise():
    rng = np.random.default_rng(1)
    ref = rng.random((8, 24, 24))
    assert abs(ssim(ref, ref, 1.0) - 1.0) < 1e-9
    noisy = ref + 0.1 * rng.standard_normal(ref.shape)
    noisier = ref + 0.3 * rng.standard_normal(ref.shape)
    assert 1.0 > ssim(noisy, ref, 1.0) > ssim(noisier, ref, 1.0)


def test_psnr_matches_its_definition():
    ref = np.zeros((4, 4, 4))
    x = ref + 0.1
    assert abs(psnr(x, ref, 1.0) - 20.0) < 1e-9


def test_evaluate_has_the_no_network_baselines(flybrain_pair):
    truth, lr = flybrain_pair
    assert infer_factors(truth.shape, lr.shape) == (2, 2, 2)
    rows = evaluate(truth, truth, lr, bp_iters=3)
    names = [r.name for r in rows]
    assert names[1:] == ["tricubic x2", "tricubic x2 + back-projection (3 it)"]
    assert rows[0].matched.psnr == float("inf")
    # back-projection makes the cubic result consistent with the LR data, which helps here.
    assert rows[2].matched.psnr > rows[1].matched.psnr
