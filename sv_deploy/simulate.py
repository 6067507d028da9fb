"""The paper's bead phantom: single-voxel points blurred by a Gaussian PSF, and its LR copy."""

from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy.ndimage import convolve1d

from .config import Factors, Shape3
from .resize import downsample


def gaussian_kernel(sigma: float, window: int) -> np.ndarray:
    half = window // 2
    t = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2) if sigma > 0 else (t == 0).astype(np.float64)
    return k / k.sum()


def beads(
    shape: Shape3 = (60, 512, 512),
    count: int = 125,
    sigma: Tuple[float, float, float] = (2.5, 1.0, 1.0),
    window: int = 13,
    seed: int = 0,
) -> np.ndarray:
    """Float32 volume (z, y, x) normalised to max 1; zero padding at the borders as the authors did."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, dtype=np.float64)
    pos = tuple(rng.integers(0, n, size=count) for n in shape)
    np.add.at(vol, pos, 1.0)
    for axis, s in enumerate(sigma):
        vol = convolve1d(vol, gaussian_kernel(s, window), axis=axis, mode="constant")
    return (vol / vol.max()).astype(np.float32)


def bead_pair(high: np.ndarray, factors: Factors) -> np.ndarray:
    """Low-resolution copy by the degradation model; negatives from cubic ringing clipped to 0."""
    return np.clip(downsample(high, factors), 0.0, None)
