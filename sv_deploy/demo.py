"""The built-in example: simulated beads through simulate -> train -> infer -> evaluate."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional, Sequence, Tuple

import click
import numpy as np

from .errors import UserError
from .factors import parse_scale
from .normalize import cast
from .simulate import bead_pair, beads
from .volume_io import check_output_folder, check_output_path, write_volume

UINT16_PEAK = 50000  # leaves head-room for cubic overshoot


def write_beads(
    outdir: Path,
    shape: Tuple[int, int, int],
    count: int,
    sigma: Tuple[float, float, float],
    window: int,
    scale: str,
    voxel_size: Tuple[float, float, float],
    seed: int,
    overwrite: bool,
) -> Tuple[Path, Path]:
    factors = parse_scale(scale)
    check_output_folder(outdir)
    if window % 2 == 0:
        raise UserError(f"--window {window} must be odd, so the PSF is centred on a voxel; e.g. --window {window + 1}")
    if any(n % f for n, f in zip(shape, factors)):
        raise UserError(f"--shape {shape} must be divisible by --scale {factors} on every axis")
    outdir.mkdir(parents=True, exist_ok=True)
    hr_path = check_output_path(outdir / "beads_hr.tif", overwrite)
    lr_path = check_output_path(outdir / "beads_lr.tif", overwrite)
    hr = beads(shape, count, sigma, window, seed)
    lr = bead_pair(hr, factors)
    written = []
    try:
        for path, vol, size in ((hr_path, hr, voxel_size), (lr_path, lr, tuple(v * f for v, f in zip(voxel_size, factors)))):
            data = cast(vol * UINT16_PEAK, np.uint16)
            write_volume(path, [data], data.shape, np.uint16, "ZYX", size)
            written.append(path)
    except BaseException:  # the pair or nothing: a lone HR volume would look like a finished run
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return hr_path, lr_path


def _run(args: Sequence[str]) -> None:
    from .cli import main

    click.secho("$ sv-deploy " + " ".join(shlex.quote(a) for a in args), bold=True, err=True)
    main.main(list(args), prog_name="sv-deploy", standalone_mode=False)


def run_demo(outdir: Path, scale: int, steps: Optional[int], overwrite: bool) -> None:
    d = str(outdir)
    shape = "40,256,256" if scale == 2 else "40,512,512"
    extra = ["--overwrite"] if overwrite else []
    _run(["simulate", "beads", d, "--shape", shape, "--beads", "400", "--scale", str(scale), *extra])
    model = f"{d}/beads.svmodel"
    train = ["train", f"{d}/beads_lr.tif", "-o", model, "--scale", str(scale), *extra]
    _run(train + (["--steps", str(steps)] if steps is not None else []))
    _run(["infer", model, f"{d}/beads_lr.tif", "-o", f"{d}/beads_lr_x{scale}.ome.tif", *extra])
    _run(["evaluate", f"{d}/beads_lr_x{scale}.ome.tif", f"{d}/beads_hr.tif", "--lowres", f"{d}/beads_lr.tif"])
    click.echo(
        f"\nHow to read it: the first row is sv-deploy's result, the others are plain interpolation; the\n"
        f"one with back-projection is the honest baseline (all the method does except the network), so\n"
        f"the gap between the first row and it is what the network learned. Files in {d}/:\n"
        f"  {'beads_hr.tif':<22} the simulated truth (the finer sampling you would like to have acquired)\n"
        f"  {'beads_lr.tif':<22} the same beads sampled x{scale} coarser: what the microscope gave\n"
        f"  {'beads.svmodel':<22} the model trained on beads_lr.tif alone ('sv-deploy info' shows it)\n"
        f"  {f'beads_lr_x{scale}.ome.tif':<22} the enhanced volume; open it beside beads_hr.tif (same voxel size)\n"
        f"Next, on your own stack: sv-deploy train stack.tif -o stack.svmodel --scale 2, then\n"
        f"sv-deploy infer stack.svmodel stack.tif -o stack_x2.ome.tif"
    )
