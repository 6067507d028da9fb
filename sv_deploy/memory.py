"""Memory planning for inference: how many bytes a tile and a slab take, and the largest tile that fits.

Pure arithmetic (plus one probe of free memory at the edge), so "peak RAM is bounded by the tile, not
by the output" is a number the CLI can choose and a test can check.
"""

from __future__ import annotations

import re
from math import prod
from typing import Sequence

from .config import ArchConfig, Factors, Shape3, total_factors
from .errors import UserError
from .tiling import total_halo
from .trt_plan import ensemble_batch

SLABS_IN_FLIGHT = 3  # one being computed, one queued, one being written
FIXED_BYTES = 16 * 2**20  # allocator slack and per-shape library buffers
INPUT_BYTES_PER_VOXEL = 8  # the normalized float32 copy of the input and its percentile pass
MIN_CORE: Shape3 = (1, 8, 8)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5g', '800000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", str(text))
    if not m:
        raise UserError(f"'{text}' is not a size; write e.g. 512M or 2G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def stage_bytes(voxels: int, factors: Factors, arch: ArchConfig, batch: int) -> int:
    """Peak working bytes of one stage on a block of `voxels` input voxels.

    Network activations (two live feature maps and a convolution workspace per member, fp32) plus
    the sub-pixel phases, their shuffled copy, the ensemble sum and back-projection arrays.
    Calibrated against peak RSS measured on CPU: x2 with the 8-way ensemble 1224 B per voxel
    (this gives 2496), x2 without it about 1 KiB (this gives 1056).
    """
    phases = prod(factors)
    return voxels * (4 * batch * (2 * arch.features + 64) + 4 * phases * (18 + 3 * batch))


def tile_bytes(core: Shape3, stages: Sequence[Factors], arch: ArchConfig, bp_iters: int, ensemble: bool,
               volume: Shape3 = (1 << 30,) * 3) -> int:
    """Peak over the chained stages for one tile: each stage runs on the core plus the halo the
    remaining stages need (`enhance_block` trims between stages)."""
    scale, peak = [1, 1, 1], 0
    for i, factors in enumerate(stages):
        halo = total_halo(stages[i:], arch, bp_iters)
        voxels = prod(min(core[a] * scale[a] + 2 * halo[a], volume[a] * scale[a]) for a in range(3))
        peak = max(peak, stage_bytes(voxels, factors, arch, ensemble_batch(factors, ensemble)))
        scale = [scale[a] * factors[a] for a in range(3)]
    return peak


def slab_bytes(core_z: int, volume: Shape3, factors: Factors, out_itemsize: int) -> int:
    """One output z-slab: the float32 result plus its copy in the output dtype."""
    planes = core_z * factors[0]
    return planes * volume[1] * factors[1] * volume[2] * factors[2] * (4 + out_itemsize)


def plan_bytes(volume: Shape3, core: Shape3, stages: Sequence[Factors], arch: ArchConfig, bp_iters: int,
               ensemble: bool, out_itemsize: int) -> int:
    factors = total_factors(stages)
    core = tuple(min(c, n) for c, n in zip(core, volume))
    work = tile_bytes(core, stages, arch, bp_iters, ensemble, volume)
    slabs = SLABS_IN_FLIGHT * slab_bytes(core[0], volume, factors, out_itemsize)
    return FIXED_BYTES + INPUT_BYTES_PER_VOXEL * prod(volume) + slabs + work


def _steps(limit: int, low: int) -> list:
    """Candidate core lengths: the limit, then about 15% smaller each step, down to `low`."""
    values, v = [], limit
    while v > low:
        values.append(v)
        v = min(v - 1, int(v * 0.85))
    values.append(min(low, limit))
    return values


def choose_tile(budget: int, volume: Shape3, stages: Sequence[Factors], arch: ArchConfig, bp_iters: int,
                ensemble: bool, out_itemsize: int, start: Shape3) -> Shape3:
    """The tile core, at most `start`, that fits `budget` and wastes the least work on halos.

    Efficiency is core voxels over computed voxels (core plus halo, clamped to the volume);
    among equally efficient tiles the larger wins (fewer calls).
    """
    halo = total_halo(stages, arch, bp_iters)
    start = tuple(max(1, min(s, n)) for s, n in zip(start, volume))
    best, best_key = None, None
    for z in _steps(start[0], MIN_CORE[0]):
        for y in _steps(start[1], MIN_CORE[1]):
            for x in _steps(start[2], MIN_CORE[2]):
                core = (z, y, x)
                if plan_bytes(volume, core, stages, arch, bp_iters, ensemble, out_itemsize) > budget:
                    continue
                read = prod(min(c + 2 * h, n) for c, h, n in zip(core, halo, volume))
                key = (prod(core) / read, prod(core))
                if best_key is None or key > best_key:
                    best, best_key = core, key
    if best is None:
        smallest = tuple(min(m, n) for m, n in zip(MIN_CORE, volume))
        need = plan_bytes(volume, smallest, stages, arch, bp_iters, ensemble, out_itemsize)
        raise UserError(
            f"enhancing this volume needs at least {need / 2**20:.0f} MiB of working memory, more than the "
            f"{budget / 2**20:.0f} MiB allowed; raise --max-memory, or use --no-ensemble / fewer --bp-iters"
        )
    return best


def available_bytes() -> int:
    """Host memory available now (psutil), the default budget's basis."""
    import psutil

    return int(psutil.virtual_memory().available)


def default_budget() -> int:
    """Half of what is free: room for the reader, the writer and everything else on the PC."""
    return available_bytes() // 2

