"""CUDA torch backend: pinned staging and timed copies give the CPU backend's result (GPU only)."""

import numpy as np
import pytest
import torch

from sv_deploy.backends import TorchBackend
from sv_deploy.config import ArchConfig
from sv_deploy.model import SVStage

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_cuda_backend_matches_cpu_and_times_its_copies(monkeypatch):
    torch.manual_seed(0)
    stage = SVStage((1, 2, 2), ArchConfig()).eval()
    cpu = TorchBackend([stage], torch.device("cpu"))
    gpu = TorchBackend([SVStage((1, 2, 2), ArchConfig()).eval()], torch.device("cuda"))
    gpu.stages[0].load_state_dict(stage.state_dict())
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, to compare at 1e-5
    rng = np.random.default_rng(0)
    big = rng.random((2, 1, 6, 40, 40), dtype=np.float32)
    small = big[:1, :, :4, :24, :32]  # not contiguous: the staging copy handles it
    for x in (big, small):
        want = cpu.predict(0, x)
        got = gpu.predict(0, x)
        assert got.shape == want.shape == (x.shape[0], 1, x.shape[2], x.shape[3] * 2, x.shape[4] * 2)
        assert np.abs(got - want).max() <= 1e-5 * (want.max() - want.min())
    t = gpu.transfers
    assert t.calls == 2 and t.host_to_device_s > 0 and t.device_to_host_s > 0 and t.compute_s > 0
    first = gpu.predict(0, small)
    assert not np.shares_memory(first, gpu.predict(0, big))  # results are not views of the reused buffer
    t.reset()
    assert (t.calls, t.host_to_device_s) == (0, 0.0)
