"""One input file -> one enhanced OME-TIFF: read, normalize, enhance tile by tile, write.

The output file is laid out first and each tile written into its place (`volume_io.volume_output`)
by a writer running one tile behind the compute (`pipeline.write_behind`), so no output slab is held
in memory; the tile is chosen from the memory budget unless given; on out-of-memory the file is
redone with smaller network passes (and tiles).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

from .config import ModelConfig
from .enhance import InferenceOptions, iter_tiles
from .errors import UserError
from .geometry import ensemble_transforms
from .memory import (MIN_BLOCK_VOXELS, TileDoesNotFit, choose_block, choose_tile, default_budget, format_size,
                     heap_keeps, heap_set_for_run, least_budget, plan_bytes)
from .normalize import check_output_dtype, denormalize, normalize, output_bounds, percentiles, valid_range
from .pipeline import write_behind
from .tiling import read_overhead, total_halo
from .volume_io import Volume, axes_warning, check_not_constant, read_volume, scaled_voxel_size, volume_output

TILE_OVERHEAD_WARNING = 4  # a given tile whose halos make each voxel read more often than this is worth a warning
# Largest core the automatic choice considers; the memory plan (`memory.choose_tile`) bounds it
# below. Was 64x256x256: x2 of a 100x1024x1024 input under 11 GiB then ran its network on 2.1x
# the voxels it kept (each tile's back-projection halo, and each pass's own); now 1.5x (BENCH.md,
# session 15).
AUTO_TILE_LIMIT = (128, 1024, 1024)


@dataclass(frozen=True)
class ReadOptions:
    axes: Optional[str] = None
    channel: Optional[int] = None
    time: Optional[int] = None
    voxel_size: Optional[Tuple[float, float, float]] = None
    series: Optional[int] = None


def with_training_voxel_size(vol: Volume, config, input_path, log) -> Volume:
    """Axes whose voxel size the input does not give take the training input's, with a warning:
    a model is trained on its acquisition (or one like it), and an output written without a voxel
    size opens in viewers at 1 unit per voxel."""
    used = [vol.axes != "YX", True, True]  # a 2D image has no z to size
    filled = tuple(k if v is None and u else v for v, k, u in zip(vol.voxel_size, config.voxel_size, used))
    if filled == tuple(vol.voxel_size):
        return vol
    axes = ", ".join(a for a, v, f in zip("zyx", vol.voxel_size, filled) if v is None and f is not None)
    log(f"warning: {input_path} does not give its voxel size in {axes}; using the model's training input's "
        f"({', '.join('?' if v is None else f'{v:g}' for v in filled)} um, z,y,x); pass --voxel-size if it differs")
    return replace(vol, voxel_size=filled)


@dataclass(frozen=True)
class FileResult:
    input: str
    output: str
    input_shape: Tuple[int, int, int]
    output_shape: Tuple[int, int, int]
    tile: Tuple[int, int, int]
    block: int  # most voxels one network pass read
    read_s: float  # reading (what was not read ahead) and normalizing
    compute_s: float  # time spent producing tiles (backend + ensemble + back-projection)
    total_s: float  # file to file: reading the input to the renamed output


def read_input(path, read: ReadOptions) -> Volume:
    vol = read_volume(path, axes=read.axes, channel=read.channel, time=read.time, series=read.series)
    check_not_constant(vol, str(path))
    if read.voxel_size is not None:
        vol = replace(vol, voxel_size=read.voxel_size)
    return vol


def _ensemble_state(options: InferenceOptions, stages: int) -> str:
    if not options.ensemble:
        return "off"
    return "on" if len(options.interpolate) < stages else "unused (every stage runs as interpolation)"


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's CUDA OOM, and ONNX Runtime's allocation failures all mean: retry smaller (see `shrink_after_oom`)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA OOM
        return True
    text = str(exc).lower()  # ONNX Runtime's exceptions are not RuntimeError subclasses: go by the message
    # cuDNN and cuBLAS report a failed workspace allocation as ALLOC_FAILED, or as finding no engine
    return any(sign in text for sign in ("out of memory", "failed to allocate", "alloc_failed",
                                         "unable to find an engine"))


def shrink_after_oom(exc: BaseException, tile: Tuple[int, int, int], block: int):
    """(tile, block) to retry with. A failed allocation inside a network pass (a GPU, ONNX Runtime)
    needs smaller passes only: the tile, whose halo is paid once per tile, stays as large as it was.
    Host memory (MemoryError) holds the tile's arrays, so both shrink; so does the tile once passes
    cannot get smaller (`MIN_BLOCK_VOXELS`, or the size asked for when that is smaller)."""
    smaller_tile = tuple(max(min(m, t), t // 2) for t, m in zip(tile, (1, 8, 8)))  # never larger than asked
    smaller_block = max(min(block, MIN_BLOCK_VOXELS), block // 2)
    if isinstance(exc, MemoryError) or smaller_block == block:
        return smaller_tile, smaller_block
    return tuple(tile), smaller_block


def memory_view(runner, config, options):
    """(arch, ensemble) as the memory plan should see the passes: a folded ensemble is one pass
    through a network with a copy of the members per ensemble transform."""
    if not getattr(runner, "folded_ensemble", False):
        return config.arch, options.ensemble
    copies = max(len(ensemble_transforms(f, True)) for f in config.stages)
    return replace(config.arch, members=config.arch.members * copies), False


def check_input(vol: Volume, config: ModelConfig, input_path, out_dtype: str = "input") -> np.dtype:
    """The output's dtype, after the checks an input must pass for this model (UserError if not)."""
    factors = config.total_factors()
    if vol.data.shape[0] == 1 and factors[0] != 1:  # a 2D image, or a stack of one plane
        raise UserError(
            f"the model scales z by {factors[0]} but {input_path} is a 2D image; use a model trained with "
            "--scale 1,F,F or on 2D data"
        )
    if config.axes == "YX" and vol.axes != "YX":
        raise UserError(
            f"the model was trained on a 2D image and enhances 2D images only, but {input_path} is a "
            f"{'x'.join(map(str, vol.data.shape))} (z,y,x) stack; train on the stack itself (--scale 1,2,2)"
        )
    dtype = vol.dtype if out_dtype == "input" else np.dtype(out_dtype)
    if dtype.kind in "ui" and dtype.itemsize > 4:
        raise UserError(f"{input_path} is stored as {dtype}, which OME-TIFF cannot hold; pass --dtype float32 "
                        "(or --dtype uint16 when its values fit)")
    check_output_dtype(vol.data, dtype, out_dtype)
    return dtype


def check_tile_fits(tile, budget: int, shape, config: ModelConfig, arch, options: InferenceOptions, ensemble: bool,
                    out_itemsize: int, device_free: Optional[int]) -> None:
    """Refuse a --tile that --max-memory cannot hold: its plan over the budget, or network passes so
    small (under `MIN_BLOCK_VOXELS`) that each one's halo leaves next to nothing of it to keep."""
    need = plan_bytes(shape, tile, config.stages, arch, options.bp_iters, ensemble, out_itemsize,
                      max(options.block, MIN_BLOCK_VOXELS), on_device=device_free is not None)
    named = f"--tile {'x'.join(map(str, tile))}"
    if need > budget:
        raise UserError(f"{named} needs about {format_size(need)} of working memory, more than the "
                        f"{format_size(budget)} --max-memory allows; use a smaller --tile, or leave --tile out to "
                        "size it from --max-memory")
    if options.block < MIN_BLOCK_VOXELS:
        where = "the GPU's free memory" if device_free is not None else f"--max-memory {format_size(budget)}"
        raise UserError(f"{where} leaves network passes of {options.block:,} voxels, too few to get through {named} "
                        "at a useful speed; raise --max-memory or free memory")


@heap_set_for_run  # under --max-memory freed tile arrays leave the process; without, they stay for reuse
def enhance_file(
    runner,
    config: ModelConfig,
    input_path,
    output_path,
    options: InferenceOptions,
    read: ReadOptions = ReadOptions(),
    out_dtype: str = "input",
    tile: Optional[Tuple[int, int, int]] = None,
    max_memory: Optional[int] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    volume: Optional[Volume] = None,
) -> FileResult:
    """`volume`: the input, already read by `read_input` (`pipeline.ReadAhead`); else read here."""
    start = time.perf_counter()
    # Half of what is free before the input is read: the plan counts the input itself (`plan_bytes`),
    # so measuring after reading would charge it twice and refuse volumes that fit.
    budget = max_memory or default_budget(0 if volume is None else volume.data.nbytes)
    if not max_memory:
        budget -= min(heap_keeps(), budget // 4)  # what glibc's heap may keep for the next pass (`heap_for`)
    vol = volume if volume is not None else read_input(input_path, read)
    if axes_warning(vol, input_path):
        log(axes_warning(vol, input_path))
    factors = config.total_factors()
    dtype = check_input(vol, config, input_path, out_dtype)
    vol = with_training_voxel_size(vol, config, input_path, log)
    unknown = [a for a, v in zip("zyx", vol.voxel_size) if v is None and (a != "z" or vol.axes != "YX")]
    if unknown:
        how = "1,y,x (z is not used for a 2D image)" if vol.axes == "YX" else "z,y,x"
        log(f"warning: {input_path} does not give its voxel size in {', '.join(unknown)} (or in a unit this "
            f"reader knows), so the output will not either; set it with --voxel-size {how} (micrometres)")
    low, high = percentiles(vol.data, config.norm)
    x = normalize(vol.data, low, high)
    read_s = time.perf_counter() - start
    arch, ensemble = memory_view(runner, config, options)  # the runner's first use: after the input's checks
    shape = tuple(n * f for n, f in zip(x.shape, factors))
    # a GPU's network passes keep their activations on the device, not in the host budget
    device_free = getattr(runner, "free_device_memory", lambda: None)()
    block_from_budget = not options.block
    if block_from_budget:
        options = replace(options, block=choose_block(budget, config.stages, arch, ensemble, device_free))
    if tile is None:
        try:
            tile = choose_tile(budget, x.shape, config.stages, arch, options.bp_iters, ensemble,
                               dtype.itemsize, AUTO_TILE_LIMIT, options.block, on_device=device_free is not None)
        except TileDoesNotFit:
            if not block_from_budget:
                raise
            need = least_budget(x.shape, config.stages, arch, options.bp_iters, ensemble, dtype.itemsize, device_free)
            raise TileDoesNotFit(budget, need, options.ensemble, options.bp_iters) from None
    else:
        if max_memory:  # a tile given with a limit must keep to it, or the run crawls past it
            check_tile_fits(tile, budget, x.shape, config, arch, options, ensemble, dtype.itemsize, device_free)
        overhead = read_overhead(x.shape, tile, total_halo(config.stages, arch, options.bp_iters))
        if overhead > TILE_OVERHEAD_WARNING:
            log(f"warning: tile {'x'.join(map(str, tile))} is small beside the network's halo: each voxel is read "
                f"about {overhead:.0f} times, which makes the run that much slower; leave --tile out to size it "
                "from the free memory")
    log(
        f"enhancing {input_path}: {'x'.join(map(str, x.shape))} -> {'x'.join(map(str, shape))} (z,y,x) with "
        f"{runner.name}, ensemble {_ensemble_state(options, len(config.stages))}, back-projection {options.bp_iters} it, "
        f"tile {'x'.join(map(str, tile))}, network passes of up to {options.block:,} voxels"
    )
    value_range = valid_range(vol.dtype, low, high, vol.data.min())
    floor = output_bounds(vol.dtype, vol.data.min())[0]
    voxel = scaled_voxel_size(vol.voxel_size, factors)
    while True:
        compute = [0.0]

        def produce():
            gen = iter_tiles(runner, config.stages, config.arch, x, replace(options, tile=tile), progress, value_range,
                             finish=lambda block: denormalize(block, low, high, dtype, floor))
            while True:
                t0 = time.perf_counter()
                item = next(gen, None)
                if item is None:
                    return
                compute[0] += time.perf_counter() - t0
                yield item
                item = None  # the writer holds the tile now: not one reference more while the next is made

        def write(tiles, out):
            for done, core in tiles:
                out.write(tuple(start for start, _ in done.out), core)

        try:
            with volume_output(output_path, shape, dtype, vol.axes, voxel) as out:
                write_behind(lambda tiles: write(tiles, out), produce())
            break
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(exc):
                raise
            smaller, block = shrink_after_oom(exc, tile, options.block)
            if smaller == tile and block == options.block:
                raise UserError(
                    f"out of memory even with tile {'x'.join(map(str, tile))}; use --no-ensemble or fewer "
                    "--bp-iters, or free memory"
                ) from None
            log(f"out of memory with tile {'x'.join(map(str, tile))}; retrying with {'x'.join(map(str, smaller))} "
                f"and network passes of up to {block:,} voxels")
            tile, options = smaller, replace(options, block=block)
    return FileResult(
        input=str(input_path), output=str(output_path), input_shape=tuple(x.shape), output_shape=shape,
        tile=tuple(tile), block=options.block, read_s=read_s, compute_s=compute[0], total_s=time.perf_counter() - start,
    )


def output_name(input_path, factors, read: ReadOptions = ReadOptions()) -> str:
    """stack.tif -> stack_x2.ome.tif (x1x2x2 for per-axis factors; stack_s1_c0_t3_x2.ome.tif when a
    series, channel or time point is picked, so each pick of one file gets its own output)."""
    name = Path(input_path).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    for letter, index in (("s", read.series), ("c", read.channel), ("t", read.time)):
        if index is not None:
            name += f"_{letter}{index}"
    tag = str(factors[0]) if len(set(factors)) == 1 else "x".join(map(str, factors))
    return f"{name}_x{tag}.ome.tif"
