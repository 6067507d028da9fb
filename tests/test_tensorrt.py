"""TensorRT engines with our plugin and with the built-in shuffle, against torch.

Needs tensorrt and an NVIDIA GPU; skipped otherwise (TensorRT cannot be installed where CI runs).
"""

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("TensorRT tests need an NVIDIA GPU", allow_module_level=True)

from sv_deploy.backends import TorchBackend  # noqa: E402
from sv_deploy.config import ModelConfig  # noqa: E402
from sv_deploy.enhance import InferenceOptions, enhance_volume  # noqa: E402
from sv_deploy.export import save_onnx, to_onnx  # noqa: E402
from sv_deploy.trt_engine import TensorRTBackend, build_engines  # noqa: E402


@pytest.mark.parametrize("plugin", [True, False])
def test_engine_matches_torch(trained_small, tmp_path, plugin):
    stage, _, x, (lo, hi) = trained_small
    config = ModelConfig(stages=((2, 2, 2),), norm_values=(lo, hi))
    graph = to_onnx(config, [stage], "0" * 64)
    path = tmp_path / "small.onnx"
    save_onnx(graph, path)
    options = InferenceOptions(ensemble=True, bp_iters=2, tile=(8, 24, 24))
    manifest = build_engines(path, graph, options, plugin=plugin, log=lambda m: None)
    runner = TensorRTBackend(manifest)
    ref = enhance_volume(TorchBackend([stage], torch.device("cpu")), config.stages, config.arch, x, options)
    got = enhance_volume(runner, config.stages, config.arch, x, options)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(ref.max() - ref.min()))
