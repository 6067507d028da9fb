"""The fly brain x4 scored the way the issue's figures for the authors' code appear to be scored.

The issue gives the authors' run on the fly brain (56x256x256 crop as truth, x4) as 27.6 dB / SSIM
0.903 over a tricubic 26.9 / 0.864; our table's tricubic reads 26.68 / 0.842. This script makes the
x4 pair with the LR kept in float (not stored in the truth's uint8), scores cubic B-spline
interpolation (scipy's `zoom(order=3)`, what many Python tools call tricubic), our cubic
convolution, each + back-projection, and every `*_out.ome.tif` in the work folder (clamped to the
truth's uint8 range, intensity matched), under two SSIM conventions: ours (`metrics.ssim`,
Gaussian window, every voxel) and scikit-image's `structural_similarity` with its default window
(7 voxels, uniform, sample covariance, 3 voxels left out at each face), both with the data range
taken from the truth as `evaluate` takes it; the latter re-implemented here so the project needs
no scikit-image. Each also truncated to uint8, as the authors' code writes its stage-1 result
(three quarters of this volume is exactly 0, and truncation takes the faint background there to
0 too).

    python benchmarks/authors_baseline.py --data ../shared/data --work /tmp/fly4f     # makes the pair
    sv-deploy train /tmp/fly4f/lr_float.tif -o /tmp/fly4f/fast.svmodel --scale 4 [--recipe paper] [--seed S]
    sv-deploy infer /tmp/fly4f/fast.svmodel /tmp/fly4f/lr_float.tif -o /tmp/fly4f/fast_out.ome.tif
    python benchmarks/authors_baseline.py --data ../shared/data --work /tmp/fly4f     # scores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter

from interp_baselines import bspline  # this script's folder is on sys.path when run as a script
from sv_deploy.enhance import back_project
from sv_deploy.metrics import K1, K2, match_minmse, psnr, ssim
from sv_deploy.resize import downsample, upsample
from sv_deploy.volume_io import read_volume, write_volume

CROP, FACTORS = (56, 256, 256), (4, 4, 4)


def ssim_uniform7(x: np.ndarray, ref: np.ndarray, data_range: float, win: int = 7) -> float:
    """scikit-image's structural_similarity with its default window (uniform, sample covariance, border cut)."""
    x, y = x.astype(np.float64), ref.astype(np.float64)
    n = win**x.ndim
    cov_norm = n / (n - 1)
    mx, my = uniform_filter(x, win), uniform_filter(y, win)
    vx = cov_norm * (uniform_filter(x * x, win) - mx * mx)
    vy = cov_norm * (uniform_filter(y * y, win) - my * my)
    cxy = cov_norm * (uniform_filter(x * y, win) - mx * my)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[tuple(slice(pad, n - pad) for n in s.shape)].mean())


def make_pair(data: Path, work: Path):
    vol = read_volume(data / "real" / "3d_02_flybrain_confocal.tif")
    truth = vol.data[tuple(slice(0, c) for c in CROP)]
    lr = downsample(truth.astype(np.float32), FACTORS).astype(np.float32)
    lr_voxel = tuple(None if v is None else v * f for v, f in zip(vol.voxel_size, FACTORS))
    write_volume(work / "truth.tif", [truth], truth.shape, truth.dtype, vol.axes, vol.voxel_size)
    write_volume(work / "lr_float.tif", [lr], lr.shape, lr.dtype, vol.axes, lr_voxel)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "lr_float.tif").exists():
        make_pair(args.data, args.work)
    truth = read_volume(args.work / "truth.tif").data
    lr = read_volume(args.work / "lr_float.tif").data
    bounds = (0.0, float(np.iinfo(truth.dtype).max))  # the truth's uint8 range, which the authors' code writes
    cands = {}
    for name, up in (("cubic convolution", upsample(lr, FACTORS)), ("cubic B-spline", bspline(lr, FACTORS))):
        cands[name] = up
        cands[name + " + BP"] = back_project(up, lr, FACTORS, 10)
    for out in sorted(args.work.glob("*_out.ome.tif")):
        cands[out.name] = read_volume(out).data
    data_range = float(truth.max()) - float(truth.min())
    print("| candidate | PSNR dB, SSIM (ours), SSIM (scikit-image window, data range from the truth) | the same, written as truncated uint8 |")
    print("|---|---|---|")
    for name, c in cands.items():
        cells = []
        for values in (c.astype(np.float32), np.floor(c.astype(np.float32))):
            matched = match_minmse(np.clip(values, *bounds), truth)[0]
            cells.append(f"{psnr(matched, truth, data_range):.3f}, {ssim(matched, truth, data_range):.4f}, "
                         f"{ssim_uniform7(matched, truth, data_range):.4f}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
