"""The geometric self-ensemble: x-y rotations and a flip, each undone exactly.

Only transforms that keep z as z are used (z is usually sampled differently). When the y and x
factors differ, a 90-degree turn would swap them, so only the 4 axis-preserving members are used.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

Transform = Tuple[int, bool]  # (quarter turns in y-x, flip x afterwards)


def ensemble_transforms(factors: Sequence[int], full: bool = True) -> List[Transform]:
    if not full:
        return [(0, False)]
    turns = (0, 1, 2, 3) if factors[-2] == factors[-1] else (0, 2)
    return [(k, flip) for k in turns for flip in (False, True)]


def forward(x: np.ndarray, t: Transform) -> np.ndarray:
    k, flip = t
    x = np.rot90(x, k, axes=(-2, -1))
    return np.flip(x, -1) if flip else x


def inverse(x: np.ndarray, t: Transform) -> np.ndarray:
    k, flip = t
    if flip:
        x = np.flip(x, -1)
    return np.rot90(x, -k, axes=(-2, -1))
