"""The Triton kernel as a TensorRT AOT plugin embeds it: PTX a driver loads, launchable with
TensorRT's arguments (`kernels.aot`). Compiled for an H100 (sm_90) without a GPU.

Compiled in a fresh process: test_kernel.py may have put Triton in interpreter mode, which cannot
compile.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from sv_deploy.kernels import aot  # noqa: E402
from sv_deploy.kernels.aot import driver_ptx_limit, ptx_isa  # noqa: E402

OLDEST_CHECKED = (80, 89, 90, 100, 120)  # Ampere, Ada, Hopper, Blackwell data centre and desktop

SCRIPT = """
import json
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from sv_deploy.kernels import aot
from sv_deploy.kernels.pixel_shuffle3d import compile_plain

H100 = GPUTarget("cuda", 90, 32)

@triton.jit
def descriptor_copy(x_ptr, n, y_ptr, BLOCK: tl.constexpr):  # an on-device TMA descriptor needs global scratch
    desc = tl.make_tensor_descriptor(x_ptr, shape=[n], strides=[1], block_shape=[BLOCK])
    tl.store(y_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), desc.load([tl.program_id(0) * BLOCK]))

def at_oldest(capability):  # "ok", or why Triton refused the table's ISA for this architecture
    try:
        compile_plain("fp32", (2, 2, 2), target=GPUTarget("cuda", capability, 32),
                      ptx_version=aot.MIN_PTX_ISA[capability])
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"

def ours(isa):
    return compile_plain("fp16", (1, 2, 2), target=H100, ptx_version=isa)

def for_driver(version):
    try:
        compiled = aot.compile_for_aot(ours, 7, version, 90)
    except ValueError as exc:
        return {"isa": None, "error": str(exc)}
    return {"isa": aot.ptx_isa(compiled.asm["ptx"]), "error": None}

tma = triton.compile(triton.compiler.ASTSource(fn=descriptor_copy, constexprs={"BLOCK": 64},
                     signature={"x_ptr": "*fp32", "n": "i32", "y_ptr": "*fp32"}), target=H100)
own = ours(None)
print(json.dumps({
    "own_isa": aot.ptx_isa(own.asm["ptx"]),
    "own": aot.launch_problems(own.metadata, own.asm["ptx"], 7),
    "own_given_5": aot.launch_problems(own.metadata, own.asm["ptx"], 5),
    "tma": aot.launch_problems(tma.metadata, tma.asm["ptx"], 3),
    "tma_scratch": getattr(tma.metadata, "global_scratch_size", 0),
    "drivers": {str(v): for_driver(v) for v in (None, 12040, 11080)},
    "oldest": {str(c): at_oldest(c) for c in %r},
}))
""" % (OLDEST_CHECKED,)

SCRIPT_BELOW = """
import sys
from triton.backends.compiler import GPUTarget
from sv_deploy.kernels.pixel_shuffle3d import compile_plain

compile_plain("fp32", (2, 2, 2), target=GPUTarget("cuda", int(sys.argv[1]), 32), ptx_version=int(sys.argv[2]))
print("COMPILED")
"""


def previous_isa(isa: int) -> int:
    """The PTX ISA released before this one (8.0 -> 7.8; there is no 7.9)."""
    last_minor = {6: 5, 7: 8, 8: 8}
    return isa - 1 if isa % 10 else (isa // 10 - 1) * 10 + last_minor[isa // 10 - 1]


def _compile_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    script = tmp_path_factory.mktemp("aot") / "compile_for_h100.py"  # Triton reads a kernel's source from its file
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_compile_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_our_kernel_reads_only_what_tensorrt_passes(compiled):
    assert compiled["own"] == []
    # The check sees parameter reads: told TensorRT passes only 5, the scalar and output reads show.
    assert compiled["own_given_5"] == ["it reads hidden parameter(s) [5, 6] that TensorRT passes as null"]


def test_a_kernel_that_needs_scratch_memory_is_refused(compiled):
    if not compiled["tma_scratch"]:
        pytest.skip("this Triton builds on-device TMA descriptors without global scratch")
    assert any("global scratch memory" in p for p in compiled["tma"])
    assert "it reads hidden parameter(s) [3] that TensorRT passes as null" in compiled["tma"]


def test_ptx_is_compiled_for_the_driver(compiled):
    drivers = compiled["drivers"]
    assert drivers["None"] == {"isa": compiled["own_isa"], "error": None}  # no driver known: Triton's own ISA
    assert compiled["own_isa"] > 84  # else the next line shows nothing
    assert drivers["12040"] == {"isa": 84, "error": None}  # a CUDA 12.4 driver loads up to ISA 8.4
    # sm_90 PTX needs ISA 7.8 at least (sm_90a, which Triton targets, 8.0): a CUDA 11.8 driver cannot
    # load it, refused before Triton is asked (Triton 3.9's LLVM aborts the process on such a request).
    assert drivers["11080"]["isa"] is None and "update the NVIDIA driver" in drivers["11080"]["error"]
    assert "sm_90a needs ISA 8.0" in drivers["11080"]["error"]


def test_our_kernel_compiles_at_the_oldest_isa_each_architecture_takes(compiled):
    # A table entry too low would fail here (Triton 3.9 would end the fixture's process instead).
    assert compiled["oldest"] == {str(c): "ok" for c in OLDEST_CHECKED}


@pytest.mark.parametrize("capability", OLDEST_CHECKED)
def test_the_isa_before_the_oldest_is_refused_by_triton_itself(tmp_path, capability):
    """A table entry too high would fail here; and why the table is checked first: below it
    Triton's compiler fails (3.9's LLVM aborts the process, 3.6's ptxas raises)."""
    script = tmp_path / "below_oldest.py"
    script.write_text(SCRIPT_BELOW)
    below = previous_isa(aot.MIN_PTX_ISA[capability])
    proc = subprocess.run([sys.executable, str(script), str(capability), str(below)], capture_output=True,
                          text=True, env=_compile_env(), timeout=300)
    assert proc.returncode != 0 and "COMPILED" not in proc.stdout
    # 3.9: "LLVM ERROR: PTX version 7.8 does not support target 'sm_90a'"; 3.6, from ptxas:
    # "PTX .version 7.8 does not support .target sm_90a"
    assert "does not support" in proc.stderr and f"{below // 10}.{below % 10}" in proc.stderr, proc.stderr[-2000:]
    assert aot.triton_arch(capability) in proc.stderr, proc.stderr[-2000:]


def test_previous_isa_skips_the_versions_never_released():
    assert [previous_isa(v) for v in (80, 70, 90, 87, 63)] == [78, 65, 88, 86, 62]


def test_driver_isa_limits_agree_with_triton():
    from triton.backends.nvidia.compiler import ptx_get_version

    for major, minors in ((11, range(0, 9)), (12, range(0, 10)), (13, range(0, 3))):
        for minor in minors:
            assert driver_ptx_limit(major * 1000 + minor * 10) == ptx_get_version(f"{major}.{minor}"), (major, minor)
    assert (driver_ptx_limit(12080), driver_ptx_limit(13000)) == (87, 90)  # NVIDIA's PTX ISA table


def test_ptx_isa_reads_the_version_line():
    assert ptx_isa("//\n.version 8.7\n.target sm_90a\n") == 87
    assert ptx_isa(".target sm_90a\n") is None
