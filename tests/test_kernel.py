"""The Triton pixel-shuffle kernel (the TensorRT plugin's kernel) against the NumPy reference.

Without a GPU it runs in Triton's CPU interpreter (TRITON_INTERPRET=1); with one, on the GPU.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from sv_deploy.kernels.pixel_shuffle3d import Epilogue, launch_grid, output_shape, pixel_shuffle3d  # noqa: E402

from reference import shuffle_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FACTORS = [(2, 2, 2), (1, 2, 2), (2, 1, 3), (3, 2, 1), (1, 4, 4), (4, 4, 4)]


def random_input(factors, channels_out=1, dtype=torch.float32, seed=0):
    rng = np.random.default_rng(seed)
    shape = (2, channels_out * int(np.prod(factors)), 3, 5, 7)
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("factors", FACTORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plain_shuffle_is_exact(factors, dtype):
    x = random_input(factors, channels_out=2, dtype=dtype)
    got = pixel_shuffle3d(x, factors)
    assert got.dtype == dtype
    ref = shuffle_reference(x.cpu().float().numpy(), factors)
    np.testing.assert_array_equal(got.cpu().float().numpy(), ref)


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 3)])
@pytest.mark.parametrize("out_dtype,low,high", [(torch.uint8, 0, 255), (torch.uint16, 0, 65535)])
def test_fused_denormalize_clamp_round_cast(factors, out_dtype, low, high):
    x = random_input(factors, dtype=torch.float16, seed=3)
    scale, offset = (700.0, 40.0) if out_dtype == torch.uint8 else (40000.0, 30000.0)
    got = pixel_shuffle3d(x, factors, Epilogue(scale, offset, (low, high), round=True), out_dtype=out_dtype)
    ref = shuffle_reference(x.cpu().float().numpy(), factors) * np.float32(scale) + np.float32(offset)
    ref = np.floor(np.clip(ref, low, high) + 0.5)
    assert got.dtype == out_dtype
    values = got.cpu().numpy().astype(np.int64)
    assert values.min() == low and values.max() == high  # the clamp was exercised at both ends
    np.testing.assert_array_equal(values, ref.astype(np.int64))


def test_float_epilogue_without_clamp():
    x = random_input((1, 2, 2), seed=5)
    got = pixel_shuffle3d(x, (1, 2, 2), Epilogue(2.5, -1.0), out_dtype=torch.float32)
    ref = shuffle_reference(x.cpu().numpy(), (1, 2, 2)) * 2.5 - 1.0
    np.testing.assert_allclose(got.cpu().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_writes_into_a_given_buffer_and_checks_it():
    x = random_input((2, 2, 2))
    out = torch.empty(output_shape(x.shape, (2, 2, 2)), device=DEVICE)
    assert pixel_shuffle3d(x, (2, 2, 2), out=out) is out
    with pytest.raises(ValueError, match="contiguous tensor of shape"):
        pixel_shuffle3d(x, (2, 2, 2), out=torch.empty(3, device=DEVICE))


def test_shape_and_grid_arithmetic():
    assert output_shape((1, 16, 4, 5, 6), (2, 2, 2)) == (1, 2, 8, 10, 12)
    with pytest.raises(ValueError, match="cannot be shuffled"):
        output_shape((1, 6, 4, 5, 6), (2, 2, 2))
    assert launch_grid(1, 1024) == (1, 1, 1)
    assert launch_grid(1024, 1024) == (1, 1, 1)
    assert launch_grid(1025, 1024) == (2, 1, 1)


AOT_SCRIPT = """
import json, re, sys
from triton.backends.compiler import GPUTarget
from sv_deploy.kernels.pixel_shuffle3d import NUM_WARPS, compile_plain
compiled = compile_plain(sys.argv[1], (1, 2, 3), target=GPUTarget("cuda", 90, 32))
ptx, name = compiled.asm["ptx"], compiled.metadata.name
kinds = re.findall(r"\\.param \\.(\\w+)[^\\n]*" + name + r"_param_", ptx)
print(json.dumps({"entry": f".entry {name}(" in ptx, "kinds": kinds, "warps": compiled.metadata.num_warps == NUM_WARPS}))
"""


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_ahead_of_time_compile_gives_ptx_with_the_plugin_argument_order(dtype):
    """What the TensorRT plugin's aot_impl embeds: PTX for (input, 5 int32 scalars, output).

    Compiled in a fresh process: this module runs Triton in interpreter mode, which cannot compile.
    """
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, dtype], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["entry"] and got["warps"]
    assert got["kinds"][:7] == ["u64", "u32", "u32", "u32", "u32", "u32", "u64"]  # x, n_out, c, d, h, w, y
