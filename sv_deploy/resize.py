"""MATLAB-style cubic resize with antialiasing, one axis at a time.

This is the degradation model (how training pairs are made) and the kernel pair of the
back-projection. Each axis is a dense (out x in) matrix built once per length and factor, so the
same weights serve training patches, tiles and whole volumes, and tests can inspect them.
"""

from __future__ import annotations


from functools import lru_cache
from math import ceil
from typing import Sequence

import numpy as np

KERNEL_WIDTH = 4.0  # Keys cubic support, in input samples at scale 1


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's imresize 'cubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (
        -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    ) * ((ax > 1) & (ax <= 2))


def output_length(in_length: int, scale: float) -> int:
    return int(ceil(in_length * scale - 1e-9))


@lru_cache(maxsize=256)
def resize_matrix(in_length: int, scale: float, antialias: bool = True) -> np.ndarray:
    """Weights W (out x in) so that out = W @ in along one axis; symmetric boundary.

    Follows imresize's `contributions`: output sample x (1-based) sits at input coordinate
    u = x/scale + 0.5*(1 - 1/scale); when shrinking with antialiasing the kernel is widened by
    1/scale. Indices outside [1, in_length] mirror back (half-sample symmetric).
    """
    out_length = output_length(in_length, scale)
    width = KERNEL_WIDTH
    if scale < 1 and antialias:
        def kernel(t):
            return scale * cubic(scale * t)
        width = width / scale
    else:
        kernel = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(ceil(width)) + 2
    ind = left[:, None] + np.arange(taps)[None, :]
    weights = kernel(u[:, None] - ind)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    cols = mirror[np.mod(ind.astype(np.int64) - 1, 2 * in_length)]
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.repeat(np.arange(out_length), taps)
    np.add.at(matrix, (rows, cols.ravel()), weights.ravel())
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def resize(x: np.ndarray, scales: Sequence[float], antialias: bool = True) -> np.ndarray:
    """Resize the last len(scales) axes of x by the given per-axis scales (1 = untouched)."""
    return _per_axis(x, [None if s == 1 else (resize_matrix, (float(s), antialias)) for s in scales])


@lru_cache(maxsize=256)
def round_trip_matrix(length: int, factor: int) -> np.ndarray:
    """D @ U along one axis: cubic upsampling by `factor`, then the antialiased shrink back (length x length)."""
    up = resize_matrix(length, float(factor)).astype(np.float64)
    down = resize_matrix(up.shape[0], 1.0 / factor).astype(np.float64)
    matrix = (down @ up).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def round_trip(x: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """downsample(upsample(x)) computed at x's own size: the operators are separable per axis, so the
    product of the two per-axis matrices replaces a pass over the (larger) upsampled volume."""
    return _per_axis(x, [None if f == 1 else (round_trip_matrix, (int(f),)) for f in factors])


def _per_axis(x: np.ndarray, ops) -> np.ndarray:
    """Apply one matrix per trailing axis; `ops[i]` is None (skip) or (make_matrix, extra args)."""
    x = np.asarray(x, dtype=np.float32)
    first = x.ndim - len(ops)
    for offset, op in enumerate(ops):
        if op is None:
            continue
        axis = first + offset
        make, args = op
        x = _apply_banded(_bands(make, x.shape[axis], *args), x, axis)
    return np.ascontiguousarray(x)


BAND_BLOCK = 32  # output samples per product: 2-9x faster than the whole matrix on 2 cores (BENCH.md, session 8)


@lru_cache(maxsize=256)
def _bands(make, length: int, *args):
    """The matrix cut into blocks of BAND_BLOCK output rows, each with only the input columns it
    touches: (rows j0:j1, columns c0:c1, that sub-matrix). Cubic weights span a few samples, so the
    products cost O(taps) per sample instead of O(length), and stay BLAS products."""
    w = make(length, *args)
    bands = []
    for j0 in range(0, w.shape[0], BAND_BLOCK):
        j1 = min(j0 + BAND_BLOCK, w.shape[0])
        used = np.nonzero(np.any(w[j0:j1] != 0, axis=0))[0]
        c0, c1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)  # no columns: the product is 0
        bands.append((j0, j1, c0, c1, np.ascontiguousarray(w[j0:j1, c0:c1])))
    return w.shape[0], tuple(bands)


def _apply_banded(bands, x: np.ndarray, axis: int) -> np.ndarray:
    """`w` along `axis`, block by block, each block's product written in place (no moved axes)."""
    out_length, blocks = bands
    before, after = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis + 1 :]))
    src = np.ascontiguousarray(x).reshape(before, x.shape[axis], after)
    out = np.empty((before, out_length, after), dtype=np.float32)
    for j0, j1, c0, c1, w in blocks:
        if after == 1:  # last axis: rows @ w.T, one product over all rows
            np.matmul(src[:, c0:c1, 0], w.T, out=out[:, j0:j1, 0])
        else:
            np.matmul(w, src[:, c0:c1, :], out=out[:, j0:j1, :])
    return out.reshape(*x.shape[:axis], out_length, *x.shape[axis + 1 :])


ADD_CHUNK = 1 << 20  # floats in one temporary product of `upsample_add`


def upsample_add(x: np.ndarray, factors: Sequence[int], out: np.ndarray) -> np.ndarray:
    """out += upsample(x, factors), without a temporary of out's size: the axes before the last one
    scaled are upsampled first (an array 1/f_last of out's size), then the last one in products of
    at most `ADD_CHUNK` floats, each added into `out`. Back-projection adds its correction to an
    estimate 8-64x larger than the input this way; a full-size correction was the largest array of
    a tile (`memory.stage_bytes`)."""
    if not out.flags.c_contiguous:
        raise ValueError("upsample_add adds into a C-contiguous array only")
    ops = [None if f == 1 else (resize_matrix, (float(f), True)) for f in factors]
    scaled = [i for i, op in enumerate(ops) if op is not None]
    if not scaled:
        out += x
        return out
    last = scaled[-1]
    src = _per_axis(x, [op if i != last else None for i, op in enumerate(ops)])
    first = x.ndim - len(ops)
    axis = first + last
    out_length, blocks = _bands(resize_matrix, x.shape[axis], *ops[last][1])
    before, after = int(np.prod(src.shape[:axis])), int(np.prod(src.shape[axis + 1 :]))
    src = src.reshape(before, src.shape[axis], after)
    dst = out.reshape(before, out_length, after)  # a view, since out is C-contiguous
    step = max(1, ADD_CHUNK // BAND_BLOCK)
    if after == 1:
        for b0 in range(0, before, step):
            for j0, j1, c0, c1, w in blocks:
                dst[b0 : b0 + step, j0:j1, 0] += src[b0 : b0 + step, c0:c1, 0] @ w.T
    else:
        for b in range(before):
            for a0 in range(0, after, step):
                for j0, j1, c0, c1, w in blocks:
                    dst[b, j0:j1, a0 : a0 + step] += w @ src[b, c0:c1, a0 : a0 + step]
    return out


def downsample(x: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """The degradation model: antialiased cubic shrink by integer factors per axis."""
    return resize(x, [1.0 / f for f in factors])


def upsample(x: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Cubic interpolation by integer factors per axis (the 'tricubic' baseline)."""
    return resize(x, [float(f) for f in factors])


def phase_weights(factor: int, taps: int = 5) -> np.ndarray:
    """Cubic weights (factor x taps) for each sub-voxel phase over LR offsets -taps//2..taps//2.

    Equals the rows of resize_matrix away from borders: output sub-voxel i of LR voxel s sits at
    LR coordinate s + (i + 0.5)/factor - 0.5, always within half a voxel of s.
    """
    half = taps // 2
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    u = (np.arange(factor) + 0.5) / factor - 0.5
    w = cubic(u[:, None] - offsets[None, :])
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def support_radius(factor: int) -> int:
    """LR voxels one down+up round trip can reach, for halo bookkeeping (conservative)."""
    return 0 if factor == 1 else 5


BP_TOLERANCE = 1e-7


@lru_cache(maxsize=None)
def bp_reach(factor: int, iters: int, tol: float = BP_TOLERANCE) -> int:
    """LR voxels beyond which back-projection's influence is below `tol` per unit of signal.

    Each iteration reaches `support_radius` further, so the exact reach grows linearly; but the
    correction shrinks about 3x per LR voxel, so far fewer voxels matter. Measured on the 1-D impulse
    responses (to the LR data and to every sub-voxel phase of the estimate): the smallest distance
    whose whole L1 tail is below `tol`, never more than the exact reach.
    """
    if factor == 1 or iters == 0:
        return 0
    exact = iters * support_radius(factor)
    centre = exact + 2
    n = 2 * centre + 1
    tail = np.zeros(centre + 1)
    cases = [(np.zeros(n * factor), np.eye(1, n, centre)[0])]
    cases += [(np.eye(1, n * factor, centre * factor + p)[0], np.zeros(n)) for p in range(factor)]
    f3 = (1, 1, factor)
    for y, lr in cases:
        y = y.astype(np.float32)[None, None]
        lr = lr.astype(np.float32)[None, None]
        for _ in range(iters):
            y = y + upsample(lr - downsample(y, f3), f3)
        r = np.abs(y[0, 0].astype(np.float64))
        tail = np.maximum(tail, [r[(centre + d) * factor:].sum() for d in range(centre + 1)])
    below = np.nonzero(tail < tol)[0]
    return int(min(exact, below[0] if below.size else exact))


__all__ = [
    "cubic",
    "downsample",
    "output_length",
    "phase_weights",
    "resize",
    "resize_matrix",
    "round_trip",
    "round_trip_matrix",
    "bp_reach",
    "upsample_add",
    "support_radius",
    "upsample",
]
