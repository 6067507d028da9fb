"""`sv-deploy` command line: thin shells over the library, one subcommand per step of the workflow."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from . import __version__
from .config import ArchConfig, ModelConfig, TrainConfig
from .errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff")


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


_STOPPED_BY = [2, "interrupted"]  # SIGINT's number; `_stop_cleanly_on_termination` records others


def friendly(func=None, *, stopped: str = "the output in progress was not written"):
    """One clear line and a non-zero exit for bad input, Ctrl-C and out-of-memory; no tracebacks.
    `stopped`: what Ctrl-C leaves behind, said after it."""
    if func is None:
        return functools.partial(friendly, stopped=stopped)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            # Every partial output is gone by now (removed while unwinding).
            _leave_stopped(stopped)
        except MemoryError:
            _fail("out of memory; use a smaller --tile (or --batch when training)", 3)
        except OSError as exc:  # a full disk or a share gone away mid-write (partial outputs are removed)
            where = f" ({exc.filename})" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}", 4)

    return wrapper


def _leave_stopped(what: str) -> None:
    """Exit after Ctrl-C or a termination signal, without interpreter shutdown: a native thread
    pool (torch, ONNX Runtime) tearing down after a SIGINT could kill the process by the signal
    (exit -2) instead of the promised 130."""
    click.echo(f"error: {_STOPPED_BY[1]}; {what}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + _STOPPED_BY[0])  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


def _triple(kind=int, example="16,48,48"):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            parts = tuple(kind(p) for p in str(value).split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or not all(math.isfinite(p) and p > 0 for p in parts):
            raise click.BadParameter(f"'{value}' must be three positive numbers z,y,x, e.g. {example}")
        return parts

    return parse


def _tiff_output(path: str, overwrite: bool) -> Path:
    from .volume_io import check_output_path

    if not path.lower().endswith(TIFF_SUFFIXES):
        raise UserError(f"output {path} must end in .tif or .tiff (an OME-TIFF is written)")
    return check_output_path(path, overwrite)


input_options = [
    click.option("--axes", help="Axes of the input when the file does not say (or says wrongly: a warning tells "
                 "when this differs from the file's own), e.g. ZYX, CZYX, TZCYX."),
    click.option("--channel", type=int, help="Channel to use when the input has several."),
    click.option("--time", "time_index", type=int, help="Time point to use when the input has several."),
    click.option("--series", type=click.IntRange(0), help="Image series (e.g. stage position) to use when the file holds several."),
    click.option(
        "--voxel-size", callback=_triple(float, "0.5,0.1,0.1"), help="Voxel size z,y,x in micrometres, overriding the file's."
    ),
]


def with_input_options(func):
    for option in reversed(input_options):
        func = option(func)
    return func


def _read(path, axes, channel, time_index, series, voxel_size):
    from .enhance_file import ReadOptions, read_input
    from .volume_io import axes_warning

    vol = read_input(path, ReadOptions(axes, channel, time_index, voxel_size, series))
    if axes_warning(vol, path):
        click.echo(axes_warning(vol, path), err=True)
    return vol


class _OneLineErrors(click.Group):
    """Option and argument errors as one `error:` line, like every other bad input, instead of
    click's usage block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `sv-deploy`: the overview, as click does
                click.echo(exc.ctx.get_help())
                sys.exit(exc.exit_code)
            where = exc.ctx.command_path if exc.ctx is not None else "sv-deploy"
            given = kwargs.get("args") or (args[0] if args else None) or sys.argv[1:]
            if (exc.ctx is None or exc.ctx.command is self) and given and given[0] in self.commands:
                where = f"sv-deploy {given[0]}"  # a subcommand's option without its value: that command's help
            _fail(f"{exc.format_message().rstrip('.')} (see '{where} --help')", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("interrupted", 130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sv-deploy")
def main():
    """Self-Vision resolution enhancement for fluorescence microscopy volumes.

    \b
    Typical session:
      sv-deploy train stack.tif -o stack.svmodel --scale 2
      sv-deploy infer stack.svmodel stack.tif -o stack_x2.ome.tif
    Try it on simulated beads first:  sv-deploy demo
    """
    _one_blas_thread()
    _stop_cleanly_on_termination()


def _stop_cleanly_on_termination() -> None:
    """SIGTERM (kill, a scheduler) and SIGHUP (the terminal closed) end the run as Ctrl-C does, so
    the temporary output is removed on the way out instead of being left beside the final name."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    def stop(signum, frame):
        _STOPPED_BY[:] = [signum, f"stopped by {signal.Signals(signum).name}"]
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


def _one_blas_thread() -> None:
    """NumPy's BLAS threads keep spinning after each small product (resizing training pairs, back-
    projection) and take the cores from torch's and ONNX Runtime's own pools: on 2 cores a training step
    took 0.13 s instead of 0.054 s (measured). The network runtimes do the parallel work."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


_FAST, _PAPER = TrainConfig(), TrainConfig.paper()


def _csv(values) -> str:
    return ",".join(map(str, values))


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, help="Model file to write (.svmodel).")
@click.option("--scale", default="2", show_default=True, help="Factor on every axis (2, 3, 4 or 8) or per axis z,y,x like 1,2,2; 4 and 8 train chained x2 stages.")
@click.option("--recipe", type=click.Choice(["fast", "paper"]), default="fast", show_default=True,
              help="fast: our default; paper: the authors' 1500 steps, batch 8, 8x64x64 patches per stage.")
@click.option("--steps", type=int, help=f"Training steps per stage [default: {_FAST.steps} fast, {_PAPER.steps} paper].")
@click.option("--batch", type=int, help=f"Patches per step [default: {_FAST.batch} fast, {_PAPER.batch} paper].")
@click.option("--patch", callback=_triple(int),
              help=f"Patch size z,y,x at each stage's input resolution [default: {_csv(_FAST.patch)} fast, "
                   f"{_csv(_PAPER.patch)} paper].")
@click.option("--lr", "learning_rate", type=float,
              help=f"Adam learning rate, cosine-decayed [default: {_FAST.lr:g} fast, {_PAPER.lr:g} paper].")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed; CPU runs with the same seed repeat exactly.")
@click.option("--ema", type=click.FloatRange(0.0, 1.0, max_open=True), default=TrainConfig.ema, show_default=True,
              help="Decay of the running weight average that is validated and saved (0: the raw weights).")
@click.option("--l1-weight", type=float,
              help=f"Weight of an absolute-error term beside the squared error, relative to interpolation's error "
                   f"(0: squared error alone) [default: {_FAST.l1_weight:g} fast, {_PAPER.l1_weight:g} paper].")
@click.option("--mid-layers", type=int, default=ArchConfig.mid_layers, show_default=True, help="Grouped conv layers per stage (m).")
@click.option("--groups", type=int, default=1, show_default=True, help="Groups of the mid conv layers (1, 2, 3 or 6).")
@click.option("--members", type=click.IntRange(1, 8),
              help="Networks trained from different seeds and averaged (run as one wider network). "
                   "Default: 3 for inputs below 0.3 M voxels, where single networks vary most; else 1.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--overwrite", is_flag=True, help="Replace an existing model file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@with_input_options
@friendly
def train(input_path, output, scale, recipe, steps, batch, patch, learning_rate, seed, ema, l1_weight, mid_layers, groups,
          members, device, overwrite, quiet, axes, channel, time_index, series, voxel_size):
    """Train a Self-Vision model on INPUT itself (no ground truth needed).

    \b
    Examples:
      sv-deploy train stack.tif -o stack.svmodel --scale 2
      sv-deploy train stack.tif -o stack.svmodel --scale 4 --recipe paper
      sv-deploy train cells.tif --axes CZYX --channel 1 -o cells.svmodel --scale 1,2,2
    """
    import dataclasses

    import torch

    from .config import NormConfig, Provenance
    from .factors import parse_scale, split_stages
    from .model_file import SUFFIX, save_model
    from .normalize import normalize, percentiles, valid_range
    from .backends import pick_device
    from .train import default_members, min_patch, split_for_training, train_stages
    from .volume_io import check_output_path, sha256_file

    if not output.lower().endswith(SUFFIX):
        raise UserError(f"model file {output} must end in {SUFFIX}, e.g. -o {Path(output).stem}{SUFFIX}")
    out = check_output_path(output, overwrite)
    if mid_layers < 0 or groups < 1 or 6 % groups:
        raise UserError("--mid-layers must be >= 0 and --groups must divide 6 (1, 2, 3 or 6)")
    if not math.isfinite(ema):
        raise UserError(f"--ema {ema} must be a number from 0 to below 1, e.g. 0.99")
    if any(v is not None and not 0 < v < math.inf for v in (steps, batch, learning_rate)):
        raise UserError("--steps, --batch and --lr must be positive (and --lr finite, e.g. 1e-3)")
    if l1_weight is not None and not 0 <= l1_weight < math.inf:
        raise UserError(f"--l1-weight {l1_weight} must be a number >= 0, e.g. {_FAST.l1_weight:g} (0: squared error alone)")
    vol = _read(input_path, axes, channel, time_index, series, voxel_size)
    factors = parse_scale(scale, is_2d=vol.axes == "YX")
    stages = split_stages(factors)
    cfg = TrainConfig.paper(seed) if recipe == "paper" else TrainConfig(seed=seed)
    overrides = {k: v for k, v in dict(steps=steps, batch=batch, patch=patch, lr=learning_rate,
                                       l1_weight=l1_weight).items() if v is not None}
    cfg = dataclasses.replace(cfg, ema=ema, **overrides)
    if vol.axes == "YX":
        cfg = dataclasses.replace(cfg, patch=(1, cfg.patch[1], cfg.patch[2]))
    least = min_patch(stages[0])
    if any(p < m for p, m in zip(cfg.patch, least)):
        raise UserError(f"--patch {_csv(cfg.patch)} is smaller than a stage at scale {'x'.join(map(str, stages[0]))} "
                        f"can learn from; use at least {_csv(least)}")
    arch = ArchConfig(mid_layers=mid_layers, groups=groups, members=members or default_members(vol.data.size))
    norm = NormConfig()
    dev = pick_device(device)
    used = split_for_training(vol.data.shape, cfg.patch, stages[0])[2]  # refuses a too-small volume before any work
    if patch is not None and used != cfg.patch:
        click.echo(f"note: --patch {_csv(cfg.patch)} is larger than the volume less the strip held out to check the "
                   f"network; stage 1 trains on {_csv(used)} patches", err=True)
    click.echo(
        f"training on {input_path}: {'x'.join(map(str, vol.data.shape))} (z,y,x) {vol.dtype}, scale "
        f"{'x'.join(map(str, factors))} in {len(stages)} stage(s); {recipe} recipe: {cfg.steps} steps per stage"
        f"{f' and network ({arch.members} averaged)' if arch.members > 1 else ''}, batch {cfg.batch}, patch "
        f"{_csv(used)}, lr {cfg.lr:g}; device {dev}",
        err=True,
    )
    start = time.perf_counter()
    low, high = percentiles(vol.data, norm)
    trained, reports = train_stages(
        normalize(vol.data, low, high), stages, arch, cfg, dev, progress=not quiet,
        log=lambda m: click.echo(m, err=True), value_range=valid_range(vol.dtype, low, high, vol.data.min()),
    )
    provenance = Provenance(
        input_name=Path(input_path).name,
        input_sha256=sha256_file(input_path),
        input_shape=tuple(vol.data.shape),
        input_dtype=str(vol.dtype),
        stages=tuple(reports),
        duration_s=time.perf_counter() - start,
        device=str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=(("sv-deploy", __version__), ("torch", torch.__version__), ("numpy", np.__version__),
                  ("python", platform.python_version())),
    )
    config = ModelConfig(
        stages=stages, arch=arch, norm=norm, norm_values=(low, high), axes=vol.axes,
        voxel_size=vol.voxel_size, train=cfg, provenance=provenance,
    )
    digest = save_model(out, config, trained)
    click.echo(f"wrote {out} ({provenance.duration_s:.0f} s of training; file checksum {digest[:12]}, which "
               "covers the training record too, so it differs between runs)", err=True)
    from .enhance_file import ReadOptions, output_name

    read = ReadOptions(axes, channel, time_index, voxel_size, series)
    beside = Path(input_path).parent / output_name(input_path, factors, read)  # where infer would put it: by the input
    click.echo(f"next: {_infer_command(out, input_path, beside, read)}", err=True)
    _prepare_cpu_inference(out, config, trained, digest)


def _infer_command(model, path, out, read) -> str:
    """The infer command for the input a model was trained on, with its selection options, quoted
    for a POSIX shell."""
    import shlex

    words = ["sv-deploy", "infer", str(model), str(path), "-o", str(out)]
    for flag, value in (("--axes", read.axes), ("--channel", read.channel), ("--time", read.time),
                        ("--series", read.series), ("--voxel-size", read.voxel_size)):
        if value is not None:
            words += [flag, ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _prepare_cpu_inference(model_path, config, stages, digest) -> None:
    """Settle now which backend `infer` runs on this CPU (timed once per machine and kind of model)
    and, if ONNX Runtime, fill its export cache (with the ensemble folded in, as infer's default
    runs it), so the first `infer` pays neither (seconds)."""
    from .backends import auto_backend

    if auto_backend("svmodel", "auto") != "measure":
        return
    from .cpu_choice import choose
    from .onnx_cache import cached_export

    try:
        if choose(str(model_path), config, True, log=lambda m: click.echo(m, err=True)) == "onnxruntime":
            cached_export(config, [s.cpu() for s in stages], digest, log=lambda m: None, folded=True)
    except KeyboardInterrupt:
        _leave_stopped(f"{model_path} is written and complete; only the timing of the CPU backends for "
                       "'infer' was cut short, and infer does it itself")
    except Exception as exc:  # noqa: BLE001 - the model file is written; this is only a speed-up
        click.echo(f"warning: could not prepare inference on this CPU ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); 'infer' will try again", err=True)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("inputs", metavar="INPUT...", nargs=-1)
@click.option("-o", "--output", required=True,
              help="Output OME-TIFF for one INPUT; a folder for several, for globs and for --watch.")
@click.option("--ensemble/--no-ensemble", default=True, show_default=True, help="8-way geometric self-ensemble.")
@click.option("--bp-iters", type=click.IntRange(0, 100), default=10, show_default=True,
              help="Back-projection iterations against the input, after the last stage (a x4 chain's stages "
                   "are back-projected once, together; 0 = off).")
@click.option("--tile", callback=_triple(int, "32,96,96"), help="Tile core z,y,x in input voxels (default: the largest that fits --max-memory).")
@click.option("--max-memory", help="Working memory to plan tiles for, e.g. 2G (default: half the free RAM).")
@click.option("--dtype", "out_dtype", type=click.Choice(["input", "float32", "uint8", "uint16"]), default="input",
              show_default=True, help="Output pixel type.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="auto: .onnx -> onnxruntime, .trt.json -> tensorrt, .svmodel -> torch on a CUDA GPU and on a CPU "
                   "the faster of onnxruntime and torch there, timed once per machine and kind of run (2D/3D, "
                   "with or without the ensemble; seconds to a minute, kept in the cache folder, see README).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--compile", "compile_net", is_flag=True,
              help="Run a .svmodel's network through torch.compile (implies --backend torch): each new pass "
                   "shape compiles first (seconds to minutes), so it pays off over many files of one size, "
                   "e.g. with --watch. Needs a C++ compiler on a CPU, Triton on a GPU; without them it "
                   "warns and runs uncompiled. On the 2-core AMD CPUs measured ONNX Runtime was faster, on an "
                   "Intel one compiled torch: 'sv-deploy bench' shows which on yours.")
@click.option("--watch", "watch_dir", type=click.Path(file_okay=False), help="Keep running: enhance each TIFF that lands in this folder.")
@click.option("--settle", type=click.FloatRange(min=0), help="--watch: seconds a file must stay unchanged before it is "
              "read; set it above the longest pause of your acquisition software while it writes a file.  [default: 2]")
@click.option("--exit-when-idle", type=click.FloatRange(min=0),
              help="--watch: stop after this many seconds without a new file (default: run until Ctrl-C).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@with_input_options
@friendly
def infer(model, inputs, output, ensemble, bp_iters, tile, max_memory, out_dtype, backend, device, compile_net,
          watch_dir, settle,
          exit_when_idle, overwrite, quiet, axes, channel, time_index, series, voxel_size):
    """Enhance INPUT(s) with MODEL; write OME-TIFFs with the voxel size divided by the factors.

    MODEL is a .svmodel from 'train', or a .onnx / .trt.json from 'export'. It is loaded once for
    all inputs. INPUT may be a glob ('acq/*.tif') or a folder (its TIFF files). With several inputs
    a file that fails is reported and skipped, and each next file is read while the current one is
    enhanced (unless --max-memory is given or the file is large beside the free memory).

    \b
    Examples:
      sv-deploy infer stack.svmodel stack.tif -o stack_x2.ome.tif
      sv-deploy infer stack.svmodel 'day1/*.tif' -o enhanced/
      sv-deploy infer stack.svmodel day2/ -o enhanced/
      sv-deploy infer export/stack.onnx --watch incoming/ -o enhanced/
      sv-deploy infer stack.svmodel big.tif -o big_x2.ome.tif --max-memory 2G --no-ensemble
    """
    from .backends import BackendUnavailable, open_backend
    from .enhance import InferenceOptions
    from .enhance_file import ReadOptions, check_input, enhance_file, output_name, read_input
    from .memory import parse_size
    from .pipeline import ReadAhead
    from .volume_io import check_output_folder

    start = time.perf_counter()
    if not watch_dir and (settle is not None or exit_when_idle is not None):
        raise UserError(f"{'--settle' if settle is not None else '--exit-when-idle'} only applies with --watch FOLDER")
    settle = 2.0 if settle is None else settle
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    paths = _unique(_expand(inputs), log)
    if not paths and not watch_dir:
        raise UserError("no INPUT given; name one or more TIFF files, a glob, or use --watch FOLDER")
    why_folder = ("--watch is on" if watch_dir else f"there are {len(paths)} inputs" if len(paths) > 1
                  else f"INPUT {inputs[0]} is a glob" if any(_is_glob(i) for i in inputs)
                  else f"INPUT {inputs[0]} is a folder" if any(Path(i).is_dir() for i in inputs) else None)
    single = why_folder is None and not output.endswith(("/", "\\")) and not Path(output).is_dir()
    if single:
        _tiff_output(output, overwrite)
        if Path(output).resolve() == Path(paths[0]).resolve():
            raise UserError(f"-o {output} is the input itself; write the enhanced volume to another file")
    elif why_folder and output.lower().endswith(TIFF_SUFFIXES) and not Path(output).is_dir():
        raise UserError(f"-o {output} names one file, but {why_folder}: give a folder, e.g. -o enhanced/")
    else:
        if Path(output).exists() and not Path(output).is_dir():
            raise UserError(f"{output} is a file; with several inputs or --watch, -o must be a folder")
        check_output_folder(output)
    budget = parse_size(max_memory) if max_memory is not None else None
    if budget is not None and budget <= 0:
        raise UserError(f"--max-memory {max_memory} must be more than 0, e.g. 512M or 2G")
    config, runner = open_backend(model, backend, device, log=log, ensemble=ensemble, compile=compile_net)
    options = InferenceOptions(ensemble=ensemble, bp_iters=bp_iters, interpolate=config.interpolation_stages())
    for i in options.interpolate if not quiet else ():
        log(f"stage {i + 1}: its network learned nothing in training, so it runs as cubic interpolation "
            "(the same result, without the network)")
    read = ReadOptions(axes, channel, time_index, voxel_size, series)

    tile = tile or getattr(runner, "tile", None)  # a TensorRT engine brings the tile it was built for

    def ready(path, volume):
        """The input's own checks, then the backend (on a CPU timed here on first use)."""
        check_input(volume, config, path, out_dtype)
        if hasattr(runner, "resolve"):
            runner.resolve()

    def run_one(path, out, volume=None):
        result = enhance_file(runner, config, path, out, options, read, out_dtype, tile, budget, not quiet, log,
                              volume=volume)
        log(f"wrote {out} in {result.total_s:.1f} s (read {result.read_s:.1f} s, compute {result.compute_s:.1f} s)")
        return result

    if single:
        volume = read_input(paths[0], read)
        ready(paths[0], volume)
        run_one(paths[0], Path(output), volume)
        return
    outdir = Path(output)
    if watch_dir:
        folder = Path(watch_dir)
        if not folder.is_dir():
            raise UserError(f"--watch folder {folder} does not exist")
        if folder.resolve() == outdir.resolve():
            raise UserError("-o must be another folder than --watch, or outputs would be enhanced again")
    factors = config.total_factors()
    out_of = lambda path: outdir / output_name(path, factors, read)  # noqa: E731
    paths = _batch_inputs(paths, out_of, log)
    _check_distinct_outputs(paths, out_of)
    outdir.mkdir(parents=True, exist_ok=True)
    done, skipped, failed = [], [], []
    written = {}  # output -> the input it was made from in this run
    current = []  # the input being enhanced, for the message when interrupted
    reader = ReadAhead(lambda path: read_input(path, read), version=_file_version)

    def wanted(path) -> bool:
        """Also when this run wrote its output: a watched file handed over again has changed since
        (an acquisition that paused longer than --settle), and its first output is stale."""
        out = out_of(path)
        return overwrite or not out.exists() or written.get(out) == str(Path(path).resolve())

    def handle(path, upcoming=None):
        out = out_of(path)
        source = str(Path(path).resolve())
        try:
            if written.get(out, source) != source:
                raise UserError(f"its output {out} was already written from {written[out]} in this run; "
                                "rename one of the two files")
            if not wanted(path):
                skipped.append(path)
                log(f"skipped {path}: {out} already exists (pass --overwrite to replace it)")
                return
            if written.get(out) == source:
                log(f"{path} changed after it was enhanced; enhancing it again")
            current.append(path)
            try:
                volume = reader.take(path)
                ready(path, volume)  # the backend is timed before the next read starts
            finally:  # even when this one fails to read
                if upcoming is not None and wanted(upcoming) and _may_read_ahead(upcoming, budget):
                    reader.prefetch(upcoming)  # read while this one is enhanced
            done.append(run_one(path, out, volume))
            current.clear()
            written[out] = source
            failed[:] = [p for p in failed if p != path]  # a watched file that failed half-written, now through
            if len(done) == 1:
                log(f"time to first output: {time.perf_counter() - start:.1f} s")
        except BackendUnavailable:
            raise  # no file would run
        except UserError as exc:
            fail(path, f"error: {exc}" if str(path) in str(exc) else f"error: {path}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one bad acquisition must not end a batch or a watch
            fail(path, f"error: {path}: unexpected {type(exc).__name__}: {exc}; skipped")

    def fail(path, message):
        current.clear()
        if path not in failed:
            failed.append(path)
        watched = watch_dir and Path(path).resolve().parent == Path(watch_dir).resolve()
        log(message + ("; tried again if the file changes" if watched else ""))

    def summary() -> str:
        return (f"enhanced {len(written)} file(s), {len(failed)} failed"
                + (f" ({', '.join(map(str, failed))})" if failed else "")
                + (f", {len(skipped)} skipped (output exists)" if skipped else ""))

    given = {}  # each INPUT's version when it was enhanced: the watch takes it again only once it changes
    try:
        try:
            for path, upcoming in zip(paths, [*paths[1:], None]):
                given[str(Path(path).resolve())] = _file_version(path)
                handle(path, upcoming)
        except KeyboardInterrupt:
            if current:
                log(f"interrupted while enhancing {current[0]}; its output was not written")
            log(summary())
            raise
        if watch_dir:
            from .watch import watch

            log(f"watching {folder} for new TIFF files (Ctrl-C to stop)")
            try:
                watch(folder, handle, settle=settle, idle_exit=exit_when_idle,
                      skip=lambda p: given.get(str(Path(p).resolve()), ()) == _file_version(p), log=log)
            except KeyboardInterrupt:
                if current:
                    log(f"interrupted while enhancing {current[0]}; its output was not written (it is enhanced "
                        "on the next run)")
                log("stopped watching")
    finally:  # after the watch too: it reads ahead with the same reader
        reader.close()
    log(summary())
    if failed:
        sys.exit(1)


def _unique(paths, log) -> list:
    """Each input once (a file named twice, or matched by two globs)."""
    unique, seen = [], set()
    for path in paths:
        if Path(path).resolve() not in seen:
            seen.add(Path(path).resolve())
            unique.append(path)
    if len(unique) < len(paths):
        log(f"note: {len(paths) - len(unique)} input(s) named more than once; each is enhanced once")
    return unique


def _batch_inputs(paths, out_of, log) -> list:
    """None that is this batch's output of another input: a batch run again with -o its own input
    folder must not enhance what it wrote the first time."""
    outputs = {out_of(path).resolve() for path in paths}
    own = [path for path in paths if Path(path).resolve() in outputs]
    if own:
        log(f"note: leaving out {len(own)} input(s) that are this batch's own outputs: "
            f"{', '.join(map(str, own[:3]))}{', ...' if len(own) > 3 else ''}")
    return [path for path in paths if path not in own]


def _check_distinct_outputs(paths, out_of) -> None:
    """Two inputs with the same name (d1/x.tif, d2/x.tif, x.tiff) would write one output: refuse first."""
    planned = {}
    for path in paths:
        out = out_of(path)
        if out in planned and Path(planned[out]).resolve() != Path(path).resolve():
            raise UserError(f"{planned[out]} and {path} would both be written to {out}; enhance them in "
                            "separate runs with different -o folders, or rename one")
        planned[out] = path


def _file_version(path):
    """What tells a file rewritten since it was read ahead (None: gone or unreadable)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _may_read_ahead(path, budget) -> bool:
    """Read `path` while the file before it is enhanced? Not under --max-memory (the copy read
    ahead would sit outside the limit the user set), nor when it is large beside the free memory."""
    from .memory import available_bytes, may_read_ahead

    try:
        size = Path(path).stat().st_size
    except OSError:
        return False  # reported when its turn comes
    return budget is None and may_read_ahead(size, available_bytes())


def _is_glob(item: str) -> bool:
    return any(ch in item for ch in "*?[") and not Path(item).exists()


def _expand(inputs) -> list:
    """Paths as given, globs expanded (sorted), a folder as the TIFF files in it (as --watch takes
    them); a glob or a folder that gives nothing is an error."""
    import glob

    from .watch import snapshot

    paths = []
    for item in inputs:
        if _is_glob(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise UserError(f"no files match '{item}'")
            paths.extend(matches)
        elif Path(item).is_dir():
            found = sorted(snapshot(Path(item)))
            if not found:
                raise UserError(f"the folder {item} holds no .tif or .tiff files")
            paths.extend(found)
        else:
            paths.append(item)
    return paths


@main.command()
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=False))
@click.argument("reference", type=click.Path(dir_okay=False))
@click.option("--lowres", type=click.Path(dir_okay=False), help="The LR input: adds tricubic and tricubic + back-projection rows.")
@click.option("--bp-iters", type=click.IntRange(0, 100), default=10, show_default=True,
              help="Back-projection iterations for the no-network baseline.")
@click.option("--axes", help="Axes of REFERENCE and --lowres when the files do not say, e.g. ZYX, CZYX.")
@click.option("--channel", type=int, help="Channel of REFERENCE and --lowres when they have several.")
@click.option("--time", "time_index", type=int, help="Time point of REFERENCE and --lowres when they have several.")
@click.option("--series", type=click.IntRange(0), help="Image series of REFERENCE and --lowres when they hold several.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table (scores that are infinite, "
              "for identical volumes, are null).")
@friendly(stopped="nothing was written")
def evaluate(output_path, reference, lowres, bp_iters, axes, channel, time_index, series, as_json):
    """Score OUTPUT against REFERENCE (PSNR, 3D SSIM, NRMSE), beside tricubic baselines.

    \b
    Each candidate is matched to the reference by the gain and offset that minimise the squared
    error before scoring (volumes normalised separately differ by a global gain); raw scores are
    shown too. The data range is the reference's.
    Example:
      sv-deploy evaluate beads_x4.ome.tif beads_hr.tif --lowres beads_lr.tif
    """
    from .evaluate import evaluate as run_evaluate, format_table, infer_factors, voxel_size_mismatch
    from .volume_io import axes_warning, check_not_constant, read_volume

    def read_given(path):
        vol = read_volume(path, axes=axes, channel=channel, time=time_index, series=series)
        if axes_warning(vol, path):
            click.echo(axes_warning(vol, path), err=True)
        return vol

    ref_vol = read_given(reference)
    check_not_constant(ref_vol, str(reference), "a reference needs a data range to score against")
    out = read_volume(output_path).data
    if out.min() == out.max():  # scored all the same (its gain matched to 0), but worth a look
        click.echo(f"warning: {output_path} is constant (every voxel {out.flat[0]}): its scores are those of a blank "
                   "volume; was the enhancement written in full?", err=True)
    lr_vol = read_given(lowres) if lowres else None
    lr = lr_vol.data if lr_vol is not None else None
    if lr_vol is not None:
        factors = infer_factors(ref_vol.data.shape, lr.shape)
        mismatch = voxel_size_mismatch(ref_vol.voxel_size, lr_vol.voxel_size, factors)
        if mismatch:
            click.echo(f"warning: --lowres {lowres} has voxels of {_sizes(lr_vol.voxel_size)} um, not the reference's "
                       f"{_sizes(ref_vol.voxel_size)} um times {'x'.join(map(str, factors))} (its shape's factors) in "
                       f"{mismatch}: is it the input this output was made from?", err=True)
    rows = run_evaluate(out, ref_vol.data, lr, bp_iters, output_name=f"output ({Path(output_path).name})")
    if as_json:
        report = {
            "output": str(output_path), "reference": str(reference), "lowres": str(lowres) if lowres else None,
            "shape": list(ref_vol.data.shape),
            "factors": list(infer_factors(ref_vol.data.shape, lr.shape)) if lr is not None else None,
            "bp_iters": bp_iters if lr is not None else None,
            "rows": [r.to_dict() for r in rows],
        }
        click.echo(json.dumps(_finite(report), indent=2, allow_nan=False))
    else:
        click.echo(format_table(rows))


def _sizes(voxel_size) -> str:
    return ",".join("?" if v is None else f"{v:g}" for v in voxel_size)


def _finite(value):
    """JSON has no Infinity or NaN: such scores (identical volumes) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@main.group()
def simulate():
    """Make synthetic test data.

    \b
    Example:
      sv-deploy simulate beads data/
    """


@simulate.command("beads")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--shape", callback=_triple(int, "60,512,512"), default="60,512,512", show_default=True, help="High-resolution size z,y,x.")
@click.option("--beads", "count", type=click.IntRange(1), default=125, show_default=True, help="Number of beads.")
@click.option("--sigma", callback=_triple(float, "2.5,1,1"), default="2.5,1,1", show_default=True, help="Gaussian PSF sigma z,y,x in voxels.")
@click.option("--window", type=click.IntRange(1), default=13, show_default=True, help="PSF window size in voxels (odd).")
@click.option("--scale", default="4", show_default=True, help="Downsampling factor of the LR copy (or z,y,x).")
@click.option("--voxel-size", callback=_triple(float, "0.4,0.1,0.1"), default="0.4,0.1,0.1", show_default=True,
              help="High-resolution voxel size z,y,x in micrometres.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the bead positions.")
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
@friendly
def simulate_beads(outdir, shape, count, sigma, window, scale, voxel_size, seed, overwrite):
    """Bead phantom of the paper: writes OUTDIR/beads_hr.tif and OUTDIR/beads_lr.tif (uint16).

    \b
    Example:
      sv-deploy simulate beads data/ --shape 40,256,256 --scale 2
    """
    from .demo import write_beads

    hr, lr = write_beads(Path(outdir), shape, count, sigma, window, scale, voxel_size, seed, overwrite)
    click.echo(f"wrote {hr} and {lr}", err=True)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False), help="Directory for the .onnx (and engine) files.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the graph; TensorRT 11 builds the engine in the graph's precision.")
@click.option("--engine", is_flag=True, help="Also build TensorRT engines (needs tensorrt and an NVIDIA GPU).")
@click.option("--plugin/--no-plugin", default=None,
              help="Engine shuffle: our PixelShuffle3D plugin, or TensorRT's own ops from the ONNX function.  "
                   "[default: plugin]")
@click.option("--tile", callback=_triple(int, "32,96,96"),
              help="Tile core z,y,x the engine is optimised for; infer then uses it [default: 32,96,96].")
@click.option("--bp-iters", type=click.IntRange(0, 100),
              help="Back-projection iterations the engine's largest tile must allow (sets its halo).  [default: 10]")
@click.option("--overwrite", is_flag=True, help="Replace existing files in OUTDIR.")
@friendly
def export(model, outdir, precision, engine, plugin, tile, bp_iters, overwrite):
    """Export MODEL to one ONNX file (all stages chained) and, with --engine, a TensorRT engine.

    Writes OUTDIR/NAME.onnx (NAME.fp16.onnx with --precision fp16); with --engine also one engine
    per stage and NAME.plugin.trt.json (NAME.builtin.trt.json with --no-plugin), the manifest infer
    takes. --plugin, --tile and --bp-iters only apply with --engine.

    The ONNX runs on ONNX Runtime anywhere: 'sv-deploy infer OUTDIR/NAME.onnx INPUT -o OUT'.

    \b
    Examples:
      sv-deploy export stack.svmodel -o export/
      sv-deploy export stack.svmodel -o export/ --precision fp16 --engine --tile 16,128,128
    """
    from .export import onnx_path, save_onnx, to_onnx
    from .model_file import load_model
    from .volume_io import check_output_folder, check_output_path

    engine_only = [o for o, v in (("--tile", tile), ("--bp-iters", bp_iters), ("--plugin/--no-plugin", plugin))
                   if v is not None]
    if engine_only and not engine:
        verb = "applies" if len(engine_only) == 1 else "apply"
        raise UserError(f"{' and '.join(engine_only)} only {verb} to TensorRT engines: add --engine, or leave them out")
    plugin = True if plugin is None else plugin
    bp_iters = 10 if bp_iters is None else bp_iters
    src = Path(model)
    dest = Path(outdir)
    target = onnx_path(dest, src, precision)
    if engine:
        from .trt_engine import require_tensorrt

        require_tensorrt()  # before any file is written
    config, stages, digest = load_model(src)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file; -o takes a directory")
    check_output_folder(dest)
    dest.mkdir(parents=True, exist_ok=True)
    check_output_path(target, overwrite)
    click.echo(f"exporting {src} ({len(stages)} stage(s), {precision}) to ONNX...", err=True)
    graph = to_onnx(config, stages, digest, precision)
    save_onnx(graph, target)
    click.echo(f"wrote {target} (checked with onnx.checker, full check)", err=True)
    if engine:
        from .enhance import InferenceOptions
        from .trt_engine import build_engines

        options = InferenceOptions(bp_iters=bp_iters, **({"tile": tile} if tile else {}))
        manifest = build_engines(target, graph, options, plugin=plugin, overwrite=overwrite,
                                 log=lambda m: click.echo(m, err=True))
        click.echo(f"wrote {manifest}", err=True)


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="Small volumes, one run each (unless --runs), no torch compiled, no paper-"
              "recipe training, the ensemble run member by member: a check of every code path in under a minute, "
              "not a measurement.")
@click.option("--runs", type=click.IntRange(1), help="Timed runs per row, after one warm-up.  [default: 3; 1 with --quick]")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Keep running a row until this much time is spent.")
@click.option("--backend", "only", multiple=True,
              help="Only backends whose name contains this, any case (repeatable): torch eager, torch compiled, "
                   "onnxruntime, tensorrt, cpu, cuda.  [default: all]")
@click.option("--task", "select", multiple=True, type=click.Choice(["2d", "3d", "files"]),
              help="Only these inference tasks (repeatable); files: only the --input files.")
@click.option("--input", "inputs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Also time the tasks on this volume of your own (repeatable).")
@click.option("--model", type=click.Path(exists=True, dir_okay=False),
              help="Model for the --input files (default: an untrained x4 model of their kind; speed does not "
                   "depend on the weights).")
@click.option("--no-training", is_flag=True, help="Skip the training rows.")
@click.option("--repeated-only", is_flag=True,
              help="Only the repeated-inference rows (model loaded once, several files in a row); no training.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout.")
@click.option("--overwrite", is_flag=True, help="Replace the report of an earlier bench in OUTDIR.")
@with_input_options
@friendly
def bench(outdir, quick, runs, min_seconds, only, select, inputs, model, no_training, repeated_only, as_json,
          overwrite, axes, channel, time_index, series, voxel_size):
    """Time the paper's tasks (Table 1) on every available backend; write JSON, Markdown and a PNG.

    Tasks: 2D 256x256 -> 1024x1024 and 3D 38x256x256 -> 152x1024x1024 (x4), each with the full recipe
    (8-way ensemble, back-projection) and a fast mode (no ensemble); training with our default and
    the paper's recipe. The paper's TITAN X numbers are reference rows. Repeated inference: the
    model file loaded once and several files enhanced in a row, with the time to first output and
    the per-file time.

    \b
    Examples:
      sv-deploy bench bench-out --quick
      sv-deploy bench bench-out --runs 5 --backend onnxruntime --backend torch
      sv-deploy bench bench-out --repeated-only --backend onnxruntime
      sv-deploy bench bench-out --task files --input stack.tif --model stack.svmodel --no-training
    """
    from .bench import SERIES_BACKENDS, check_backend_options, chosen, run_bench
    from .enhance_file import ReadOptions

    if "files" in select and not inputs:
        raise UserError("--task files times the --input files, but none was given; add --input FILE")
    if model and not inputs:
        raise UserError("--model is the model for the --input files (the paper's tasks use an untrained model of "
                        "their own); add --input FILE")
    if model and not model.lower().endswith(".svmodel"):
        raise UserError(f"--model {model}: bench exports and times a .svmodel itself on each backend; give the .svmodel")
    report_file = Path(outdir) / "bench.json"
    if report_file.exists() and not overwrite:
        raise UserError(f"{outdir} holds the report of an earlier bench; choose another OUTDIR or pass --overwrite")
    check_backend_options(only)
    if repeated_only and only and not any(chosen(name, only) for name in SERIES_BACKENDS):
        raise UserError(f"--repeated-only runs on {' and '.join(SERIES_BACKENDS)} (a .svmodel's own paths); "
                        f"--backend {' / '.join(only)} picks neither")
    runs = runs or (1 if quick else 3)
    command = "sv-deploy bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "sv-deploy bench"
    report = run_bench(Path(outdir), quick=quick, training=not (no_training or repeated_only), runs=runs,
                       min_seconds=min_seconds, only=only, command=command, log=lambda m: click.echo(m, err=True),
                       select=select, single=not repeated_only, inputs=[Path(p) for p in inputs],
                       model=Path(model) if model else None,
                       read=ReadOptions(axes, channel, time_index, voxel_size, series))
    click.echo(f"wrote {outdir}/bench.json, bench.md, bench.png in {report['seconds']:.0f} s", err=True)
    if as_json:
        click.echo(json.dumps(report, indent=2))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@friendly(stopped="nothing was written")
def info(model):
    """Show a model's configuration and training provenance (JSON): a .svmodel, its .onnx export
    (both checked against their checksum first) or a TensorRT engine manifest (.trt.json).

    \b
    Examples:
      sv-deploy info stack.svmodel
      sv-deploy info export/stack.onnx
      sv-deploy info export/stack.plugin.trt.json
    """
    if model.lower().endswith(".json"):
        from .trt_engine import read_manifest

        manifest = read_manifest(model)
        shown = json.loads(manifest.to_json())
        try:
            shown["config"] = json.loads(ModelConfig.from_json(manifest.config).to_json())
        except ValueError as exc:
            raise UserError(f"{model}: the model config in it cannot be read ({exc}); rebuild the engine") from None
    elif model.lower().endswith(".onnx"):
        from .onnx_graph import read_metadata
        from .ort_backend import load_onnx, onnx_config

        graph = load_onnx(model)  # verifies the export's digest
        meta = read_metadata(graph)
        config = onnx_config(graph)
        shown = {"sha256": meta["sha256"], "checksum": "verified", "source_sha256": meta.get("source_sha256"),
                 "precision": meta.get("precision"), "folded_ensemble": meta.get("folded_ensemble") == "1",
                 "halo": int(meta["halo"]) if meta.get("halo") else None,
                 "opset": max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=None),
                 "ir_version": graph.ir_version, "exported_with": json.loads(meta.get("versions") or "{}"),
                 "config": json.loads(config.to_json())}
    else:
        from .model_file import load_model

        config, _, digest = load_model(model)  # verifies the checksum over weights and config
        shown = {"sha256": digest, "checksum": "verified", "config": json.loads(config.to_json())}
    if not model.lower().endswith(".json"):
        # stages whose network learned nothing run as cubic interpolation (`train`'s warning said so)
        shown["stages_run_as_interpolation"] = [i + 1 for i in config.interpolation_stages()]
    click.echo(json.dumps(shown, indent=2))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False), default="sv-deploy-demo")
@click.option("--scale", type=click.Choice(["2", "4"]), default="2", show_default=True,
              help="Enhancement factor on every axis (4: two x2 stages, about twice the time).")
@click.option("--steps", type=click.IntRange(1), help=f"Training steps per stage [default: {_FAST.steps}, the fast recipe].")
@click.option("--overwrite", is_flag=True, help="Replace files from an earlier demo run.")
@friendly
def demo(outdir, scale, steps, overwrite):
    """Run the whole workflow on simulated beads: simulate -> train -> infer -> evaluate.

    Needs no files of your own; prints each step's command and the final score table. Files go
    to OUTDIR (default: sv-deploy-demo).

    \b
    Examples:
      sv-deploy demo
      sv-deploy demo demo-x4 --scale 4
    """
    from .demo import run_demo

    run_demo(Path(outdir), int(scale), steps, overwrite)
