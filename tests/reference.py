"""NumPy references the fast paths are tested against."""

import itertools

import numpy as np


def shuffle_reference(x: np.ndarray, factors) -> np.ndarray:
    """Loop form of the 3D sub-pixel convolution output: channel (i*ry + j)*rx + k -> offset (i, j, k)."""
    rz, ry, rx = factors
    n, c, d, h, w = x.shape
    oc = c // (rz * ry * rx)
    out = np.zeros((n, oc, d * rz, h * ry, w * rx), x.dtype)
    for o in range(oc):
        for i, j, k in itertools.product(range(rz), range(ry), range(rx)):
            ch = o * rz * ry * rx + (i * ry + j) * rx + k
            out[:, o, i::rz, j::ry, k::rx] = x[:, ch]
    return out
