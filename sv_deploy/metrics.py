"""Image quality scores: PSNR, 3D SSIM, NRMSE, with the minimum-MSE intensity match of CSBDeep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
from scipy.ndimage import gaussian_filter

SSIM_SIGMA = 1.5
K1, K2 = 0.01, 0.03


@dataclass(frozen=True)
class Scores:
    psnr: float
    ssim: float
    nrmse: float


def match_minmse(x: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, float, float]:
    """a*x + b with (a, b) minimising ||a*x + b - ref||^2, so a global gain/offset does not score."""
    x64, r64 = x.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    xc = x64 - x64.mean()
    var = float(np.dot(xc, xc))
    a = float(np.dot(xc, r64 - r64.mean()) / var) if var > 0 else 0.0
    b = float(r64.mean() - a * x64.mean())
    return (a * x.astype(np.float64) + b), a, b


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def nrmse(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    """Root mean squared error divided by the reference's data range."""
    return float(np.sqrt(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2)) / data_range)


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    """Mean SSIM with a Gaussian window (sigma 1.5) in 3D; axes of length 1 are not smoothed.

    The mean takes every voxel, the borders by reflection (as MATLAB's ssim averages its whole
    map): scikit-image leaves 5 voxels out at each face, which on thin stacks of 20-40 planes is a
    third to half of them (README, Results)."""
    x = x.astype(np.float64)
    y = ref.astype(np.float64)
    sigma = [SSIM_SIGMA if n > 1 else 0.0 for n in x.shape]

    def blur(a):
        return gaussian_filter(a, sigma, mode="reflect", truncate=3.5)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def score(x: np.ndarray, ref: np.ndarray, match: bool = True) -> Scores:
    """Scores of x against ref; data range from the reference."""
    data_range = float(ref.max()) - float(ref.min())
    if match:
        x, _, _ = match_minmse(x, ref)
    return Scores(psnr(x, ref, data_range), ssim(x, ref, data_range), nrmse(x, ref, data_range))
