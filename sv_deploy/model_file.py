"""The model file: safetensors weights + typed config + checksum, in one file a user can mail.

safetensors holds raw tensors and a string header, so loading can never execute code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from safetensors import safe_open

from .config import ModelConfig
from .errors import UserError
from .model import SVStage
from .volume_io import atomic_output

FORMAT = "sv-deploy-model"
FORMAT_VERSION = "1"
SUFFIX = ".svmodel"


def _checksum(config_json: str, tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(config_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def stage_tensors(stages: List[SVStage]) -> Dict[str, torch.Tensor]:
    return {
        f"stage{i}.{name}": t.detach().cpu().float().contiguous()
        for i, stage in enumerate(stages)
        for name, t in stage.state_dict().items()
    }


def save_model(path: os.PathLike | str, config: ModelConfig, stages: List[SVStage]) -> str:
    tensors = stage_tensors(stages)
    config_json = config.to_json()
    digest = _checksum(config_json, tensors)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_json, "sha256": digest}
    with atomic_output(path) as tmp:  # bytes written by Python, so a full disk is an OSError
        tmp.write_bytes(save(tensors, metadata=metadata))
    return digest


def read_header(path: os.PathLike | str) -> Dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF and BigTIFF
            raise UserError(f"{path} is an image, not a model file; give a .svmodel from 'sv-deploy train' "
                            "(a command's model comes before its images: infer MODEL INPUT -o OUTPUT)") from None
        if path.suffix.lower() == ".onnx":
            raise UserError(f"{path} is an ONNX export, not a .svmodel; give the .svmodel it was exported from "
                            "(infer and info take either)") from None
        raise UserError(f"{path} is not an sv-deploy model file, or it is truncated or damaged ({exc}); "
                        "train one with 'sv-deploy train' or get a fresh copy") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not an sv-deploy model; train one with 'sv-deploy train'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has model format version {meta.get('format_version')}; this sv-deploy reads version "
            f"{FORMAT_VERSION}: use a matching sv-deploy release"
        )
    return meta


def load_model(path: os.PathLike | str):
    """Return (config, stages, sha256), verifying the checksum before anything is used."""
    meta = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError) as exc:
        raise UserError(f"{path} is damaged ({exc}); get a fresh copy or re-train the model") from None
    foreign = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.dtype != torch.float32})
    if foreign:  # `save_model` writes float32 only
        raise UserError(f"{path} holds {', '.join(foreign)} weights, which sv-deploy never writes: the file was "
                        "edited or made by another program; get a fresh copy or re-train the model")
    if "config" not in meta or _checksum(meta["config"], tensors) != meta.get("sha256"):
        raise UserError(f"{path} fails its checksum: the file is corrupt or was edited; get a fresh copy")
    try:  # the checksum holds, so a config that does not parse comes from a newer or foreign writer
        config = ModelConfig.from_json(meta["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: its config cannot be read ({exc}); use the sv-deploy release that made it, "
                        "or get a fresh copy") from None
    stages = []
    for i, factors in enumerate(config.stages):
        prefix = f"stage{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            stage = SVStage(factors, config.arch)
            stage.load_state_dict(state)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{path}: weights do not match the stored config ({exc})") from None
        stages.append(stage)
    return config, stages, meta["sha256"]
