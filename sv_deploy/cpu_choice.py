"""Which backend runs a .svmodel faster on this CPU: timed once per machine and kind of run, kept.

The answer depends on the CPU: ONNX Runtime was 1.2-2.1x faster than torch on the 2-core AMD
machines (BENCH.md, sessions 15-19), channels-last torch as fast or faster on an Intel one
(sessions 20-21). So `infer --backend auto` times both on one network pass of a block the size
infer runs, the way infer runs it (the ensemble folded into one pass for ONNX Runtime, eight
passes for torch), and keeps the answer in the cache folder, keyed by the CPU, the thread count,
the versions and the kind of run (2D or 3D, the ensemble, the architecture). Both compute the
same function; their results agree to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from . import __version__
from .config import ModelConfig
from .memory import heap_set_for_run

CHOICES = ("onnxruntime", "torch")
FILE = "cpu_backend.json"
KEEP = 64  # kinds of run remembered per file; each entry is a few lines
# Input voxels of the timed pass, near what infer runs on large files (up to 1 M voxels a pass): for
# 2D a whole 1 M-pixel pass (at 512x512 the two tied, at 1024x1024 ONNX Runtime led 1.5x with the
# ensemble; BENCH.md session 21); for 3D less, so that timing both three times takes seconds.
TIMED_BLOCK = {"2d": (1, 1024, 1024), "3d": (24, 144, 144)}
REPEATS = 2  # timed passes after one warm-up; the faster counts
MARGIN = 1.05


def timed_stage(config: ModelConfig) -> Optional[int]:
    """The first stage whose network runs (None: every stage runs as interpolation)."""
    skip = config.interpolation_stages()
    return next((i for i in range(len(config.stages)) if i not in skip), None)


def workload(config: ModelConfig, ensemble: bool) -> Optional[dict]:
    """What the timing depends on besides the machine: 2D or 3D, the ensemble, the timed stage's
    factors, the architecture. None when no stage runs a network."""
    stage = timed_stage(config)
    if stage is None:
        return None
    return {"data": "2d" if config.axes == "YX" else "3d", "ensemble": bool(ensemble),
            "factors": list(config.stages[stage]), "arch": dataclasses.asdict(config.arch)}


# The modules whose code decides either backend's speed or how it is timed (a change times again).
TIMED_MODULES = ("model.py", "backends.py", "ort_backend.py", "export.py", "onnx_graph.py", "shuffle_op.py",
                 "enhance.py", "cpu_choice.py", "memory.py")


def machine_key() -> dict:
    import torch

    from .machine import cpu, module_version
    from .onnx_cache import code_digest

    here = Path(__file__).resolve().parent
    return {**cpu(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": module_version("onnxruntime"), "sv_deploy": __version__,
            "code": code_digest(here / name for name in TIMED_MODULES)[:12]}


def entry_key(machine: Mapping, work: Mapping) -> str:
    return json.dumps({"machine": machine, "workload": work}, sort_keys=True)


def faster(seconds: Mapping[str, float]) -> str:
    """ONNX Runtime where it is more than `MARGIN` faster than torch, else torch: a closer call is
    within the spread of runs, and torch holds far less memory (the 3D full recipe's peak: 2.5 GiB
    against 7.9 GiB with ONNX Runtime's folded ensemble, BENCH.md session 20)."""
    return "onnxruntime" if seconds["onnxruntime"] * MARGIN < seconds["torch"] else "torch"


def read_choices(path: Path) -> Dict[str, dict]:
    """The kept entries; an unreadable or foreign file reads as none (it is only a speed-up)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict) and v.get("backend") in CHOICES}


def write_choices(path: Path, entries: Dict[str, dict]) -> None:
    """Atomically: a run reading the file meanwhile sees the old one or the new one."""
    newest = sorted(entries.items(), key=lambda kv: str(kv[1].get("measured", "")), reverse=True)[:KEEP]
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"entries": dict(newest)}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def time_pass(runner, factors: Sequence[int], ensemble: bool, x: np.ndarray, repeats: int = REPEATS) -> float:
    """Seconds for one block through the first stage as infer runs it, after a warm-up."""
    from .enhance import InferenceOptions, check_folded, predict_ensemble
    from .geometry import ensemble_transforms

    folded = check_folded(runner, InferenceOptions(ensemble=ensemble))
    transforms = ensemble_transforms(tuple(factors), ensemble and not folded)
    predict_ensemble(runner, 0, x, transforms)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict_ensemble(runner, 0, x, transforms)
        best = min(best, time.perf_counter() - start)
    return best


@heap_set_for_run
def measure(path: str, config: ModelConfig, ensemble: bool, log: Callable[[str], None]) -> Dict[str, float]:
    """Seconds per timed block for each backend, on the model's first running stage, with glibc's
    heap set as `enhance_file` sets it without a memory limit (torch's passes depend on it)."""
    from .backends import open_backend

    work, stage = workload(config, ensemble), timed_stage(config)
    x = np.random.default_rng(0).random(TIMED_BLOCK[work["data"]], dtype=np.float32)
    seconds = {}
    for name in CHOICES:
        try:
            _, runner = open_backend(path, name, "cpu", log=log, ensemble=ensemble)
            seconds[name] = time_pass(_StageView(runner, stage), work["factors"], ensemble, x)
        except Exception as exc:  # out of memory too
            if name == "torch":
                raise
            raise OnnxRuntimeFailed(_first_line(exc)) from exc
        del runner
    return seconds


class OnnxRuntimeFailed(Exception):
    """ONNX Runtime could not export, load or run the model here; torch runs what it would."""


class _StageView:
    """A backend seen as running only `stage` (as index 0), for `time_pass`."""

    def __init__(self, runner, stage: int):
        self.runner, self.stage = runner, stage
        self.name = runner.name
        self.folded_ensemble = getattr(runner, "folded_ensemble", False)

    def predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        return self.runner.predict(self.stage, x)


@contextlib.contextmanager
def _held(file: Path, log: Callable[[str], None]):
    """One run at a time times the backends (two at once would each time the other's load, and
    keep that): the others wait, then read its answer. Without file locks (Windows, some network
    file systems) or a folder it can write, no lock."""
    try:
        import fcntl

        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = open(file.with_name(file.name + ".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting for another sv-deploy run that is timing the CPU backends ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (NFS without lockd): go on without
            pass
        yield


def choose(path: str, config: ModelConfig, ensemble: bool, log: Callable[[str], None],
           folder: Optional[Path] = None) -> str:
    """"onnxruntime" or "torch" for this model on this CPU: kept, or timed now and kept."""
    from .onnx_cache import cache_dir

    work = workload(config, ensemble)
    if work is None:
        return "torch"  # no stage runs a network: nothing to time, nothing to export
    file = (folder or cache_dir()) / FILE
    key = entry_key(machine_key(), work)
    kept = read_choices(file)
    if key in kept:
        return kept[key]["backend"]
    with _held(file, log):
        kept = read_choices(file)  # another run may have timed it meanwhile
        if key in kept:
            return kept[key]["backend"]
        what = f"{work['data'].upper()} models {'with' if ensemble else 'without'} the ensemble"
        block = "x".join(map(str, TIMED_BLOCK[work["data"]]))
        log(f"timing ONNX Runtime and torch on this CPU for {what} on a {block} block, once (seconds to a "
            "minute; kept for later runs) ...")
        try:
            seconds = measure(path, config, ensemble, log)
        except OnnxRuntimeFailed as exc:
            log(f"  ONNX Runtime could not run this model here ({exc}); using torch (not kept: the next run "
                "tries again)")
            return "torch"
        choice = faster(seconds)
        why = ("more than 5 % faster" if choice == "onnxruntime" else
               "faster" if seconds["torch"] < seconds["onnxruntime"] else "within 5 %, and it needs less memory")
        log(f"  ONNX Runtime {seconds['onnxruntime']:.3f} s, torch {seconds['torch']:.3f} s: infer runs {choice} "
            f"here ({why})")
        kept[key] = {"backend": choice, "seconds": {k: round(v, 4) for k, v in seconds.items()},
                     "block": list(TIMED_BLOCK[work["data"]]),
                     "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            write_choices(file, kept)
        except OSError as exc:
            log(f"  could not keep the choice in {file} ({exc.strerror or exc}); it is timed again next run")
    return choice


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]
