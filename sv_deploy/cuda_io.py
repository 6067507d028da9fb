"""Host <-> GPU transfers for the CUDA backends: pinned staging buffers, one stream, timed copies.

Copies from page-locked (pinned) host memory go straight to the GPU by DMA, without the driver's own
staging copy, and can be asynchronous; the buffers grow to the largest pass seen and are reused,
because pinning memory is itself slow. (Not yet measured here: no GPU was lent so far.) CUDA events on the stream time host->device, compute and device->host separately, which
`sv-deploy bench` reports per file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np


@dataclass
class TransferTimes:
    """Seconds spent since the last reset, as measured by CUDA events on the backend's stream."""

    host_to_device_s: float = 0.0
    compute_s: float = 0.0
    device_to_host_s: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.host_to_device_s = self.compute_s = self.device_to_host_s = 0.0
        self.calls = 0


class PinnedStaging:
    """Grow-only pinned host buffers, one per role ("in", "out")."""

    def __init__(self):
        self._buffers: Dict[str, "object"] = {}

    def view(self, role: str, shape) -> "object":
        import torch

        count = int(np.prod(shape))
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < count:
            buf = torch.empty(count, dtype=torch.float32, pin_memory=True)
            self._buffers[role] = buf
        return buf[:count].view(tuple(shape))


def run_on_gpu(x: np.ndarray, compute: Callable, device, stream, staging: PinnedStaging,
               times: TransferTimes) -> np.ndarray:
    """float32 array -> pinned -> GPU -> compute(tensor) -> pinned -> new float32 array."""
    import torch

    host_in = staging.view("in", x.shape)
    host_in.numpy()[...] = x
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    stream.wait_stream(torch.cuda.current_stream(device))  # weights and earlier work on the default stream
    try:
        with torch.cuda.stream(stream):
            marks[0].record(stream)
            dev_in = host_in.to(device, non_blocking=True)
            marks[1].record(stream)
            dev_out = compute(dev_in).float()
            marks[2].record(stream)
            host_out = staging.view("out", dev_out.shape)
            host_out.copy_(dev_out, non_blocking=True)
            marks[3].record(stream)
    except BaseException:
        # an out-of-memory retry rewrites the same pinned buffer: the copy from it must be done
        stream.synchronize()
        raise
    marks[3].synchronize()
    times.host_to_device_s += marks[0].elapsed_time(marks[1]) / 1e3
    times.compute_s += marks[1].elapsed_time(marks[2]) / 1e3
    times.device_to_host_s += marks[2].elapsed_time(marks[3]) / 1e3
    times.calls += 1
    return host_out.numpy().copy()  # the staging buffer is reused by the next pass
