"""No-network baselines beside the network's output: our cubic convolution (the degradation model's
kernel, the issue's "tricubic") and cubic B-spline interpolation (scipy's `zoom(order=3)`, pixel
centres aligned as the degradation model aligns them), each alone and + back-projection.

Reads what `quality.py` left in its work folder (LR, truth and output of each case); writes nothing.

    python benchmarks/quality.py --data ../shared/data --work /tmp/svq --tag cpu2
    python benchmarks/interp_baselines.py --data ../shared/data --work /tmp/svq
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.ndimage import zoom

from sv_deploy.enhance import back_project
from sv_deploy.metrics import score
from sv_deploy.normalize import output_bounds
from sv_deploy.resize import upsample
from sv_deploy.volume_io import read_volume

# case -> (LR, truth) as quality.py names them in its work folder (beads: the authors' pair)
CASES = {
    "beads_x4": ("svision-beads/low_density_lr_3d.tif", "svision-beads/low_density_3d.tif"),
    "3d_01_cells3d_x2": ("3d_01_lr.tif", "3d_01_truth.tif"),
    "3d_02_flybrain_x2": ("3d_02_lr.tif", "3d_02_truth.tif"),
    "3d_08_nucleus_conf_x2": ("3d_08_lr.tif", "3d_08_truth.tif"),
    "3d_10_chromosomes_x2": ("3d_10_lr.tif", "3d_10_truth.tif"),
    "3d_02_flybrain_x4": ("3d_02x4_lr.tif", "3d_02x4_truth.tif"),
}


def bspline(lr: np.ndarray, factors) -> np.ndarray:
    return zoom(lr, factors, order=3, mode="reflect", grid_mode=True).astype(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="the --work folder of a quality.py run")
    p.add_argument("--bp-iters", type=int, default=10)
    args = p.parse_args()
    print("| case | ours | cubic | cubic + BP | B-spline | B-spline + BP | ours - (B-spline + BP) |")
    print("|---|---|---|---|---|---|---|")
    for name, (low, high) in CASES.items():
        out = args.work / f"{name}_out.ome.tif"
        if not out.exists():
            continue
        folder = args.data if low.startswith("svision") else args.work
        lr_vol = read_volume(folder / low).data
        truth = read_volume(folder / high).data.astype(np.float32)
        lr = lr_vol.astype(np.float32)
        factors = tuple(t // n for t, n in zip(truth.shape, lr.shape))
        bounds = output_bounds(lr_vol.dtype, float(lr_vol.min()))  # clamped as `evaluate` clamps them
        scores = [score(read_volume(out).data.astype(np.float32), truth)]
        for up in (upsample(lr, factors), bspline(lr, factors)):
            scores.append(score(np.clip(up, *bounds), truth))
            scores.append(score(np.clip(back_project(up, lr, factors, args.bp_iters), *bounds), truth))
        cells = " | ".join(f"{s.psnr:.3f} / {s.ssim:.4f}" for s in scores)
        print(f"| {name} | {cells} | {scores[0].psnr - scores[4].psnr:+.3f} dB |", flush=True)


if __name__ == "__main__":
    main()
