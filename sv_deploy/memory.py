"""Memory planning for inference: how many bytes a tile and a slab take, and the largest tile that fits.

Pure arithmetic (plus one probe of free memory at the edge), so "peak RAM is bounded by the tile, not
by the output" is a number the CLI can choose and a test can check.
"""

from __future__ import annotations

import re
from math import prod
from typing import Sequence, Tuple

from .config import ArchConfig, Factors, Shape3, total_factors
from .errors import UserError
from .tiling import total_halo
from .trt_plan import ensemble_batch

SLABS_IN_FLIGHT = 3  # one being computed, one queued, one being written
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

    Network activations (two live feature maps per member, fp32) plus the sub-pixel phases, their
    shuffled copy, the ensemble sum and back-projection arrays. Calibrated against measured peak RSS
    on CPU (1224 B per voxel measured for x2 with the 8-way ensemble; this gives 1472).
    """
    phases = prod(factors)
    return voxels * (4 * batch * 2 * arch.features + 4 * phases * (18 + 3 * batch))


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
    return SLABS_IN_FLIGHT * slab_bytes(core[0], volume, factors, out_itemsize) + work


def choose_tile(budget: int, volume: Shape3, stages: Sequence[Factors], arch: ArchConfig, bp_iters: int,
                ensemble: bool, out_itemsize: int, start: Shape3) -> Shape3:
    """Largest tile core, shrinking from `start`, whose planned bytes fit in `budget`.

    Each step shrinks by a quarter the axis that saves the most bytes (z when the output slabs
    dominate, y or x when the tile's working set does).
    """
    def cost(c):
        return plan_bytes(volume, tuple(c), stages, arch, bp_iters, ensemble, out_itemsize)

    core = [min(c, n) for c, n in zip(start, volume)]
    while cost(core) > budget:
        options = []
        for a in range(3):
            if core[a] > MIN_CORE[a]:
                smaller = list(core)
                smaller[a] = max(MIN_CORE[a], (core[a] * 3) // 4)
                options.append(smaller)
        if not options:
            need = cost(core)
            raise UserError(
                f"enhancing this volume needs at least {need / 2**20:.0f} MiB of working memory, more than the "
                f"{budget / 2**20:.0f} MiB allowed; raise --max-memory, or use --no-ensemble / fewer --bp-iters"
            )
        core = min(options, key=cost)
    return tuple(core)  # type: ignore[return-value]


def available_bytes() -> int:
    """Host memory available now (psutil), the default budget's basis."""
    import psutil

    return int(psutil.virtual_memory().available)


def default_budget() -> int:
    """Half of what is free: room for the reader, the writer and everything else on the PC."""
    return available_bytes() // 2

