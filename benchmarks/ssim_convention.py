"""SSIM as sv-deploy averages it (every voxel) against the same map without 5 voxels at each face
(scikit-image's structural_similarity with an 11-voxel window), for tricubic and tricubic +
back-projection of x2 copies of the real volumes in shared/data (the whole volume as truth).

    python benchmarks/ssim_convention.py --data ../shared/data
"""

import argparse

import numpy as np
from scipy.ndimage import gaussian_filter

from sv_deploy.enhance import back_project
from sv_deploy.metrics import K1, K2, SSIM_SIGMA, match_minmse, ssim
from sv_deploy.resize import downsample, upsample
from sv_deploy.volume_io import read_volume

VOLUMES = ("3d_01_cells3d_nuclei_confocal", "3d_02_flybrain_confocal", "3d_08_PAIRED_nucleus_confocal_widefield",
           "3d_10_chromosomes_neubias")


def ssim_map(x, y, data_range):
    sigma = [SSIM_SIGMA if n > 1 else 0.0 for n in x.shape]

    def blur(a):
        return gaussian_filter(a, sigma, mode="reflect", truncate=3.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def both(candidate, truth):
    matched = match_minmse(candidate, truth)[0].astype(np.float64)
    data_range = float(truth.max() - truth.min())
    full = ssim_map(matched, truth.astype(np.float64), data_range)
    inner = tuple(slice(5, n - 5) if n > 10 else slice(None) for n in full.shape)
    return ssim(matched, truth, data_range), float(full[inner].mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the shared data folder (holds real/)")
    args = parser.parse_args()
    for name in VOLUMES:
        path = f"{args.data}/real/{name}.tif"
        try:
            truth = read_volume(path).data.astype(np.float32)
        except Exception:  # noqa: BLE001 - the paired file holds two channels: the first is the confocal
            truth = read_volume(path, channel=0).data.astype(np.float32)
        truth = truth[tuple(slice(0, n // 2 * 2) for n in truth.shape)]
        lr = downsample(truth, (2, 2, 2))
        up = upsample(lr, (2, 2, 2))
        bp = back_project(up, lr, (2, 2, 2), 10)
        print(f"{name} x2 {truth.shape}: tricubic {'%.4f / %.4f' % both(up, truth)}, "
              f"+ BP {'%.4f / %.4f' % both(bp, truth)}  (ours / without the border)", flush=True)


if __name__ == "__main__":
    main()
