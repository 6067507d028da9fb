"""`sv-deploy bench`: the paper's Table 1 tasks on every available backend, in one process and one report.

Timing does not depend on the weights, so inference uses freshly initialised networks of the real
architecture on synthetic bead volumes of the paper's sizes; training times the real training code.
Each timed run is a whole file-to-file `enhance_file` call (read TIFF, enhance, write OME-TIFF), which
also reports its compute time, so both come from the same runs.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
from .bench_stats import PAPER, fastest, markdown, speedup, summarize, table
from .config import ArchConfig, ModelConfig, Shape3, TrainConfig
from .enhance import InferenceOptions
from .enhance_file import ReadOptions, enhance_file, read_input
from .errors import UserError
from .machine import machine
from .model_file import load_model, save_model
from .model import SVStage
from .normalize import normalize, percentiles
from .pipeline import ReadAhead
from .simulate import beads
from .volume_io import check_output_folder, write_volume


@dataclass(frozen=True)
class Task:
    name: str
    shape: Shape3
    stages: tuple
    paper_s: Optional[float]
    source: Optional[Path] = None  # a user's file: its volume replaces the synthetic one


def file_task(path: Path, read, model: Optional[Path]) -> Tuple[Task, np.ndarray]:
    """A task on a user's own volume: x4 on every axis it has (as the paper's tasks), or the
    factors of `model`. Reading it checks it as `infer` would, before anything is timed."""
    from .enhance_file import read_input

    vol = read_input(path, read)
    is_2d = vol.axes == "YX"
    stages = ((1, 2, 2),) * 2 if is_2d else ((2, 2, 2),) * 2
    if model is not None:
        config = load_model(model)[0]
        stages = config.stages
        if config.axes == "YX" and not is_2d:
            raise UserError(f"{model} enhances 2D images, but {path} is a "
                            f"{'x'.join(map(str, vol.data.shape))} (z,y,x) stack; bench it with a 3D model")
        if is_2d and config.total_factors()[0] != 1:
            raise UserError(f"{model} scales z, but {path} is a 2D image; bench it with a 2D model")
    return Task(f"file {path.name}", tuple(vol.data.shape), tuple(stages), None, source=path), vol.data


def tasks(quick: bool) -> List[Task]:
    if quick:  # the same code paths on small volumes, so a fresh install checks out in under a minute
        return [Task("2d", (1, 64, 64), ((1, 2, 2), (1, 2, 2)), None),
                Task("3d", (8, 48, 48), ((2, 2, 2), (2, 2, 2)), None)]
    return [Task("2d", (1, 256, 256), ((1, 2, 2), (1, 2, 2)), PAPER["2d_s"]),
            Task("3d", (38, 256, 256), ((2, 2, 2), (2, 2, 2)), PAPER["3d_s"])]


MODES = {"full": InferenceOptions(ensemble=True, bp_iters=10), "fast": InferenceOptions(ensemble=False, bp_iters=10)}


def synthetic_volume(shape: Shape3, seed: int = 0) -> np.ndarray:
    count = max(20, int(np.prod(shape) // 4000))
    sigma = (1.5, 1.0, 1.0) if shape[0] > 1 else (0.0, 1.0, 1.0)
    vol = beads(shape, count=count, sigma=sigma, window=7, seed=seed) if shape[0] > 1 else \
        beads((1, *shape[1:]), count=count, sigma=(1e-3, 1.0, 1.0), window=7, seed=seed)
    return (vol * 60000 + 100).astype(np.uint16)


def fresh_model(stages, seed: int = 0, axes: str = "ZYX"):
    torch.manual_seed(seed)
    arch = ArchConfig()
    return ModelConfig(stages=tuple(stages), arch=arch, axes=axes), [SVStage(f, arch).eval() for f in stages]


class PeakRSS:
    """Peak resident memory of this process while the block runs; with `gpu`, also the peak of the
    GPU's used memory above what was used at the start (all processes: ONNX Runtime and TensorRT
    allocate outside torch).

    On Linux the kernel's own high-water mark (VmHWM, reset through /proc/self/clear_refs) gives
    the exact host peak, short spikes included, with no thread reading /proc beside the timed work
    (which a sampler does every few ms, taking the memory-map lock the work's page faults need).
    Elsewhere RSS is sampled every 50 ms (a short peak may be missed)."""

    SAMPLE_S = 0.05

    def __init__(self, gpu: bool = False):
        self.gpu = gpu
        self.device_peak = None

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._hwm = _reset_high_water_mark()
        if self.gpu:  # blocks cached by an earlier row would hide this row's own use
            torch.cuda.empty_cache()
        self._base = self._device_used() if self.gpu else None
        self.device_peak = 0 if self.gpu else None
        self._stop = threading.Event()
        self._thread = None
        if self.gpu or not self._hwm:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _device_used() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _sample(self):
        if not self._hwm:
            self.peak = max(self.peak, self._proc.memory_info().rss)
        if self.gpu:
            self.device_peak = max(self.device_peak, self._device_used() - self._base)

    def _run(self):
        while not self._stop.wait(self.SAMPLE_S):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.peak = max(self.peak, self._proc.memory_info().rss, _high_water_mark() if self._hwm else 0)


def _reset_high_water_mark() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux 4.0+); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() > 0
    except OSError:
        return False


def _high_water_mark() -> int:
    """Peak RSS in bytes since the last reset (VmHWM), 0 where /proc does not give it."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def backends(config, stages, quick: bool, workdir: Path, log, sha256: str = "0" * 64,
             only: Sequence[str] = ()) -> List[dict]:
    """Every backend, marked available or not and why; available ones carry a runner (and the
    ONNX Runtime entry its graph, exported for the model file whose checksum is `sha256`). Those
    --backend (`only`) leaves out and that cost time to set up (compiling, engine builds, a second
    export) are not built."""
    from .backends import TorchBackend

    # each runner its own copy: TorchBackend moves the modules to its device in place
    found = [{"name": "torch eager (cpu)", "available": True, "runner": TorchBackend(_copies(stages), torch.device("cpu"))}]
    cuda = torch.cuda.is_available()
    found.append({"name": "torch eager (cuda)", "available": cuda, "reason": None if cuda else "no CUDA GPU",
                  "runner": TorchBackend(_copies(stages), torch.device("cuda")) if cuda else None})
    compiled = f"torch compiled ({'cuda' if cuda else 'cpu'})"
    found.append(_compiled(stages, quick, log) if chosen(compiled, only) else _not_picked(compiled))
    try:
        import onnxruntime as ort

        from .export import to_onnx
        from .ort_backend import OnnxRuntimeBackend

        graph = to_onnx(config, stages, sha256)
        # --quick skips this second export (seconds): its full rows run the eight passes
        folded = None if quick or not chosen("onnxruntime (cpu)", only) else to_onnx(config, stages, sha256,
                                                                                     folded_ensemble=True)
        # "runner_full": the ensemble folded into each pass, as `infer` runs the full recipe there
        found.append({"name": "onnxruntime (cpu)", "available": True, "graph": graph,
                      "runner": OnnxRuntimeBackend(graph, device="cpu", log=log),
                      "runner_full": OnnxRuntimeBackend(folded, device="cpu", log=log) if folded else None})
        on_gpu, why = None, "onnxruntime-gpu not installed (CUDA execution provider missing)"
        if "CUDAExecutionProvider" in ort.get_available_providers() and chosen("onnxruntime (cuda)", only):
            try:  # listed is not loaded: a CUDA provider whose libraries fail would time the CPU
                on_gpu = OnnxRuntimeBackend(graph, device="cuda", log=log)
            except UserError as exc:
                why = str(exc)
        elif "CUDAExecutionProvider" in ort.get_available_providers():
            why = "not picked by --backend"
        found.append({"name": "onnxruntime (cuda)", "available": on_gpu is not None,
                      "reason": None if on_gpu else why, "runner": on_gpu})
    except ImportError as exc:
        found.append({"name": "onnxruntime (cpu)", "available": False, "reason": f"not installed ({exc})"})
        graph = None
    engines = ("tensorrt (plugin shuffle)", "tensorrt (built-in shuffle)")
    found += _tensorrt(graph, workdir, log) if any(chosen(n, only) for n in engines) else [
        _not_picked(n) for n in engines]
    return found


def _not_picked(name: str) -> dict:
    return {"name": name, "available": False, "reason": "not picked by --backend"}


BACKEND_NAMES = ("torch eager (cpu)", "torch eager (cuda)", "torch compiled (cpu)", "torch compiled (cuda)",
                 "onnxruntime (cpu)", "onnxruntime (cuda)", "tensorrt (plugin shuffle)", "tensorrt (built-in shuffle)")


def chosen(name: str, only: Sequence[str]) -> bool:
    """Whether --backend (parts of names, any case) picks this backend; none given picks all."""
    return not only or any(o.lower() in name.lower() for o in only)


def check_backend_options(only: Sequence[str]) -> None:
    """Refuse a --backend that names no backend at all, before minutes of work (a typo)."""
    for o in only:
        if not any(chosen(name, [o]) for name in BACKEND_NAMES):
            raise UserError(f"--backend {o} matches none of: {', '.join(BACKEND_NAMES)}")


def check_some_chosen(found: List[dict], only: Sequence[str], single: bool) -> None:
    """Refuse a --backend whose backends are all unavailable here, naming why, instead of an empty
    report. (Repeated-inference rows run on the .svmodel's own paths: `SERIES_BACKENDS`.)"""
    if not only or not single or any(b["available"] and chosen(b["name"], only) for b in found):
        return
    why = "; ".join(f"{b['name']}: {b.get('reason')}" for b in found if chosen(b["name"], only))
    raise UserError(f"no backend --backend {' / '.join(only)} picks is available here ({why})")


def _copies(stages):
    return [copy.deepcopy(s) for s in stages]


def _compiled(stages, quick: bool, log=None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"torch compiled ({device.type})"
    if quick:
        return {"name": name, "available": False, "reason": "skipped with --quick (compiling takes minutes)"}
    try:
        from .backends import TorchBackend

        torch._dynamo.reset()  # a model compiled for an earlier task otherwise breaks this one's guards
        runner = TorchBackend(_copies(stages), device, compile=True)  # quiet while it is tried
        runner.predict(0, np.zeros((1, 1, 4, 8, 8), np.float32))
        if not runner.compiled:  # it went on uncompiled
            raise RuntimeError(runner.compile_failure)
        runner.log = log or runner.log  # compiling and any fallback during the timed runs, on screen
        return {"name": runner.name, "available": True, "runner": runner}
    except Exception as exc:  # noqa: BLE001 - any compiler failure means "not available here"
        return {"name": name, "available": False, "reason": f"torch.compile failed: {str(exc).splitlines()[0][:120]}"}


def _tensorrt(graph, workdir: Path, log) -> List[dict]:
    names = ("tensorrt (plugin shuffle)", "tensorrt (built-in shuffle)")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return [{"name": n, "available": False, "reason": "tensorrt not installed (NVIDIA's index only)"} for n in names]
    if not torch.cuda.is_available() or graph is None:
        return [{"name": n, "available": False, "reason": "needs a CUDA GPU and onnx"} for n in names]
    from .export import save_onnx
    from .trt_engine import TensorRTBackend, build_engines

    path = workdir / "bench.onnx"
    save_onnx(graph, path)
    out = []
    for name, plugin in zip(names, (True, False)):
        try:
            manifest = build_engines(path, graph, MODES["full"], plugin=plugin, overwrite=True, log=log)
            out.append({"name": name, "available": True, "runner": TensorRTBackend(manifest)})
        except Exception as exc:  # noqa: BLE001
            out.append({"name": name, "available": False, "reason": str(exc).splitlines()[0][:160]})
    return out


def time_file(runner, config, src: Path, warmup: Path, dst: Path, options: InferenceOptions, runs: int,
              min_seconds: float) -> dict:
    """Warm-up once, then at least `runs` runs and `min_seconds` of them; file-to-file and compute.

    The warm-up runs a small crop, except for a compiled network, which compiles on its first pass
    of each shape: it warms up on the timed file itself, whose tiles and passes the timed runs then
    keep, so no run times a compile. A CUDA
    backend's `transfers` (host->device, device->host, measured with CUDA events) are summed per
    run; backends without them report None."""
    # a TensorRT engine only takes the tiles its profiles were built for
    kw = dict(out_dtype="input", progress=False, log=lambda m: None, tile=getattr(runner, "tile", None))
    compiled = getattr(runner, "compiled", False)
    first = enhance_file(runner, config, src if compiled else warmup, dst, options, **kw)
    if compiled:  # and keep its plan: a tile or pass size chosen anew from the free memory would compile again
        kw["tile"], options = first.tile, replace(options, block=first.block)
    transfers = getattr(runner, "transfers", None)
    compute, total, h2d, d2h = [], [], [], []
    with PeakRSS(gpu=torch.cuda.is_available()) as rss:
        while len(total) < runs or sum(total) < min_seconds:
            if transfers is not None:
                transfers.reset()
            r = enhance_file(runner, config, src, dst, options, **kw)
            compute.append(r.compute_s)
            total.append(r.total_s)
            if transfers is not None:
                h2d.append(transfers.host_to_device_s)
                d2h.append(transfers.device_to_host_s)
            out_voxels = int(np.prod(r.output_shape))
    stats = summarize(compute)
    return {"compute": stats, "file_to_file": summarize(total), "file_to_file_s": float(np.median(total)),
            "host_to_device": summarize(h2d) if h2d else None, "device_to_host": summarize(d2h) if d2h else None,
            "voxels_per_s": out_voxels / stats["median"], "peak_rss_mib": rss.peak / 2**20,
            "rss_added_mib": (rss.peak - rss.start) / 2**20,
            "peak_device_mib": None if rss.device_peak is None else rss.device_peak / 2**20,
            "tile": list(r.tile), "block_voxels": r.block}


# Repeated inference as on an instrument PC: files per series and the recipe (the 3D full recipe
# takes minutes per file on a CPU; its per-file time is the single-file row above).
SERIES = {"2d": (8, "full"), "3d": (3, "fast")}
SERIES_BACKENDS = {"torch eager": "torch", "onnxruntime": "onnxruntime"}


def time_series(model_path: Path, backend: str, files: Sequence[Path], outdir: Path, options: InferenceOptions) -> dict:
    """Load the model file once, then enhance the files one after another, as `infer a.tif b.tif ...`
    does (each next file read while the current one is enhanced): time to first output (model
    load, backend set-up, ONNX export on its first use, first file) and the per-file time of the
    rest, from one output to the next."""
    from .backends import open_backend

    start = time.perf_counter()
    config, runner = open_backend(str(model_path), backend, "auto", log=lambda m: None, ensemble=options.ensemble)
    quiet = dict(out_dtype="input", progress=False, log=lambda m: None, tile=getattr(runner, "tile", None))
    load_s = time.perf_counter() - start
    first_s, per_file, last = None, [], start
    with ReadAhead(lambda path: read_input(path, ReadOptions())) as reader:
        for i, path in enumerate(files):
            volume = reader.take(path)
            if i + 1 < len(files):
                reader.prefetch(files[i + 1])
            enhance_file(runner, config, path, outdir / f"series_{i}.ome.tif", options, volume=volume, **quiet)
            now = time.perf_counter()
            if first_s is None:
                first_s = now - start
            else:
                per_file.append(now - last)
            last = now
    return {"backend": runner.name, "files": len(files), "load_s": load_s, "first_output_s": first_s,
            "per_file": summarize(per_file) if per_file else None}


def time_training(quick: bool, log) -> List[dict]:
    from .train import train_stages

    shape = (8, 48, 48) if quick else (38, 256, 256)
    vol = synthetic_volume(shape, seed=1).astype(np.float32)
    low, high = percentiles(vol, ModelConfig(stages=((2, 2, 2),)).norm)
    x = normalize(vol, low, high)
    stages = ((2, 2, 2), (2, 2, 2))
    recipes = {"ours": TrainConfig(), "paper": TrainConfig.paper()}
    if quick:
        recipes = {"ours": TrainConfig(steps=10, patch=(4, 16, 16), val_every=5, val_patches=4)}
    out = []
    for name, cfg in recipes.items():
        log(f"training, {name} recipe: {len(stages)} stages x {cfg.steps} steps on {'x'.join(map(str, shape))}")
        start = time.perf_counter()
        train_stages(x, stages, ArchConfig(), cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                     progress=False, log=lambda m: None)
        seconds = time.perf_counter() - start
        paper = None if quick else PAPER["train_s"]
        out.append({"recipe": name, "steps": cfg.steps, "stages": len(stages), "batch": cfg.batch,
                    "patch": list(cfg.patch), "volume": list(shape), "seconds": seconds, "paper_s": paper,
                    "speedup": speedup(paper, seconds)})
    return out


def _merge_availability(listed: List[dict], found: List[dict], task: str) -> None:
    """One row per backend over all tasks: available if it ran for any; the reason names each task
    it could not run for."""
    for b in found:
        row = next((r for r in listed if r["name"] == b["name"]), None)
        if row is None:
            row = {"name": b["name"], "available": False, "reason": None}
            listed.append(row)
        row["available"] = row["available"] or b["available"]
        if not b["available"]:
            reason = f"{task}: {b.get('reason')}"
            row["reason"] = reason if not row["reason"] else f"{row['reason']}; {reason}"


def provenance(command: str) -> dict:
    """When, from which commit, by which command, on which machine: the header of every result file."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
            "command": command, "machine": machine()}


def run_bench(outdir: Path, quick: bool = False, training: bool = True, runs: int = 3, min_seconds: float = 0.0,
              only: Sequence[str] = (), command: str = "sv-deploy bench", log: Callable[[str], None] = print,
              select: Sequence[str] = (), single: bool = True, inputs: Sequence[Path] = (),
              model: Optional[Path] = None, read=None) -> dict:
    """`inputs`: users' files, timed beside the synthetic tasks (`select` "files" keeps only them),
    with `model` (a .svmodel) or an untrained x4 model of their kind; `read`: how to read them."""
    from .enhance_file import ReadOptions

    user = [file_task(Path(p), read or ReadOptions(), model) for p in inputs]  # bad input fails here, not after minutes
    check_output_folder(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {
        **provenance(command), "version": __version__, "quick": quick, "paper": PAPER,
        "backends": [], "inference": [], "series": [], "training": [], "ratios": {}, "failed": [],
        "not_measured": [],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="sv-bench-") as tmp:
            work = Path(tmp)
            synthetic = [(t, None) for t in tasks(quick) if not select or t.name in select]
            for task, data in synthetic + (user if not select or "files" in select else []):
                if task.source is not None and model is not None:
                    config, stages, sha256 = load_model(model)
                    model_file = Path(model)
                else:
                    config, stages = fresh_model(task.stages, axes="YX" if task.shape[0] == 1 else "ZYX")
                    model_file = work / f"{_slug(task.name)}.svmodel"
                    sha256 = save_model(model_file, config, stages)
                found = backends(config, stages, quick, work, log, sha256, only)
                check_some_chosen(found, only, single)
                _merge_availability(report["backends"], found, task.name)
                data = synthetic_volume(task.shape) if data is None else data
                src = work / f"{_slug(task.name)}.tif"
                write_volume(src, [data], data.shape, data.dtype, "ZYX", (0.4, 0.1, 0.1))
                crop = data[:4, :64, :64]
                warmup = work / f"{_slug(task.name)}_warmup.tif"
                write_volume(warmup, [crop], crop.shape, crop.dtype, "ZYX", (0.4, 0.1, 0.1))
                for mode, options in MODES.items() if single else ():
                    for b in (b for b in found if b["available"]):
                        if not chosen(b["name"], only):
                            continue
                        log(f"{task.name} {'x'.join(map(str, task.shape))} {mode}: {b['name']} ...")
                        try:
                            runner = b.get("runner_full") if mode == "full" and b.get("runner_full") else b["runner"]
                            row = time_file(runner, config, src, warmup, work / "out.ome.tif", options, runs, min_seconds)
                        except Exception as exc:  # noqa: BLE001 - a backend that breaks is reported, not fatal
                            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
                            report["failed"].append({"task": task.name, "mode": mode, "backend": b["name"], "error": reason})
                            log(f"  failed: {reason}")
                            continue
                        paper = task.paper_s if mode == "full" else None  # the paper timed the full recipe only
                        row.update(task=task.name, mode=mode, backend=b["name"], input_shape=list(task.shape),
                                   paper_s=paper, speedup=speedup(paper, row["file_to_file_s"]))
                        report["inference"].append(row)
                        log(f"  median compute {row['compute']['median']:.3f} s, file to file {row['file_to_file_s']:.3f} s")
                # --quick: the series reuse the export above instead of exporting on first use (seconds each)
                graph = next((b["graph"] for b in found if b.get("graph") is not None), None) if quick else None
                report["series"] += _series(task, model_file, sha256, data, work, quick, only, report["failed"], log, graph)
            if training:
                report["training"] = time_training(quick, log)
    except KeyboardInterrupt:  # keep what was measured: a full bench runs for tens of minutes
        report["interrupted"] = True
        report["not_measured"].append("everything after the interruption")
        _finish(report, outdir, started, quick)
        log(f"interrupted: the rows measured so far are in {outdir}/bench.json and bench.md (marked interrupted)")
        raise
    _finish(report, outdir, started, quick)
    for line in table(report):
        log(line)
    return report


def _finish(report: dict, outdir: Path, started: float, quick: bool) -> None:
    """Ratios and what was not measured, then the JSON, Markdown and PNG."""
    for r in report["inference"]:
        if r["backend"] == "onnxruntime (cpu)":
            ref = next((t for t in report["inference"] if t["backend"] == "torch eager (cpu)"
                        and t["task"] == r["task"] and t["mode"] == r["mode"]), None)
            if ref:
                report["ratios"][f"{r['task']} {r['mode']}"] = ref["compute"]["median"] / r["compute"]["median"]
    report["not_measured"] += [f"{b['name']}: {b['reason']}" for b in report["backends"] if not b["available"]]
    report["not_measured"] += [f"{f['task']} {f['mode']} on {f['backend']}: failed ({f['error']})" for f in report["failed"]]
    if quick:
        report["not_measured"] += ["--quick: the paper-recipe training; the full recipe on ONNX Runtime with its "
                                   "ensemble folded into one pass, as infer runs it (here member by member)"]
    if not torch.cuda.is_available():
        report["not_measured"].append("host->device / device->host times and peak device memory (no GPU)")
    hidden = sorted({r["backend"] for r in report["inference"] if "cuda" in r["backend"] and not r["host_to_device"]})
    if hidden:
        report["not_measured"].append(f"host->device / device->host of {', '.join(hidden)} "
                                      "(the copies happen inside ONNX Runtime's run)")
    report["fastest"] = fastest(report["inference"])
    report["seconds"] = time.perf_counter() - started
    write_report(report, outdir)


def _series(task: Task, model: Path, sha256: str, data: np.ndarray, work: Path, quick: bool, only: Sequence[str],
            failed: List[dict], log, graph=None) -> List[dict]:
    """The repeated-inference rows of one task, for each CPU/GPU backend a .svmodel runs on.

    Each starts from an empty ONNX export cache (the first use of a new model), unless `graph`, the
    model's plain export, is given: then the cache holds it already and the rows run without the
    ensemble, which that graph serves."""
    from .export import save_onnx
    from .onnx_cache import ENV, cache_path

    count, mode = SERIES.get(task.name, SERIES["3d"])
    if quick:
        count = 2
    if graph is not None:
        mode = "fast"
    files = []
    for i in range(count):
        files.append(work / f"{_slug(task.name)}_series_{i}.tif")
        write_volume(files[-1], [data], data.shape, data.dtype, "ZYX", (0.4, 0.1, 0.1))
    rows = []
    for name, backend in SERIES_BACKENDS.items():
        if not chosen(name, only):
            continue
        log(f"{task.name} {'x'.join(map(str, task.shape))} {mode}, {count} files, model loaded once: {name} ...")
        cache = work / f"cache-{_slug(task.name)}-{backend}"  # a cold export cache: the first use of a new model
        if graph is not None and backend == "onnxruntime":
            cache_path(sha256, folder=cache).parent.mkdir(parents=True, exist_ok=True)
            save_onnx(graph, cache_path(sha256, folder=cache))
        previous = os.environ.get(ENV)
        os.environ[ENV] = str(cache)
        try:
            row = time_series(model, backend, files, work, MODES[mode])
        except Exception as exc:  # noqa: BLE001 - reported like a failed row
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
            failed.append({"task": task.name, "mode": f"{mode} series", "backend": name, "error": reason})
            log(f"  failed: {reason}")
            continue
        finally:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous
        row.update(task=task.name, mode=mode, input_shape=list(task.shape),
                   export_cached=graph is not None and backend == "onnxruntime")
        rows.append(row)
        per = row["per_file"]
        log(f"  first output after {row['first_output_s']:.2f} s, then {per['median']:.3f} s per file" if per
            else f"  first output after {row['first_output_s']:.2f} s")
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def write_report(report: dict, outdir: Path) -> None:
    (outdir / "bench.json").write_text(json.dumps(report, indent=2))
    (outdir / "bench.md").write_text(markdown(report))
    chart(report, outdir / "bench.png")


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["inference"]
    groups = sorted({(r["task"], r["mode"]) for r in rows})
    names = sorted({r["backend"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [next((r["file_to_file_s"] for r in rows if r["backend"] == name and (r["task"], r["mode"]) == g), 0)
                  for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, values, width, label=name)
    for j, g in enumerate(groups):
        paper = PAPER.get(f"{g[0]}_s") if not report["quick"] and g[1] == "full" else None
        if paper:
            ax.hlines(paper, j - 0.1, j + 0.8, colors="k", linestyles="dashed")
            ax.text(j + 0.8, paper, " paper", va="center", fontsize=8)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{t.removeprefix('file ')}\n{m}" for t, m in groups], fontsize=8)  # user files: long names
    ax.set_ylabel("file to file, seconds (median)")
    ax.set_yscale("log")
    ax.set_title(f"sv-deploy bench on {report['machine']['gpu'] or report['machine']['cpu']}")
    if names:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no single-file rows in this run (see bench.md)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
