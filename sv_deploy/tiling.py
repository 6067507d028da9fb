"""Tile plans: cores that cover the LR volume, each read with a halo that is cut away after enhancing.

Pure arithmetic, so tiled == whole-volume can be reasoned about and tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import ceil
from typing import List, Sequence, Tuple

import numpy as np

from .config import ArchConfig, Factors, Shape3, total_factors
from .resize import bp_reach

Span = Tuple[int, int]


@dataclass(frozen=True)
class Tile:
    read: Tuple[Span, Span, Span]  # LR region read, halo included
    core: Tuple[Span, Span, Span]  # LR region this tile is responsible for
    out: Tuple[Span, Span, Span]  # where the kept region goes in the HR volume


def stage_bp_iters(stage: int, count: int, bp_iters: int) -> int:
    """Back-projection iterations of stage `stage` of `count`: only the last back-projects, against
    the measured input over the chain's total factors. An earlier stage's own back-projection adds
    nothing the last one does not (QUALITY.md, session 13) and would widen every tile's halo."""
    return bp_iters if stage == count - 1 else 0


def total_halo(stages: Sequence[Factors], arch: ArchConfig, bp_iters: int, start: int = 0) -> Shape3:
    """Halo, in the input voxels of stage `start`, that stages start.. need around what they compute.

    Each stage's network reads `arch.halo()` of its own input voxels around each output, and the
    last stage back-projects against the measured input over the total factors, reaching
    `bp_reach` input voxels. Counted in whole input voxels, so the cuts `enhance_block` makes
    between stages keep every stage's result aligned to the input; with `start` = the number of
    stages, 0.
    """
    before = total_factors(stages[:start])
    halo, scale = [0, 0, 0], list(before)
    for k, factors in enumerate(stages[start:], start):
        cumulative = [s * f for s, f in zip(scale, factors)]
        iters = stage_bp_iters(k, len(stages), bp_iters)
        for a in range(3):
            halo[a] += ceil(arch.halo() / scale[a]) + bp_reach(cumulative[a], iters)
        scale = cumulative
    return tuple(h * b for h, b in zip(halo, before))  # type: ignore


def _axis_spans(length: int, core: int) -> List[Span]:
    core = max(1, min(core, length))
    count = ceil(length / core)
    # Even split, so no sliver tile at the end.
    edges = [round(i * length / count) for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


def plan_tiles(shape: Shape3, core: Shape3, halo: Shape3, factors: Factors) -> List[Tile]:
    """Tiles in z-major order."""
    tiles = []
    per_axis = [_axis_spans(shape[a], core[a]) for a in range(3)]
    for sz in per_axis[0]:
        for sy in per_axis[1]:
            for sx in per_axis[2]:
                spans = (sz, sy, sx)
                read, out = [], []
                for a, (s, e) in enumerate(spans):
                    r0, r1 = max(0, s - halo[a]), min(shape[a], e + halo[a])
                    f = factors[a]
                    read.append((r0, r1))
                    out.append((s * f, e * f))
                tiles.append(Tile(tuple(read), spans, tuple(out)))  # type: ignore
    return tiles


def _computed(length: int, core: int, halo: int) -> int:
    """Voxels one axis reads in all, over its spans with their halos."""
    return sum(min(length, e + halo) - max(0, s - halo) for s, e in _axis_spans(length, core))


def read_overhead(shape: Shape3, core: Shape3, halo: Shape3) -> float:
    """Voxels the tiles read (cores and halos) per voxel of the volume: 1 for one tile."""
    computed = np.prod([_computed(n, c, h) for n, c, h in zip(shape, core, halo)], dtype=np.float64)
    return float(computed / np.prod(shape, dtype=np.float64))


def candidate_lengths(limit: int, low: int = 1) -> List[int]:
    """Core lengths worth trying: the limit, then about 15% smaller each step, down to `low`."""
    values, v = [], limit
    while v > low:
        values.append(v)
        v = min(v - 1, int(v * 0.85))
    values.append(min(low, limit))
    return values


@lru_cache(maxsize=256)
def block_core(shape: Shape3, halo: int, max_read: int) -> Shape3:
    """Core of the sub-blocks a network pass is split into: each read (core plus halo, clamped to
    the block) holds at most `max_read` voxels, and the voxels computed over all sub-blocks are
    fewest (ties: the larger core). Reads and totals are separable per axis, so every candidate
    core is scored at once on a grid."""
    cands = [np.array(candidate_lengths(n)) for n in shape]
    read = [np.minimum(n, c + 2 * halo) for n, c in zip(shape, cands)]
    total = [np.array([_computed(n, int(c), halo) for c in cs]) for n, cs in zip(shape, cands)]
    r = read[0][:, None, None] * read[1][None, :, None] * read[2][None, None, :]
    t = (total[0][:, None, None] * total[1][None, :, None] * total[2][None, None, :]).astype(np.float64)
    c = cands[0][:, None, None] * cands[1][None, :, None] * cands[2][None, None, :]
    t = np.where(r <= max_read, t, np.inf)
    if not np.isfinite(t).any():
        return (1, 1, 1)
    # fewest computed voxels first, then the largest core
    order = np.lexsort((-c.ravel(), t.ravel()))
    i, j, k = np.unravel_index(order[0], t.shape)
    return (int(cands[0][i]), int(cands[1][j]), int(cands[2][k]))


def block_reads(shape: Shape3, halo: int, max_read: int) -> int:
    """Voxels the network passes over a block of `shape` read in all (`enhance.predict_blocks`):
    the block itself when one pass holds it, else every sub-block's core and halo."""
    if max_read <= 0 or int(np.prod(shape)) <= max_read:
        return int(np.prod(shape))
    core = block_core(shape, halo, max_read)
    return int(np.prod([_computed(n, c, halo) for n, c in zip(shape, core)]))


def to_slices(spans: Sequence[Span]) -> Tuple[slice, ...]:
    return tuple(slice(s, e) for s, e in spans)
