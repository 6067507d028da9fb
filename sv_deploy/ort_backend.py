"""ONNX Runtime backend: runs an exported .onnx behind the same `Backend.predict` as torch.

One file holds all stages chained; per-stage sessions come from sub-models cut at the named stage
outputs, so the ensemble and back-projection between stages stay in `enhance`, shared by all backends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import onnx

from . import onnx_graph
from .config import ModelConfig
from .errors import UserError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def load_onnx(path: Union[str, os.PathLike]) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf and onnx raise their own types for bytes that are not ONNX
        raise UserError(f"{path} is not an ONNX file, or it is damaged or truncated ({type(exc).__name__}); "
                        "export it again with 'sv-deploy export'") from None
    try:
        onnx_graph.read_metadata(model)
    except ValueError as exc:
        raise UserError(f"{path} is not an sv-deploy ONNX export ({exc}); create one with 'sv-deploy export'") from None
    try:
        onnx_graph.verify(model)
    except ValueError as exc:
        raise UserError(f"{path} fails its checksum: {exc}; export it again with 'sv-deploy export'") from None
    return model


class ExportWillNotRun(UserError):
    """ONNX Runtime refused a graph whose digest holds (a cached export damaged, or a foreign one)."""


def onnx_config(model: onnx.ModelProto) -> ModelConfig:
    try:
        return ModelConfig.from_json(onnx_graph.read_metadata(model)["config"])
    except (ValueError, KeyError) as exc:
        raise UserError(f"this export's model config cannot be read ({exc}); export the .svmodel again") from None


def session_options(threads: Optional[int] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Idle pool threads otherwise spin after each run and take a core from the back-projection that
    # follows: the full-recipe x4 of a 38x128x128 volume took 53.7 s spinning, 46.8 s not (2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    return opts


def pick_providers(device: str) -> List[Union[str, Tuple[str, dict]]]:
    """auto: CUDA when onnxruntime-gpu offers it, else CPU; cuda[:N]: CUDA required, on GPU N (with
    CPU fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device.startswith("cuda") and CUDA not in available:
        raise UserError(
            "ONNX Runtime here has no CUDA execution provider; install onnxruntime-gpu "
            "(pip install 'sv-deploy[gpu]') or use --device cpu"
        )
    if CUDA not in available:
        return [CPU]
    index = device.partition(":")[2] if device.startswith("cuda") else ""
    if index and not index.isdigit():
        raise UserError(f"unknown device '{device}'; use auto, cpu or cuda[:N]")
    return [(CUDA, {"device_id": int(index or 0)}), CPU]


def _names(providers) -> List[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


class OnnxRuntimeBackend:
    def __init__(self, model: Union[onnx.ModelProto, str, os.PathLike], device: str = "auto",
                 threads: Optional[int] = None, log: Callable[[str], None] = print):
        import onnxruntime as ort

        if not isinstance(model, onnx.ModelProto):
            model = load_onnx(model)
        self.model = model
        self.config = onnx_config(model)
        self.folded_ensemble = onnx_graph.read_metadata(model).get("folded_ensemble") == "1"
        self.dtype = np.float16 if onnx_graph.is_fp16(model) else np.float32
        providers = pick_providers(device)
        opts = session_options(threads)
        try:
            count = len(onnx_graph.stage_tensors(model)) - 1
            if providers == [CPU] and self.dtype == np.float32:  # the same function, faster on the CPU kernels
                model = onnx_graph.prelu_as_max(model)
            parts = [onnx_graph.extract_stage(model, i) for i in range(count)]
            self.sessions = [
                ort.InferenceSession(p.SerializeToString(), sess_options=opts, providers=providers) for p in parts
            ]
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnx's and ONNX Runtime's errors share no base class
            # the digest holds (checked on load), so the graph came from another writer or was made by hand
            raise ExportWillNotRun(f"ONNX Runtime cannot run this export ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); export the .svmodel again") from None
        self._chain = None
        active = self.sessions[0].get_providers()
        if CUDA in _names(providers) and CUDA not in active:
            # get_available_providers lists what the package was built with, not what loads here
            if device.startswith("cuda"):
                raise UserError("ONNX Runtime could not start its CUDA execution provider (its CUDA/cuDNN "
                                "libraries do not load); use --device cpu, or an onnxruntime-gpu built for this CUDA")
            log("warning: ONNX Runtime could not start its CUDA execution provider; running on CPU")
        self.name = f"onnxruntime ({'cuda' if CUDA in active else 'cpu'}, {'fp16' if self.dtype == np.float16 else 'fp32'})"
        self._providers, self._opts = providers, opts

    def predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        session = self.sessions[stage]
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=self.dtype)}
        return session.run(None, feed)[0].astype(np.float32, copy=False)

    def run_chain(self, x: np.ndarray) -> np.ndarray:
        """All stages in one call on the whole file (what an external runtime sees)."""
        import onnxruntime as ort

        if self._chain is None:
            self._chain = ort.InferenceSession(
                self.model.SerializeToString(), sess_options=self._opts, providers=self._providers
            )
        feed = {"input": np.ascontiguousarray(x, dtype=self.dtype)}
        return self._chain.run(None, feed)[0].astype(np.float32, copy=False)
