"""One way to run a model: every backend maps an LR batch to its upsampled batch for one stage.

Tiling, ensemble and back-projection live in `enhance` and are shared by all backends.
"""

from __future__ import annotations

from typing import Callable, List, Protocol, Sequence

import numpy as np
import torch

from .cuda_io import PinnedStaging, TransferTimes, run_on_gpu
from .errors import UserError
from .model import SVStage, cpu_layout, fold_stages


class Backend(Protocol):
    name: str

    def predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        """(N, 1, D, H, W) float32, normalized -> (N, 1, D*rz, H*ry, W*rx) float32.

        The result is a new array the caller may change in place (never a reused buffer)."""
        ...


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None


class TorchBackend:
    """With `fold_ensemble`, each network pass computes the whole 8-way ensemble (`model.fold_ensemble`).

    With `compile`, the stages run through torch.compile (inductor: fused element-wise kernels
    between the convolutions), compiled once per pass shape; where compiling fails (no C++
    compiler, no Triton for the GPU, more pass shapes than dynamo allows) it says so once and goes
    on uncompiled, the same result.

    Takes the stages over: they are moved to the device, and on the CPU into channels-last layout
    (`model.cpu_layout`), in place; the same weights and results for any later use."""

    def __init__(self, stages: Sequence[SVStage], device: torch.device, fold_ensemble: bool = False,
                 compile: bool = False, log=None):
        self.device = device
        self.folded_ensemble = fold_ensemble
        self.stages: List[SVStage] = [cpu_layout(s.to(device), device).eval()
                                      for s in (fold_stages(stages) if fold_ensemble else stages)]
        self._eager = self.stages
        self.log = log or (lambda message: None)
        self._shapes = set()  # pass shapes compiled so far
        if compile:
            self.stages = compile_stages(self.stages, self.log)
        self.compiled, self.compile_failure = compile, None
        self.name = f"torch {'compiled ' if compile else ''}({device.type})"
        self._per_sample = device.type == "cpu"
        self.transfers = None  # TransferTimes on CUDA: host->device, compute, device->host
        if device.type == "cuda":
            self.transfers, self._staging = TransferTimes(), PinnedStaging()
            self._stream = torch.cuda.Stream(device)

    def free_device_memory(self):
        """Free bytes on the GPU the network runs on (sizes its passes); None on the CPU."""
        if self.device.type != "cuda":
            return None
        free = torch.cuda.mem_get_info(self.device)[0]
        # blocks torch's caching allocator holds but no tensor uses are free to these passes too
        # (the driver counts them as taken): without them a second file got passes half as large
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        if self.compiled:
            # Keyed on the shape alone: the stages share one forward, and a graph compiled for one
            # stage serves another with the same pass shape.
            shape = (1,) + x.shape[1:] if self._per_sample else x.shape
            first = shape not in self._shapes
            if first:
                self._shapes.add(shape)
                self.log(f"compiling the network for passes of {'x'.join(map(str, shape[2:]))} voxels "
                         "(once per pass shape; seconds to minutes)")
            try:
                return self._predict(stage, x)
            except Exception as exc:
                self._after_compile_error(exc, first)
        return self._predict(stage, x)

    def _after_compile_error(self, exc: Exception, first: bool) -> None:
        """Raise what the caller must see (out of memory: it retries with smaller passes; an error
        of a shape compiled before), else go on uncompiled. A compiler failure, the recompile limit,
        or anything the first pass of a shape raised (a kernel that fails to launch) falls back: the
        uncompiled rerun raises again if the error was not the compiler's."""
        from .enhance_file import is_out_of_memory

        errors = torch._dynamo.exc
        inner = getattr(exc, "inner_exception", None)
        if isinstance(inner, MemoryError):
            raise inner from exc  # host memory ran out while compiling
        if is_out_of_memory(exc):
            raise exc
        limit = isinstance(exc, getattr(errors, "FailOnRecompileLimitHit", ()))  # () in older torch
        if not (limit or first or isinstance(exc, errors.BackendCompilerFailed)):
            raise exc
        most = getattr(torch._dynamo.config, "recompile_limit", RECOMPILE_LIMIT)
        self._fall_back(f"more than {most} pass shapes" if limit else _first_line(exc))

    def _fall_back(self, why: str) -> None:
        self.compile_failure = why
        self.log(f"warning: torch.compile failed here ({why}); running the network uncompiled (the same "
                 "result, slower)")
        self.stages, self.compiled = self._eager, False
        self.name = f"torch ({self.device.type})"

    def _predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            if self.transfers is not None:
                return run_on_gpu(x, self.stages[stage], self.device, self._stream, self._staging, self.transfers)
            if self._per_sample:
                return np.concatenate([self._cpu_pass(stage, x[i:i + 1]) for i in range(len(x))])
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            return self.stages[stage](t).float().cpu().numpy()

    def _cpu_pass(self, stage: int, x: np.ndarray) -> np.ndarray:
        """One sample: on 2 cores oneDNN ran these passes faster one by one than batched (the 3D
        ensemble 4.06 -> 3.60 s, 2D 0.94 -> 0.42 s; BENCH.md, session 7)."""
        t = cpu_layout(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), self.device)
        return self.stages[stage](t).numpy()


RECOMPILE_LIMIT = 256


def compile_stages(stages: Sequence[SVStage], log=lambda message: None) -> list:
    """torch.compile'd stages with static shapes, one compile per pass shape: with dynamic=True,
    torch 2.13's inductor fails on this network's 3D convolutions from the second shape on
    ("Invalid ranges [0:-1]"; BENCH.md, session 14).

    A tiled volume has up to a few dozen pass shapes (edge tiles, the ensemble's transposed
    members), counted together for all stages; more with --watch over files of several sizes or
    smaller passes after out-of-memory. Past the limit dynamo would run new shapes uncompiled
    without a word: it raises instead, so the backend says so. Compiled kernels are cached in a
    folder of the user's own, as the ONNX export cache (inductor's default, under /tmp, is not)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # torch 2.7 renamed it
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4 * RECOMPILE_LIMIT))
            break
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    _private_inductor_cache(log)
    return [torch.compile(s, dynamic=False) for s in stages]


def _private_inductor_cache(log) -> None:
    """Point inductor at <sv-deploy cache>/torchinductor unless the user chose a folder: its
    compiled code is loaded and run, and its default folder under /tmp can be made by anyone.
    (Importing torch._dynamo already sets the variable to that default, so only another value
    counts as the user's.)"""
    import getpass
    import os
    import tempfile
    from pathlib import Path

    from .onnx_cache import cache_dir
    from .volume_io import written_only_by_me

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        default = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    except (KeyError, OSError, ModuleNotFoundError):
        default = None
    if chosen and (default is None or os.path.abspath(chosen) != os.path.abspath(default)):
        return
    folder = cache_dir() / "torchinductor"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        private = written_only_by_me(folder) and written_only_by_me(folder.parent)
    except OSError:
        private = False
    if not private:  # a fresh folder of this run's own (left to the system's temp cleaning)
        log(f"not keeping compiled code in {folder}: it cannot be made, or other users can write to it; set "
            "TORCHINDUCTOR_CACHE_DIR to a folder of your own to keep it between runs")
        folder = Path(tempfile.mkdtemp(prefix="sv-deploy-inductor-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


class BackendUnavailable(UserError):
    """No backend could be chosen for the run: it ends the run, not one file of a batch."""


class ChosenOnFirstUse:
    """The backend `choose` returns, opened by `resolve()` or on first use: `infer` resolves it once
    the first input has passed its checks (a bad file or option fails at once) and before the next
    file is read ahead (which would take a core from the timing). Timing the CPU backends takes
    seconds, once per machine and kind of run."""

    def __init__(self, choose: Callable[[], Backend]):
        self._choose, self._chosen, self._failure = choose, None, None

    def resolve(self) -> Backend:
        if self._failure is not None:
            raise self._failure
        if self._chosen is None:
            try:
                self._chosen = self._choose()
            except Exception as exc:  # out of memory too
                self._failure = BackendUnavailable(
                    f"could not choose the CPU backend ({_first_line(exc)}); name one with --backend torch or "
                    "--backend onnxruntime")
                raise self._failure from exc
        return self._chosen

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "tile":  # neither CPU backend brings a tile
            raise AttributeError(name)
        return getattr(self.resolve(), name)


BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
ENGINE_SUFFIX = ".trt.json"  # the engine manifest `sv-deploy export --engine` writes


def model_kind(path: str) -> str:
    name = str(path).lower()
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(ENGINE_SUFFIX):
        return "engine"
    return "svmodel"


def auto_backend(kind: str, device: str) -> str:
    """The backend a model file runs on: an export on its own runtime; a .svmodel on a CUDA GPU on
    torch (ONNX Runtime's GPU package is an optional extra); on a CPU "measure": the faster of
    ONNX Runtime and torch there, timed once (`cpu_choice`), or torch where ONNX Runtime is not
    installed."""
    if kind == "onnx":
        return "onnxruntime"
    if kind == "engine":
        return "tensorrt"
    if pick_device(device).type == "cuda":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "measure"


def open_backend(path: str, backend: str = "auto", device: str = "auto", log=print, ensemble: bool = False,
                 compile: bool = False):
    """(ModelConfig, Backend) for a model file: .svmodel (torch or onnxruntime), .onnx, or an engine manifest.

    With `ensemble`, a .svmodel on ONNX Runtime's CPU path runs the self-ensemble folded into one
    network pass (the same result; 3D full recipe 148 -> 122 s on 2 cores, BENCH.md session 11);
    such a backend then only serves runs with the ensemble. torch keeps eight passes: its grouped
    3D convolutions made the folded network slower on the CPU (216 -> 308 s; in channels-last
    layout too, 60.2 against 68.1 s, BENCH.md session 20), and no GPU has measured either way. `compile` (torch only; with backend auto it picks torch for a .svmodel)
    runs the network through torch.compile."""
    kind = model_kind(path)
    if compile and (kind != "svmodel" or backend not in ("auto", "torch")):
        raise UserError(f"--compile applies to a .svmodel run on --backend torch, not to "
                        f"{'--backend ' + backend if kind == 'svmodel' else path}; drop --compile")
    if backend == "auto":
        backend = "torch" if compile else auto_backend(kind, device)
        if backend == "measure":
            from .cpu_choice import choose
            from .model_file import load_model

            config = load_model(path)[0]
            # on the CPU it was timed on (onnxruntime-gpu could see a GPU torch does not)
            return config, ChosenOnFirstUse(
                lambda: open_backend(path, choose(path, config, ensemble, log), "cpu", log, ensemble)[1])
    if backend == "torch":
        if kind != "svmodel":
            raise UserError(f"--backend torch runs a .svmodel file, not {path}; use --backend onnxruntime or tensorrt")
        from .model_file import load_model

        config, stages, _ = load_model(path)
        return config, TorchBackend(stages, pick_device(device), compile=compile, log=log)
    if backend == "onnxruntime":
        from .ort_backend import OnnxRuntimeBackend

        if kind == "engine":
            raise UserError(f"{path} is a TensorRT engine manifest; use --backend tensorrt or pass the .onnx file")
        if kind == "svmodel":
            from .model_file import load_model
            from .export import to_onnx
            from .onnx_cache import cached_export
            from .ort_backend import CPU, ExportWillNotRun, pick_providers

            config, stages, digest = load_model(path)
            folded = ensemble and pick_providers(device) == [CPU]
            try:
                runner = OnnxRuntimeBackend(cached_export(config, stages, digest, log, folded=folded), device=device,
                                            log=log)
            except ExportWillNotRun:
                log("the cached export does not load; exporting again, in memory")  # damaged in the cache
                runner = OnnxRuntimeBackend(to_onnx(config, stages, digest, folded_ensemble=folded), device=device,
                                            log=log)
        else:
            runner = OnnxRuntimeBackend(path, device=device, log=log)
        return runner.config, runner
    if backend == "tensorrt":
        if kind != "engine":
            source = path if kind == "svmodel" else "MODEL.svmodel"  # engines are built from the .svmodel
            import importlib.util

            first = ("" if importlib.util.find_spec("tensorrt") else
                     "install TensorRT from NVIDIA's package index (see the README), then ")
            raise UserError(
                f"--backend tensorrt runs an engine; {first}build one with 'sv-deploy export {source} -o DIR "
                f"--engine' and pass its {ENGINE_SUFFIX} manifest"
            )
        from .trt_engine import TensorRTBackend

        gpu = pick_device(device)
        if gpu.type == "cuda" and gpu.index is not None:  # TensorRT and its buffers use the current device
            torch.cuda.set_device(gpu)
        runner = TensorRTBackend(path)
        return runner.config, runner
    raise UserError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
