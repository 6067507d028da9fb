"""Percentile normalization, computed once per volume and undone on output."""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from .config import NormConfig
from .errors import UserError

MAX_SAMPLES = 4_000_000  # percentiles of huge volumes come from a strided subsample


def percentiles(volume: np.ndarray, norm: NormConfig) -> Tuple[float, float]:
    flat = volume.reshape(-1)
    if flat.size > MAX_SAMPLES:
        flat = flat[:: flat.size // MAX_SAMPLES]
    low, high = np.percentile(flat, [norm.low_percentile, norm.high_percentile])
    low, high = float(low), float(high)
    if high <= low:  # sparse data (beads): the high percentile can sit on the background
        high = float(volume.max())  # of all of it: a subsample can miss the few bright voxels
    if high <= low:  # nearly all one bright value, a few darker voxels
        low = float(volume.min())
    if high <= low:
        raise UserError(f"the volume is constant (every voxel is {low:g}); there is no structure to enhance")
    return low, high


def normalize(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = 1.0 / (high - low)
    return ((volume.astype(np.float32) - np.float32(low)) * np.float32(scale)).astype(np.float32)


def denormalize(volume: np.ndarray, low: float, high: float, dtype: np.dtype, floor: float = -math.inf) -> np.ndarray:
    """Back to the input's units; integer dtypes are rounded and clamped to their range.

    `floor` (`output_bounds`' low) is applied again here for float outputs: a value clamped to it in
    normalized units comes back a rounding error away (-5e-7 below zero, seen)."""
    y = np.multiply(volume, np.float32(high - low), dtype=np.float32)
    y += np.float32(low)
    if np.dtype(dtype).kind == "f" and floor > -math.inf:
        np.maximum(y, np.float32(floor), out=y)
    return cast(y, dtype, inplace=True)


def output_bounds(dtype: np.dtype, data_min: float) -> Tuple[float, float]:
    """The (low, high) values an output may take, in the input's units.

    The pixel type's range, and nothing below zero unless the input itself goes below zero: an
    undershoot of the sharpening under a dark background is an artefact, not signal, and the same
    data must come out the same whether it is stored as uint16, int32 or float32.
    """
    dtype = np.dtype(dtype)
    low, high = min(0.0, float(data_min)), math.inf
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        low, high = max(low, float(info.min)), float(info.max)
    return low, high


def integer_limits(dtype: np.dtype, ftype: np.dtype) -> Tuple[float, float]:
    """An integer type's range as values of float type `ftype` that lie inside it.

    float32 rounds 2**31 - 1 and 2**32 - 1 up, past the range, and a value clamped there would
    wrap around in the cast; the nearest float32 inside (128 or 256 below) is taken instead."""
    info, ftype = np.iinfo(dtype), np.dtype(ftype).type
    low, high = ftype(info.min), ftype(info.max)
    if float(high) > info.max:  # a Python comparison: exact, where numpy's would round info.max too
        high = np.nextafter(high, ftype(0))
    if float(low) < info.min:
        low = np.nextafter(low, ftype(0))
    return low, high


def clip_to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Clamp to an integer pixel type's range (floats pass unchanged); values stay float."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return np.clip(x, *integer_limits(dtype, x.dtype))
    return x


def cast(x: np.ndarray, dtype: np.dtype, inplace: bool = False) -> np.ndarray:
    """Float values into a pixel type: integers are rounded and clamped, never wrapped.

    `inplace` rounds and clamps in x itself (a float array the caller owns): tile outputs are the
    largest arrays in the program, and each temporary of their size costs time.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        if inplace:
            np.rint(x, out=x)
            np.clip(x, *integer_limits(dtype, x.dtype), out=x)
        else:
            x = clip_to_dtype(np.rint(x), dtype)
    return x.astype(dtype)


def valid_range(dtype: np.dtype, low: float, high: float, data_min: float) -> Tuple[float, float]:
    """`output_bounds` in normalized units (what each stage's result is clamped to)."""
    lo, hi = output_bounds(dtype, data_min)
    scale = 1.0 / (high - low)
    return ((lo - low) * scale, (hi - low) * scale)


def check_output_dtype(data: np.ndarray, dtype: np.dtype, option: str) -> None:
    """Refuse an integer output type that would clip or round the input's values away.

    The output keeps the input's units, so the type must hold the input's value range, and a float
    input must hold whole numbers (counts stored as floats); a [0, 1] float volume written as
    uint16 would otherwise come out as 0s and 1s.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui" or data.dtype == dtype:
        return
    low, high = float(data.min()), float(data.max())
    info = np.iinfo(dtype)
    if low < info.min or high > info.max:
        raise UserError(
            f"--dtype {option} holds {info.min}..{info.max} but the input's values span {low:g}..{high:g} "
            "(the output keeps the input's units); use --dtype input or float32"
        )
    sample = data.reshape(-1)[:: max(1, data.size // MAX_SAMPLES)]
    if data.dtype.kind == "f" and not np.array_equal(sample, np.round(sample)):
        raise UserError(
            f"the input holds fractional values ({low:g}..{high:g}); --dtype {option} would round them "
            "away (the output keeps the input's units): use --dtype input or float32"
        )
