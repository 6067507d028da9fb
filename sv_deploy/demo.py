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
from .volume_io import check_output_path, scaled_voxel_size, write_volume

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
    if any(n % f for n, f in zip(shape, factors)):
        raise UserError(f"--shape {shape} must be divisible by --scale {factors} on every axis")
    outdir.mkdir(parents=True, exist_ok=True)
    hr_path = check_output_path(outdir / "beads_hr.tif", overwrite)
    lr_path = check_output_path(outdir / "beads_lr.tif", overwrite)
    hr = beads(shape, count, sigma, window, seed)
    lr = bead_pair(hr, factors)
    for path, vol, size in ((hr_path, hr, voxel_size), (lr_path, lr, scaled_voxel_size(voxel_size, factors))):
        data = cast(vol * UINT16_PEAK, np.uint16)
        write_volume(path, [data], data.shape, np.uint16, "ZYX", size)
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
    _run(["infer", model, f"{d}/beads_lr.tif", "-o", f"{d}/beads_x{scale}.ome.tif", *extra])
    _run(["evaluate", f"{d}/beads_x{scale}.ome.tif", f"{d}/beads_hr.tif", "--lowres", f"{d}/beads_lr.tif"])
