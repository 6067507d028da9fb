"""Trained model -> one ONNX file (both stages chained, PixelShuffle3D as a custom node + local function).

The torch exporter traces the same modules inference uses, so the ONNX graph cannot drift from the
network; everything ONNX-specific after tracing is a pure edit in `onnx_graph`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import platform
import warnings
from pathlib import Path
from typing import List, Sequence

import onnx
import torch
from torch import nn

from . import __version__, onnx_graph
from .config import ModelConfig
from .errors import UserError
from .model import SVStage, fold_stages
from .volume_io import atomic_output

PRECISIONS = ("fp32", "fp16")
_TRACE_SHAPE = (2, 1, 6, 10, 10)  # sizes > 1 so no axis is specialised as static


class Chain(nn.Module):
    """All stages in one call: the whole x4 (without the between-stage ensemble and back-projection)."""

    def __init__(self, stages: Sequence[SVStage]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def _strip_trace_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and names: noise in a file users mail around."""
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        del value.metadata_props[:]


def to_onnx(config: ModelConfig, stages: List[SVStage], source_sha256: str, precision: str = "fp32",
            folded_ensemble: bool = False) -> onnx.ModelProto:
    """The chained stages as one ONNX graph; with `folded_ensemble` each stage computes its whole
    self-ensemble in one pass (`model.fold_ensemble`; marked in the metadata, and such a graph
    then only serves runs with the ensemble)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; use fp32 or fp16")
    if folded_ensemble:
        stages = fold_stages(stages)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    chain = Chain([copy.deepcopy(s).cpu() for s in stages]).to(dtype).eval()
    planar = config.axes == "YX"  # a 2D model: depth fixed at 1, single-plane convolutions in the graph
    shape = (_TRACE_SHAPE[0], 1, 1, *_TRACE_SHAPE[3:]) if planar else _TRACE_SHAPE
    example = torch.zeros(shape, dtype=dtype)
    dims = {0: torch.export.Dim("N"), 3: torch.export.Dim("H"), 4: torch.export.Dim("W")}
    if not planar:
        dims[2] = torch.export.Dim("D")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            chain, (example,), dynamo=True, input_names=["input"], output_names=["output"],
            opset_version=18, dynamic_shapes=(dims,), verbose=False, optimize=True,
        )
    model = program.model_proto
    _strip_trace_metadata(model)
    names = onnx_graph.name_stage_outputs(model)
    metadata = {
        "format": onnx_graph.META_FORMAT,
        "config": config.to_json(),
        "stages": json.dumps([list(f) for f in config.stages]),
        "factors": onnx_graph.json_field(config.total_factors()),
        "stage_tensors": json.dumps(names),
        "halo": str(config.arch.halo()),
        "precision": precision,
        "folded_ensemble": "1" if folded_ensemble else "0",
        "source_sha256": source_sha256,
        "versions": json.dumps({
            "sv_deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "python": platform.python_version(),
        }),
    }
    return onnx_graph.finish(model, metadata)


def onnx_path(outdir: Path, model_path: Path, precision: str) -> Path:
    suffix = "" if precision == "fp32" else f".{precision}"
    return outdir / f"{model_path.stem}{suffix}.onnx"


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    with atomic_output(path) as tmp:
        onnx.save_model(model, str(tmp))
