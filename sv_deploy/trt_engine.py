"""TensorRT layer: our PixelShuffle3D plugin, engine building, and the TensorRT backend.

A thin layer over `trt_plan` (pure, tested on CI) written to TensorRT's documented Python API:
`tensorrt.plugin` quickly deployable plugins (register / autotune / impl / aot_impl, TensorRT >= 10.9
for aot_impl), `OnnxParser`, optimization profiles, a timing cache, `execute_async_v3`.
It targets TensorRT 10.9 to 11.x. TensorRT cannot be installed where this project is developed,
so this module has not been run there (README says so); its tests skip without tensorrt.

No `from __future__ import annotations` here: `tensorrt.plugin` reads the plugin functions'
annotations as classes (`inspect.signature`), and postponed (string) annotations make it fail.
"""

import functools
import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Tuple, Union

import numpy as np
import onnx

from . import onnx_graph, shuffle_op
from .config import ModelConfig
from .cuda_io import PinnedStaging, TransferTimes, run_on_gpu
from .errors import UserError
from .trt_plan import (EngineManifest, Profile, check_compatible, engine_paths, plugin_size_error, profile_error,
                       shuffle_layer_error, stage_profiles, timing_cache_name, version_error, without_plugin)
from .volume_io import atomic_output, written_only_by_me

PLUGIN_ID = f"{shuffle_op.DOMAIN}::{shuffle_op.NAME}"
KERNEL_PARAMS = 7  # what TensorRT passes the AOT kernel: input, (n_out, channels, depth, height, width), output
_registered = False
_registration_error = ""  # why TensorRT refused the plugin definition, said again on a retry


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(
            "TensorRT is not installed; install it from NVIDIA's package index "
            "(pip install 'sv-deploy[tensorrt]' with NVIDIA's index, see the README) or use the .onnx "
            "with --backend onnxruntime"
        ) from None
    problem = version_error(trt.__version__)
    if problem:
        raise UserError(problem)
    return trt


def register_plugin() -> None:
    """Register sv_deploy::PixelShuffle3D with TensorRT's plugin registry (once per process).

    The parser swaps it in for every node that carries plugin_namespace="sv_deploy". With aot_impl
    the engine embeds our Triton kernel's PTX and runs without Python (trtexec, C++); `impl` is the
    JIT path, which TensorRT uses only for a node whose `aot` attribute is 0 (ours have none).
    """
    global _registered, _registration_error
    if _registered:
        return
    if _registration_error:  # TensorRT keeps a name once registered: a second try would only say so
        raise UserError(_registration_error)
    kernel = _kernel_module()
    import tensorrt as trt

    try:
        _define_plugin(kernel)
    except Exception as exc:  # TensorRT validates the definitions as they are made
        _registration_error = (f"TensorRT {trt.__version__} refused our pixel-shuffle plugin's definition "
                               f"({type(exc).__name__}: {exc}); export with --no-plugin (TensorRT's own ops)")
        raise UserError(_registration_error) from None
    _registered = True


def _define_plugin(kernel) -> None:
    from typing import Tuple as Tup

    import numpy.typing as npt
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def pixel_shuffle3d_desc(inp0: trtp.TensorDesc, factors: npt.NDArray[np.int32]) -> trtp.TensorDesc:
        rz, ry, rx = (int(f) for f in factors)
        out = inp0.like()
        out.shape_expr[1] = inp0.shape_expr[1] // (rz * ry * rx)
        out.shape_expr[2] = inp0.shape_expr[2] * rz
        out.shape_expr[3] = inp0.shape_expr[3] * ry
        out.shape_expr[4] = inp0.shape_expr[4] * rx
        return out

    @trtp.autotune(PLUGIN_ID)
    def pixel_shuffle3d_autotune(inp0: trtp.TensorDesc, factors: npt.NDArray[np.int32],
                                 outputs: Tup[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def pixel_shuffle3d_impl(inp0: trtp.Tensor, factors: npt.NDArray[np.int32],
                             outputs: Tup[trtp.Tensor], stream: int) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x = torch.as_tensor(inp0, device="cuda")
            y = torch.as_tensor(outputs[0], device="cuda")
            kernel.pixel_shuffle3d(x, [int(f) for f in factors], out=y)

    if hasattr(trtp, "aot_impl"):

        @trtp.aot_impl(PLUGIN_ID)
        def pixel_shuffle3d_aot_impl(
            inp0: trtp.TensorDesc, factors: npt.NDArray[np.int32], outputs: Tup[trtp.TensorDesc], tactic: int
        ) -> Tup[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
            dtype = "fp16" if inp0.dtype == trt.float16 else "fp32"
            compiled = aot_kernel(dtype, tuple(int(f) for f in factors))
            out = outputs[0].shape_expr
            inp = inp0.shape_expr
            params = trtp.KernelLaunchParams()
            params.grid_x = trtp.cdiv(out.numel(), kernel.BLOCK)
            params.block_x = compiled.metadata.num_warps * 32
            params.shared_mem = compiled.metadata.shared
            # Kernel order: input, (n_out, channels, depth, height, width), output.
            extra = trtp.SymIntExprs.from_tuple(
                [trtp.SymInt32(e) for e in (out.numel(), out[1], inp[2], inp[3], inp[4])]
            )
            return compiled.metadata.name, compiled.asm["ptx"], params, extra


def _kernel_module():
    try:
        from .kernels import pixel_shuffle3d
    except ImportError as exc:
        raise UserError(f"building an engine with our pixel-shuffle plugin compiles its Triton kernel, and "
                        f"{exc.name or 'triton'} cannot be imported; pip install 'triton>=3.3' (or use "
                        "--no-plugin for TensorRT's own ops)") from None
    return pixel_shuffle3d


@functools.lru_cache(maxsize=None)
def aot_kernel(dtype: str, factors: Tuple[int, int, int]):
    """Our kernel compiled for this GPU at a PTX ISA its driver loads, checked to be launchable by
    TensorRT (`kernels.aot`). Called before a build, so a kernel TensorRT could not run is a clear
    error here rather than a failed build or a fault when the engine first runs."""
    kernel = _kernel_module()
    from .kernels import aot

    major, minor = _gpu()[1]
    try:
        return aot.compile_for_aot(lambda isa: kernel.compile_plain(dtype, factors, ptx_version=isa),
                                   KERNEL_PARAMS, aot.cuda_driver_version(), major * 10 + minor)
    except ValueError as exc:
        import triton

        raise UserError(f"TensorRT could not launch our pixel-shuffle kernel as Triton {triton.__version__} "
                        f"compiles it ({exc}); export with --no-plugin (TensorRT's own ops)") from None


def _driver_ptx_limit():
    """Newest PTX this machine's CUDA driver loads (None: unknown)."""
    from .kernels.aot import cuda_driver_version, driver_ptx_limit

    version = cuda_driver_version()
    try:
        return driver_ptx_limit(version) if version else None
    except ValueError:  # a driver older than any TensorRT 10 supports: TensorRT itself will say so
        return None


def _gpu() -> Tuple[str, Tuple[int, int]]:
    import torch

    if not torch.cuda.is_available():
        raise UserError("TensorRT needs an NVIDIA GPU and PyTorch sees none; use the .onnx with --backend onnxruntime")
    return torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def _network_flags(trt) -> int:
    flags = 0
    for name in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):  # 11.x ignores the first; 10.9+ has the second
        if hasattr(trt.NetworkDefinitionCreationFlag, name):
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    return flags


def build_engine(trt, stage_model: onnx.ModelProto, profile: Profile, cache_bytes: bytes, logger, plugin: bool,
                 log: Callable[[str], None] = print):
    """Serialized engine for one stage, and the updated timing cache."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(stage_model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse the ONNX graph: {errors}")
    problem = shuffle_layer_error([network.get_layer(i).type.name for i in range(network.num_layers)], plugin)
    if problem:
        raise UserError(problem)
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # an fp32 graph means fp32 (parity with torch within 1e-5)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(network.get_input(0).name, profile.min, profile.opt, profile.max)
    if config.add_optimization_profile(opt_profile) < 0:  # -1: TensorRT found the profile invalid
        raise UserError(f"TensorRT refused the optimization profile {profile} for input "
                        f"{tuple(network.get_input(0).shape)} (see its log above)")
    saved = config.create_timing_cache(cache_bytes)
    if saved is None or not config.set_timing_cache(saved, ignore_mismatch=False):
        log("the saved TensorRT timing cache cannot be read or does not match this GPU; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see its log above); try a smaller --tile")
    cache = config.get_timing_cache()
    return bytes(plan), bytes(memoryview(cache.serialize())) if cache is not None else cache_bytes


def build_engines(onnx_path: Path, graph: onnx.ModelProto, options, plugin: bool = True, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """One engine per stage (ensemble and back-projection run between stages) plus a JSON manifest."""
    trt = require_tensorrt()
    gpu_name, capability = _gpu()
    config = ModelConfig.from_json(onnx_graph.read_metadata(graph)["config"])
    ptx_isa = None
    if plugin:
        from .kernels.aot import ptx_isa as read_isa

        register_plugin()
        kernels = [aot_kernel(dtype, tuple(int(f) for f in factors))  # the plugin's autotune offers both types
                   for factors in config.stages for dtype in ("fp32", "fp16")]
        ptx_isa = max((read_isa(k.asm["ptx"]) or 0) for k in kernels) or None
    profiles = stage_profiles(config.stages, config.arch, options.tile, options.bp_iters, options.ensemble,
                              planar=config.axes == "YX")
    problem = plugin_size_error(config.stages, profiles) if plugin else ""
    if problem:
        raise UserError(problem)
    outdir = onnx_path.parent
    kind = "plugin" if plugin else "builtin"
    manifest_path = outdir / f"{onnx_path.stem}.{kind}.trt.json"
    if manifest_path.exists() and not overwrite:
        raise UserError(f"{manifest_path} already exists; pass --overwrite to rebuild")
    cache_path = outdir / timing_cache_name(trt.__version__, capability)
    trusted = written_only_by_me(cache_path) and written_only_by_me(outdir)  # TensorRT deserializes it
    if cache_path.exists() and not trusted:
        log(f"not reading the timing cache {cache_path}: other users can write to it; starting a new one")
    cache = cache_path.read_bytes() if cache_path.is_file() and trusted else b""
    logger = trt.Logger(trt.Logger.WARNING)
    names = []
    for i, profile in enumerate(profiles):
        stage_model = onnx_graph.extract_stage(graph, i)
        if not plugin:
            stage_model = without_plugin(stage_model)
        log(f"building TensorRT engine for stage {i + 1}/{len(profiles)} ({kind} shuffle, up to {profile.max})...")
        plan, cache = build_engine(trt, stage_model, profile, cache, logger, plugin, log)
        name = f"{onnx_path.stem}.{kind}.stage{i + 1}.engine"
        with atomic_output(outdir / name) as tmp:
            tmp.write_bytes(plan)
        names.append(name)
    with atomic_output(cache_path) as tmp:
        tmp.write_bytes(cache)
    manifest = EngineManifest(
        engines=tuple(names), profiles=tuple(profiles), tile=tuple(options.tile), tensorrt_version=trt.__version__, gpu_name=gpu_name,
        compute_capability=capability, plugin=plugin, plugin_version=shuffle_op.PLUGIN_VERSION,
        precision=onnx_graph.read_metadata(graph)["precision"], source_onnx=onnx_path.name,
        source_onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(), config=config.to_json(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), ptx_isa=ptx_isa,
    )
    with atomic_output(manifest_path) as tmp:
        tmp.write_text(manifest.to_json())
    return manifest_path


def read_manifest(path: Union[str, Path]) -> EngineManifest:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such engine manifest")
    try:
        return EngineManifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UserError(f"{path} is not an sv-deploy engine manifest ({exc}); build one with 'sv-deploy export --engine'") from None


class TensorRTBackend:
    """Runs the per-stage engines behind `Backend.predict`, on one CUDA stream."""

    def __init__(self, manifest_path: Union[str, Path]):
        import torch

        path = Path(manifest_path)
        self.manifest = read_manifest(path)  # first: a file that is not ours is that, TensorRT or not
        trt = require_tensorrt()
        gpu_name, capability = _gpu()
        check_compatible(self.manifest, trt.__version__, gpu_name, capability, where=str(path),
                         driver_ptx_limit=_driver_ptx_limit())
        if self.manifest.plugin:
            try:  # for the JIT path only (nodes with aot=0); our engines are AOT: their kernel is inside
                register_plugin()
            except UserError:  # no Triton here, or a refused definition: an AOT engine runs without it
                pass
        try:
            self.config = ModelConfig.from_json(self.manifest.config)
        except ValueError as exc:
            raise UserError(f"{path}: the model config in it cannot be read ({exc}); rebuild the engine") from None
        self.tile = self.manifest.tile  # tiles beyond the engine's profiles cannot run
        self.dtype = torch.float16 if self.manifest.precision == "fp16" else torch.float32
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self.engines, self.contexts = [], []
        for engine_path in engine_paths(path.parent, self.manifest):
            engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if engine is None:
                raise UserError(f"TensorRT could not load {engine_path}; rebuild it with 'sv-deploy export --engine'")
            context = engine.create_execution_context()
            if context is None:
                raise UserError(f"TensorRT could not create an execution context for {engine_path.name} (out of GPU memory?)")
            self.engines.append(engine)
            self.contexts.append(context)
        self.io = [self._io_names(trt, e) for e in self.engines]
        self.stream = torch.cuda.Stream()
        self.transfers, self._staging = TransferTimes(), PinnedStaging()
        self.name = f"tensorrt {trt.__version__} ({'plugin' if self.manifest.plugin else 'built-in'} shuffle, {self.manifest.precision})"

    @staticmethod
    def _io_names(trt, engine) -> Tuple[str, str]:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        return inputs[0], outputs[0]

    def predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        import torch

        problem = profile_error(stage, self.manifest.profiles[stage], x.shape)
        if problem:
            raise UserError(problem)
        ctx = self.contexts[stage]
        in_name, out_name = self.io[stage]

        def execute(inp):  # runs on self.stream, between the timed copies
            inp = inp.to(self.dtype)
            if not ctx.set_input_shape(in_name, tuple(inp.shape)):
                raise UserError(f"TensorRT refused input shape {tuple(inp.shape)} for stage {stage + 1}")
            out = torch.empty(tuple(ctx.get_tensor_shape(out_name)), dtype=self.dtype, device="cuda")
            ctx.set_tensor_address(in_name, inp.data_ptr())
            ctx.set_tensor_address(out_name, out.data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise UserError(f"TensorRT failed to run stage {stage + 1}")
            return out

        return run_on_gpu(x, execute, "cuda", self.stream, self._staging, self.transfers)

