"""Apply a trained model to a whole volume: tiles with a halo, self-ensemble, back-projection.

Everything here works on normalized float32 arrays; file formats and dtypes stay at the edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from .backends import Backend
from .config import ArchConfig, Factors, Shape3, total_factors
from .errors import UserError
from .geometry import ensemble_transforms, forward, inverse
from .progress import progress_bar
from .resize import downsample, round_trip, upsample, upsample_add
from .tiling import Tile, block_core, block_reads, plan_tiles, stage_bp_iters, to_slices, total_halo


@dataclass(frozen=True)
class InferenceOptions:
    ensemble: bool = True
    bp_iters: int = 10
    tile: Shape3 = (32, 96, 96)  # LR core per tile; the halo is added around it
    block: int = 0  # most voxels one network pass reads (0: the whole stage input at once)
    # Stages run as plain cubic interpolation (`ModelConfig.interpolation_stages`): their network
    # learned nothing and would give the same result through 8 ensemble passes.
    interpolate: Tuple[int, ...] = ()


def back_project(y: np.ndarray, lr: np.ndarray, factors: Sequence[int], iters: int,
                 in_place: bool = False) -> np.ndarray:
    """Iterative back-projection: make y consistent with the LR data under the degradation model.

    y_{k+1} = y_k + U(lr - D y_k). Since every step is linear, the residuals obey
    e_{k+1} = (I - DU) e_k, so all iterations run at LR size and y_K = y_0 + U(e_0 + ... + e_{K-1}):
    one shrink and one upsampling of the full-size volume instead of one of each per iteration.
    `in_place` (y C-contiguous float32 and the caller's to change) adds the correction into y
    without a full-size copy: inference's largest array is y (8-64x the input).
    """
    if iters <= 0:
        return y
    e = lr - downsample(y, factors)
    total = e.copy()
    for _ in range(iters - 1):
        e = e - round_trip(e, factors)
        total += e
    out = y if in_place else np.array(y, dtype=np.float32, order="C")
    return upsample_add(total, factors, out)


def predict_ensemble(backend: Backend, stage: int, x: np.ndarray, transforms) -> np.ndarray:
    """Mean of the backend's outputs over the transforms, each undone; same-shape members batched."""
    total = None
    for parity in (0, 1):
        group = [t for t in transforms if t[0] % 2 == parity]
        if not group:
            continue
        batch = np.stack([forward(x, t) for t in group])[:, None]
        out = backend.predict(stage, batch)[:, 0]
        for t, y in zip(group, out):
            y = inverse(y, t)
            if total is None:
                total = np.ascontiguousarray(y, dtype=np.float32)  # ours to change (Backend.predict)
            else:
                total += y
    if len(transforms) > 1:
        total /= len(transforms)
    return total


def predict_blocks(backend: Backend, stage: int, x: np.ndarray, transforms, factors: Factors, halo: int,
                   max_read: int) -> np.ndarray:
    """`predict_ensemble` on sub-blocks of x, each read with the network's own halo and cropped to
    its core: the same result, but the network runs on blocks of the size it is fastest at, while
    the tile around them (and its back-projection halo) can be as large as memory allows."""
    if max_read <= 0 or x.size <= max_read:
        return predict_ensemble(backend, stage, x, transforms)
    core = block_core(x.shape, halo, max_read)
    out = np.empty(tuple(n * f for n, f in zip(x.shape, factors)), dtype=np.float32)
    for part in plan_tiles(x.shape, core, (halo,) * 3, factors):
        y = predict_ensemble(backend, stage, x[to_slices(part.read)], transforms)
        keep = tuple(slice((c0 - r0) * f, (c1 - r0) * f) for (r0, _), (c0, c1), f in zip(part.read, part.core, factors))
        out[to_slices(part.out)] = y[keep]
    return out


ValueRange = Optional[Tuple[float, float]]
Margins = Tuple[Tuple[int, int], ...]


def enhance_block(
    backend: Backend,
    stages: Sequence[Factors],
    arch: ArchConfig,
    x: np.ndarray,
    options: InferenceOptions,
    value_range: ValueRange = None,
    margins: Optional[Margins] = None,
) -> np.ndarray:
    """All stages on one normalized block, no tiling (the reference the tiled path must equal).

    The last stage back-projects against the measured input over the chain's total factors (x4
    for a x4 chain: tied to the data as tricubic + back-projection is, not to stage 1's estimate);
    earlier stages pass their network's output on as it is (`stage_bp_iters`). Each stage's
    result is clamped to the input's representable range, as the final output is, so a later
    stage never sees values the data type could not hold. With `margins`, the block is a tile read with those (low, high) LR margins
    around its core: between stages, the part of the margin later stages no longer need is cut
    away, in whole input voxels (a x4 tile's second stage then runs on little more than its core),
    and the result is cropped to the core.
    """
    lr = x  # the measured input, cut as the stages' results are
    margins = [list(m) for m in margins] if margins else None
    folded = check_folded(backend, options)
    cumulative = [1, 1, 1]
    for i, factors in enumerate(stages):
        if i in options.interpolate:
            y = upsample(x, factors)
        else:
            transforms = ensemble_transforms(factors, options.ensemble and not folded)
            y = predict_blocks(backend, i, x, transforms, factors, arch.halo(), options.block)
        cumulative = [c * f for c, f in zip(cumulative, factors)]
        x = back_project(y, lr, cumulative, stage_bp_iters(i, len(stages), options.bp_iters), in_place=True)
        if value_range is not None:
            np.clip(x, *value_range, out=x)  # x is this function's own (back_project / predict_blocks)
        if margins is not None:
            need = total_halo(stages, arch, options.bp_iters, start=i + 1)  # whole input voxels
            cut, cut_lr = [], []
            for a in range(3):
                lo, hi = (m * factors[a] for m in margins[a])
                cut_lo, cut_hi = max(0, lo - need[a]), max(0, hi - need[a])
                margins[a] = [lo - cut_lo, hi - cut_hi]
                cut.append(slice(cut_lo, x.shape[a] - cut_hi))
                cut_lr.append(slice(cut_lo // cumulative[a], lr.shape[a] - cut_hi // cumulative[a]))
            x, lr = x[tuple(cut)], lr[tuple(cut_lr)]
    return x.astype(np.float32, copy=False)


def check_folded(backend: Backend, options: InferenceOptions) -> bool:
    """Whether the backend's network passes compute the ensemble themselves (`model.fold_ensemble`);
    such a backend cannot run without it."""
    folded = bool(getattr(backend, "folded_ensemble", False))
    if folded and not options.ensemble:
        raise UserError("this model runs the self-ensemble inside its network (an export made for it); "
                        "drop --no-ensemble, or use the .svmodel file")
    return folded


def iter_tiles(
    backend: Backend,
    stages: Sequence[Factors],
    arch: ArchConfig,
    volume: np.ndarray,
    options: InferenceOptions,
    progress: bool = False,
    value_range: ValueRange = None,
    finish: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> Iterator[Tuple[Tile, np.ndarray]]:
    """Yield (tile, its enhanced core) for every tile of the volume, in `plan_tiles` order.

    Peak memory is one tile's, whatever the output size. `finish` maps each tile's float32 result
    to what the caller keeps (de-normalized and cast to the output's type: a uint16 core is half a
    float32 one)."""
    halo = total_halo(stages, arch, options.bp_iters)
    tiles = plan_tiles(volume.shape, options.tile, halo, total_factors(stages))
    folded = check_folded(backend, options)
    bar = progress_bar(sum(tile_work(t, stages, options, folded, arch.halo()) for t in tiles), "enhance", "vox", progress,
                       unit_scale=True)
    counting = _Counting(backend, bar)
    try:
        done = 0
        for tile in tiles:
            margins = tuple((c0 - r0, r1 - c1) for (r0, r1), (c0, c1) in zip(tile.read, tile.core))
            counting.limit = done + tile_work(tile, stages, options, folded, arch.halo())
            block = enhance_block(counting, stages, arch, volume[to_slices(tile.read)], options, value_range, margins)
            core = finish(block) if finish else block
            del block
            bar.update(counting.limit - bar.n)  # the estimate is approximate: settle at each tile's end
            done = counting.limit
            yield tile, core
            core = None  # the consumer holds it now
    finally:
        bar.close()


def tile_work(tile: Tile, stages: Sequence[Factors], options: InferenceOptions, folded: bool = False,
              halo: int = 0) -> int:
    """Voxels the network reads for a tile, about (each stage on the whole read region), with each
    pass's own `halo` where passes are smaller than a stage's input: the unit of the progress bar,
    which a volume in one tile would otherwise leave at 0/1 until the end (and which, counting
    passes without their halos, would stand at 100 % while small passes go on)."""
    shape, total = [r1 - r0 for r0, r1 in tile.read], 0
    for i, factors in enumerate(stages):
        if i not in options.interpolate:
            passes = len(ensemble_transforms(factors, options.ensemble and not folded))
            total += block_reads(tuple(shape), halo, options.block) * passes
        shape = [n * f for n, f in zip(shape, factors)]
    return total


class _Counting:
    """A backend that moves the progress bar by the voxels of each network pass, up to `limit`."""

    def __init__(self, backend: Backend, bar):
        self.backend, self.bar, self.limit = backend, bar, 0
        self.name = backend.name
        self.folded_ensemble = getattr(backend, "folded_ensemble", False)

    def predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        y = self.backend.predict(stage, x)
        self.bar.update(max(0, min(x.size, self.limit - self.bar.n)))
        return y


def enhance_volume(
    backend: Backend,
    stages: Sequence[Factors],
    arch: ArchConfig,
    volume: np.ndarray,
    options: InferenceOptions,
    progress: bool = False,
    value_range: ValueRange = None,
) -> np.ndarray:
    """Whole enhanced volume in memory (training's stage chaining, tests, small data)."""
    shape = tuple(n * f for n, f in zip(volume.shape, total_factors(stages)))
    out = np.empty(shape, dtype=np.float32)
    for tile, core in iter_tiles(backend, stages, arch, volume, options, progress, value_range):
        out[to_slices(tile.out)] = core
    return out
