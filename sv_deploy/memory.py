"""Memory planning for inference: how many bytes a tile takes, and the largest tile that fits.

Pure arithmetic (plus one probe of free memory at the edge), so "peak RAM is bounded by the tile, not
by the output" is a number the CLI can choose and a test can check.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import threading
from math import ceil, prod
from typing import List, Optional, Sequence

from .config import ArchConfig, Factors, Shape3, total_factors
from .errors import UserError
from .tiling import candidate_lengths, total_halo
from .trt_plan import ensemble_batch

OUTPUTS_IN_FLIGHT = 3  # tile cores: one just made, one queued, one being written
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


def network_bytes(voxels: int, factors: Factors, arch: ArchConfig, batch: int, on_device: bool = False) -> int:
    """Working bytes of one network pass reading `voxels` input voxels: activations (feature maps
    and a convolution workspace per member, fp32) and the members' sub-pixel outputs. Five feature
    maps per member: two are live at once, and ONNX Runtime's arena held up to 2.8 KB per voxel
    of a folded x2 pass once passes of several shapes had run (BENCH.md, session 14), which two
    had undercounted. With `on_device` (a GPU) the activations live there: the host holds only
    the pass's input and its output (the pinned staging copies)."""
    if on_device:
        return voxels * 4 * batch * (1 + prod(factors))
    return voxels * 4 * batch * (5 * arch.features * arch.members + 64 + 3 * prod(factors))


def stage_bytes(voxels: int, factors: Factors, arch: ArchConfig, batch: int, block: int = 0,
                on_device: bool = False) -> int:
    """Peak working bytes of one stage on a block of `voxels` input voxels, its network run on
    sub-blocks of at most `block` voxels (0: all at once).

    The network pass plus, over the whole block, the ensemble sum and the back-projection arrays
    (8 float32 arrays of the output's size). Calibrated against peak RSS on CPU (x2 stages, 8-way
    ensemble, ONNX Runtime): a network pass about 1.56 KB per voxel it reads (this gives 1.92 KB),
    the rest about 220 B per input voxel of the block (this gives 256).
    """
    net = network_bytes(min(voxels, block) if block > 0 else voxels, factors, arch, batch, on_device)
    return net + voxels * 4 * prod(factors) * 8


def tile_bytes(core: Shape3, stages: Sequence[Factors], arch: ArchConfig, bp_iters: int, ensemble: bool,
               volume: Shape3 = (1 << 30,) * 3, block: int = 0, on_device: bool = False) -> int:
    """Peak over the chained stages for one tile: each stage runs on the core plus the halo the
    remaining stages need (`enhance_block` trims between stages)."""
    scale, peak = [1, 1, 1], 0
    for i, factors in enumerate(stages):
        halo = total_halo(stages, arch, bp_iters, start=i)
        voxels = prod(min(core[a] * scale[a] + 2 * halo[a], volume[a] * scale[a]) for a in range(3))
        peak = max(peak, stage_bytes(voxels, factors, arch, ensemble_batch(factors, ensemble), block, on_device))
        scale = [scale[a] * factors[a] for a in range(3)]
    return peak


def output_bytes(core: Shape3, factors: Factors, out_itemsize: int) -> int:
    """One tile's enhanced core, in the output dtype (de-normalized and cast as it is made:
    `enhance.iter_tiles`) until the writer has put it in the file."""
    return prod(c * f for c, f in zip(core, factors)) * out_itemsize


def plan_bytes(volume: Shape3, core: Shape3, stages: Sequence[Factors], arch: ArchConfig, bp_iters: int,
               ensemble: bool, out_itemsize: int, block: int = 0, on_device: bool = False) -> int:
    """Host bytes of enhancing `volume` with tile `core`; `on_device`: network passes run on a GPU.
    Tiles go straight into the output file (`volume_io.volume_output`): no output slab is held,
    so the output's size does not count, only the few tile cores on their way to the file."""
    factors = total_factors(stages)
    core = tuple(min(c, n) for c, n in zip(core, volume))
    work = tile_bytes(core, stages, arch, bp_iters, ensemble, volume, block, on_device)
    in_flight = min(OUTPUTS_IN_FLIGHT, prod(ceil(n / c) for n, c in zip(volume, core)))
    return FIXED_BYTES + INPUT_BYTES_PER_VOXEL * prod(volume) + in_flight * output_bytes(core, factors, out_itemsize) + work


def choose_tile(budget: int, volume: Shape3, stages: Sequence[Factors], arch: ArchConfig, bp_iters: int,
                ensemble: bool, out_itemsize: int, start: Shape3, block: int = 0, on_device: bool = False) -> Shape3:
    """The tile core, at most `start`, that fits `budget` and wastes the least work on halos.

    Efficiency is core voxels over computed voxels (core plus halo, clamped to the volume);
    among equally efficient tiles the larger wins (fewer calls).
    """
    halo = total_halo(stages, arch, bp_iters)
    start = tuple(max(1, min(s, n)) for s, n in zip(start, volume))
    best, best_key = None, None
    for z in candidate_lengths(start[0], MIN_CORE[0]):
        for y in candidate_lengths(start[1], MIN_CORE[1]):
            for x in candidate_lengths(start[2], MIN_CORE[2]):
                core = (z, y, x)
                read = prod(min(c + 2 * h, n) for c, h, n in zip(core, halo, volume))
                key = (prod(core) / read, prod(core))
                if best_key is not None and key <= best_key:
                    continue  # cannot win: skip the (slower) memory estimate
                if plan_bytes(volume, core, stages, arch, bp_iters, ensemble, out_itemsize, block, on_device) <= budget:
                    best, best_key = core, key
    if best is None:
        smallest = tuple(min(m, n) for m, n in zip(MIN_CORE, volume))
        need = plan_bytes(volume, smallest, stages, arch, bp_iters, ensemble, out_itemsize, block, on_device)
        raise TileDoesNotFit(budget, need, ensemble, bp_iters)
    return best


def format_size(n: int) -> str:
    """Bytes for a message, in the largest binary unit that keeps a leading digit: 1.5 GiB, 512 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class TileDoesNotFit(UserError):
    """No tile fits the budget; the message names what would fit and the options that need less."""

    def __init__(self, budget: int, need: int, ensemble: bool, bp_iters: int):
        lighter = [option for option, on in (("--no-ensemble", ensemble), ("fewer --bp-iters", bp_iters)) if on]
        super().__init__(f"enhancing this volume needs at least {ceil(need / 2**20)} MiB of working memory, more "
                         f"than the {format_size(budget)} allowed; raise --max-memory"
                         + (f" or use {' / '.join(lighter)}" if lighter else ""))
        self.budget, self.need = budget, need


def least_budget(volume: Shape3, stages: Sequence[Factors], arch: ArchConfig, bp_iters: int, ensemble: bool,
                 out_itemsize: int, device_free: Optional[int] = None) -> int:
    """The smallest budget under which `choose_block` and `choose_tile` find a tile, to 1 MiB.

    Network passes shrink with the budget (`choose_block`), so one plan's figure is not the need: a
    user who gave what a failed run's message said would fail again on a higher one."""
    smallest = tuple(min(m, n) for m, n in zip(MIN_CORE, volume))

    def fits(budget: int) -> bool:
        block = choose_block(budget, stages, arch, ensemble, device_free)
        return plan_bytes(volume, smallest, stages, arch, bp_iters, ensemble, out_itemsize, block,
                          device_free is not None) <= budget

    low, high = 0, 2**20
    while not fits(high):  # the plan grows slower than the budget: this ends
        low, high = high, 2 * high
    while high - low > 2**20:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


HOST_BLOCK_VOXELS = 1_000_000  # ONNX Runtime CPU: as fast as 2 M voxels a pass, half its arena (BENCH.md, session 14)
# Out-of-memory retries stop halving passes here: a 16^3 read has a 4^3 core at halo 6, so a pass
# is already almost all halo; halving further would crawl on to 1-voxel passes.
MIN_BLOCK_VOXELS = 4_096


def choose_block(budget: int, stages: Sequence[Factors], arch: ArchConfig, ensemble: bool,
                 device_free: Optional[int] = None) -> int:
    """Most input voxels one network pass reads: on the host `HOST_BLOCK_VOXELS` (no faster larger),
    within half the budget; on a GPU (`device_free` bytes) as large as half its free memory allows."""
    per_voxel = max(network_bytes(1, f, arch, ensemble_batch(f, ensemble)) for f in stages)
    if device_free is not None:
        return max(1, device_free // 2 // per_voxel)
    return max(1, min(HOST_BLOCK_VOXELS, budget // 2 // per_voxel))


def available_bytes() -> int:
    """Host memory available now (psutil), the default budget's basis."""
    import psutil

    return int(psutil.virtual_memory().available)


def default_budget(already_read: int = 0) -> int:
    """Half of what is free: room for the reader, the writer and everything else on the PC.
    `already_read`: bytes of the input in memory already (read ahead), counted as free since the
    plan charges the input itself."""
    return (available_bytes() + already_read) // 2


READ_AHEAD_SHARE = 16  # an input is read ahead only when it takes at most 1/16 of the free memory


def may_read_ahead(file_bytes: int, available: int) -> bool:
    """Whether to read the next input while the current one is enhanced: its copy must stay small
    beside the current file's budget (half of what was free when it started)."""
    return file_bytes * READ_AHEAD_SHARE <= available



M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
# Where glibc's moving thresholds end on 64-bit: mmap at 32 MiB, heap trimmed above 64 MiB.
MAX_MAP_THRESHOLD, MAX_TRIM_THRESHOLD = 32 << 20, 64 << 20
MIN_MAP_THRESHOLD = 1 << 20
GLIBC_MMAP_MAX = 65536  # glibc's own limit on the count of mapped blocks
KEEP_FREED_MIN, KEEP_FREED_MAX = 64 << 20, 1 << 30


def map_threshold(budget: int) -> int:
    """Allocation size from which glibc should map (and on freeing unmap) blocks under a memory
    limit: 1/64 of it, so what its heap keeps stays small beside the limit, between 1 and 32 MiB."""
    return int(min(MAX_MAP_THRESHOLD, max(MIN_MAP_THRESHOLD, budget // 64)))


def keep_freed(budget: int) -> int:
    """Freed bytes glibc may keep at the top of its heap without a memory limit, for the next
    network pass to reuse: a quarter of the budget, 64 MiB to 1 GiB (one torch pass of the 3D
    task's largest block churns about 0.5 GiB)."""
    return int(min(KEEP_FREED_MAX, max(KEEP_FREED_MIN, budget // 4)))


# The user's own settings of each parameter, which stand: glibc's environment variable and tunable.
_USER_SETTING = {
    M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    M_MMAP_MAX: ("MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max"),
}


def user_set(param: int, environ=None) -> bool:
    import os

    environ = os.environ if environ is None else environ
    variable, tunable = _USER_SETTING[param]
    return variable in environ or tunable in environ.get("GLIBC_TUNABLES", "")


def _mallopt(param: int, size: int) -> bool:
    import ctypes
    import sys

    if sys.platform != "linux" or user_set(M_MMAP_THRESHOLD) or user_set(param):
        return False  # the user's settings stand
    try:
        return ctypes.CDLL("libc.so.6").mallopt(param, size) == 1
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def heap_settings(budget: Optional[int], limited: bool) -> list:
    """(mallopt parameter, value) pairs for a run under a memory limit of `budget` bytes
    (`limited`), for one without a limit whose budget is `budget`, or, with `budget` None, for
    between runs (where glibc's moving thresholds end: once set, glibc never moves its threshold
    again, and at 1 MiB training took 1.6-1.9x as long; BENCH.md session 15). The threshold comes
    first: where it cannot be set, nothing else is."""
    if budget is None:
        return [(M_MMAP_THRESHOLD, MAX_MAP_THRESHOLD), (M_MMAP_MAX, GLIBC_MMAP_MAX), (M_TRIM_THRESHOLD, MAX_TRIM_THRESHOLD)]
    if limited:
        threshold = map_threshold(budget)
        return [(M_MMAP_THRESHOLD, threshold), (M_MMAP_MAX, GLIBC_MMAP_MAX), (M_TRIM_THRESHOLD, 2 * threshold)]
    return [(M_MMAP_THRESHOLD, MAX_MAP_THRESHOLD), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, keep_freed(budget))]


class _Run:
    def __init__(self, setting: list, limited: bool):
        self.setting, self.limited = setting, limited


_in_force: List[_Run] = []  # the runs under way that set glibc's heap, innermost last
_lock = threading.Lock()


@contextlib.contextmanager
def heap_for(budget: Optional[int] = None, limited: bool = False):
    """glibc's heap set for a run: under a memory limit (`limited`), blocks from `map_threshold`
    up are mapped on their own and returned to the system when freed, so the budget holds; without
    one (`budget` None: half the free memory), every block comes from the heap and up to
    `keep_freed` of freed memory stays there for the next pass. Afterwards the settings of the
    runs still under way (the innermost), or glibc's end values; what a run without a limit kept
    is handed back when the run then in force has a limit, or none is (between the files of a
    batch or a watch the process holds only what is in use).

    By default glibc maps every block from 32 MiB up (and, once smaller mapped blocks were freed,
    hands the heap back above twice their size), so each network pass paid fresh zeroed pages
    for its feature maps: without a limit, torch's 3D full recipe took 68.5 s against 48.3 s with
    them kept (BENCH.md, session 22). Under a limit the heap must give memory back: one streaming
    run grew peak RSS by 60-124 MiB with glibc's moving threshold against 33-36 MiB at 1 MiB
    (BENCH.md, session 15), past a 56 MiB budget; but every mapped block costs fresh pages (at 1
    MiB throughout torch's 2D full recipe took 2.3-2.8x as long, BENCH.md session 18), hence a
    threshold scaled to the limit. The settings are process-wide: runs in several threads at once
    each restore what is in force when they end, not each other's. Nothing changes where the C
    library is not glibc or the user set the threshold (MALLOC_MMAP_THRESHOLD_ or its
    GLIBC_TUNABLES entry); their trim threshold and mapped-block count stand too."""
    setting = heap_settings(budget if budget is not None else default_budget(), limited)
    with _lock:
        fixed = _mallopt(*setting[0])
        for pair in setting[1:] if fixed else ():
            _mallopt(*pair)
        run = _Run(setting, limited) if fixed else None
        if run:
            _in_force.append(run)
    try:
        yield
    finally:
        if run:
            with _lock:
                _in_force.remove(run)
                outer = _in_force[-1] if _in_force else None
                for pair in outer.setting if outer else heap_settings(None, False):
                    _mallopt(*pair)
                if not limited and (outer is None or outer.limited):
                    _malloc_trim()  # what the run kept goes back, not only the heap's top


def heap_keeps() -> int:
    """Bytes of freed memory glibc's heap may keep for reuse under the run now in force: the share
    a plan without a memory limit leaves for it (0 under a limit, off glibc, or outside a run)."""
    with _lock:
        run = _in_force[-1] if _in_force else None
    return 0 if run is None or run.limited else dict(run.setting)[M_TRIM_THRESHOLD]


def heap_set_for_run(func):
    """`func` run under `heap_for` its `max_memory` argument, where it takes one (None: no limit)."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        budget = signature.bind(*args, **kwargs).arguments.get("max_memory")
        with heap_for(budget, limited=bool(budget)):
            return func(*args, **kwargs)

    return wrapper
