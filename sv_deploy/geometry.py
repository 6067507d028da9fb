"""The geometric self-ensemble: the eight rotations of a volume that keep z as z, each undone exactly.

Four quarter turns about the z axis, each with or without a half turn about the y axis (which
flips z and x together). Only rotations that keep z along z are used (z is usually sampled
differently), and all eight are proper rotations, so half the members see z upside down: errors
the network makes in one z direction (a sub-voxel lean of its z phases, which a x4 chain
compounds) average out, as the quarter turns already average out those in y and x (QUALITY.md,
session 23). For a 2D image (one plane, z factor 1) the z flip does nothing and the members are
the familiar 2D eight (four turns, each with or without an x flip). When the y and x factors differ, a quarter turn
would swap them, so only the 4 members without one are used.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

Transform = Tuple[int, bool]  # (quarter turns in y-x, then a half turn about y: flip z and x)

FLIPPED_AXES = (-3, -1)  # the half turn about y


def ensemble_transforms(factors: Sequence[int], full: bool = True) -> List[Transform]:
    if not full:
        return [(0, False)]
    turns = (0, 1, 2, 3) if factors[-2] == factors[-1] else (0, 2)
    return [(k, flip) for k in turns for flip in (False, True)]


def forward(x: np.ndarray, t: Transform) -> np.ndarray:
    k, flip = t
    x = np.rot90(x, k, axes=(-2, -1))
    return np.flip(x, FLIPPED_AXES) if flip else x


def inverse(x: np.ndarray, t: Transform) -> np.ndarray:
    k, flip = t
    if flip:
        x = np.flip(x, FLIPPED_AXES)
    return np.rot90(x, -k, axes=(-2, -1))
