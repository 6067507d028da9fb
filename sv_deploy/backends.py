"""One way to run a model: every backend maps an LR batch to its upsampled batch for one stage.

Tiling, ensemble and back-projection live in `enhance` and are shared by all backends.
"""

from __future__ import annotations

from typing import List, Protocol, Sequence

import numpy as np
import torch

from .errors import UserError
from .model import SVStage


class Backend(Protocol):
    name: str

    def predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        """(N, 1, D, H, W) float32, normalized -> (N, 1, D*rz, H*ry, W*rx) float32."""
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
    def __init__(self, stages: Sequence[SVStage], device: torch.device):
        self.name = f"torch ({device.type})"
        self.device = device
        self.stages: List[SVStage] = [s.to(device).eval() for s in stages]

    def predict(self, stage: int, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            return self.stages[stage](t).float().cpu().numpy()
