"""What a TensorRT ahead-of-time (AOT) plugin launch can run of a Triton-compiled kernel.

TensorRT launches an AOT plugin's PTX itself, with (input pointers, extra int32 scalars, output
pointers) and null for any later kernel parameter. Triton appends hidden pointer parameters to
every kernel (global scratch from 3.3, profile scratch from 3.5) and its own launcher fills them;
null is exactly what that launcher passes when their size is 0 (NVIDIA's Torch-TensorRT AOT
Triton path relies on the same, `torch_tensorrt/kernels/_triton.py`). So a compiled kernel is
accepted only if it never reads a parameter past the ones TensorRT passes and needs none of the
launch features Triton's launcher sets up (scratch memory, clusters, a cooperative grid,
programmatic dependent launch, tensor memory, TMA descriptors).

The PTX ISA version Triton writes follows its bundled ptxas (8.7 for Triton 3.6), and a CUDA driver
refuses PTX newer than its own CUDA version (a 12.4 driver loads up to 8.4); TensorRT would only
fail when it loads the engine. `compile_for_aot` compiles for the installed driver instead, and
refuses before compiling where that driver's ISA is older than the GPU's architecture needs (Triton
3.9's LLVM aborts the whole process on such a request rather than raising).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
from typing import Any, Callable, List, Optional

#: (metadata field, what it means): a launch feature TensorRT's AOT launch does not set up when non-zero.
UNSUPPORTED_FEATURES = (
    ("global_scratch_size", "global scratch memory"),
    ("profile_scratch_size", "profile scratch memory"),
    ("launch_cooperative_grid", "a cooperative grid"),
    ("launch_pdl", "programmatic dependent launch"),
    ("tmem_size", "tensor memory"),
    ("tensordesc_meta", "TMA tensor descriptors"),
)


#: Oldest PTX ISA that can target each architecture as Triton names it (`sm_90a` from compute
#: capability 9.0 on: Triton compiles for the arch-specific target), from LLVM's NVPTX processor table.
MIN_PTX_ISA = {75: 63, 80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 101: 86, 103: 88, 110: 90,
               120: 87, 121: 88}


def triton_arch(capability: int) -> str:
    """The target Triton compiles for: the arch-specific one (`sm_90a`) from capability 9.0 on."""
    return f"sm_{capability}{'a' if capability >= 90 else ''}"


def ptx_isa(ptx: str) -> Optional[int]:
    """`.version 8.7` -> 87 (Triton's `ptx_version` option takes this form)."""
    match = re.search(r"^\s*\.version\s+(\d+)\.(\d+)\s*$", ptx, flags=re.MULTILINE)
    return int(match.group(1)) * 10 + int(match.group(2)) if match else None


def driver_ptx_limit(driver_version: int) -> int:
    """Newest PTX ISA a CUDA driver loads, from its `cuDriverGetVersion` number (12040 = CUDA 12.4).

    Per NVIDIA's PTX ISA release history: CUDA 11.x -> 7.x, 12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5,
    12.8 -> 8.7, 12.9 -> 8.8, 13.x -> 9.x (the mapping Triton uses for its own ptxas).
    """
    major, minor = driver_version // 1000, (driver_version % 1000) // 10
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor if minor < 6 else 79 + minor
    if major == 11:
        return 70 + minor
    raise ValueError(f"CUDA driver version {major}.{minor} is older than any TensorRT 10 supports")


def cuda_driver_version() -> Optional[int]:
    """The installed CUDA driver's version number, or None where no driver can be loaded."""
    name = "nvcuda.dll" if sys.platform == "win32" else (ctypes.util.find_library("cuda") or "libcuda.so.1")
    try:
        lib = ctypes.WinDLL(name) if sys.platform == "win32" else ctypes.CDLL(name)  # type: ignore[attr-defined]
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:  # needs no cuInit
            return None
    except (OSError, AttributeError):
        return None
    return version.value or None


def launch_problems(metadata: Any, ptx: str, passed_params: int) -> List[str]:
    """Why TensorRT's AOT launch could not run this compiled kernel (empty: it can).

    `passed_params`: how many parameters TensorRT passes (inputs + extra scalars + outputs).
    Triton before 3.5 lacks some metadata fields (they count as unused here); the PTX check does not
    depend on them: a kernel that uses scratch memory reads the pointer TensorRT leaves null.
    """
    name = metadata.name
    problems = [f"it needs {what} ({field} = {getattr(metadata, field)})"
                for field, what in UNSUPPORTED_FEATURES if getattr(metadata, field, 0)]
    if getattr(metadata, "num_ctas", 1) != 1:
        problems.append(f"it launches clusters of {metadata.num_ctas} blocks")
    entry = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.DOTALL)
    if entry is None:
        return problems + [f"its PTX has no entry point named {name}"]
    declared = len(re.findall(r"\.param\b", entry.group(1)))
    if declared < passed_params:
        problems.append(f"it declares {declared} parameters where TensorRT passes {passed_params}")
    body = ptx[entry.end():]
    read = sorted({int(k) for k in re.findall(re.escape(name) + r"_param_(\d+)\b", body)})
    hidden = [k for k in read if k >= passed_params]
    if hidden:
        problems.append(f"it reads hidden parameter(s) {hidden} that TensorRT passes as null")
    return problems


def compile_for_aot(compile_fn: Callable[[Optional[int]], Any], passed_params: int,
                    driver_version: Optional[int], capability: Optional[int] = None) -> Any:
    """`compile_fn(ptx_version)` (None: Triton's own ISA), at an ISA the driver loads, checked.

    `capability`: the target's compute capability as Triton numbers it (major * 10 + minor: 90 for
    9.0), to refuse a driver too old for it before Triton is asked (an architecture missing from
    `MIN_PTX_ISA` is left to Triton).
    Raises ValueError saying why TensorRT could not launch the result.
    """
    limit = driver_ptx_limit(driver_version) if driver_version else None

    def too_old(why: str) -> ValueError:
        return ValueError(f"the CUDA driver loads PTX up to ISA {limit // 10}.{limit % 10}, too old for "
                          f"this GPU's kernel ({why}); update the NVIDIA driver")

    needed = MIN_PTX_ISA.get(capability) if capability else None
    if limit is not None and needed is not None and limit < needed:
        raise too_old(f"{triton_arch(capability)} needs ISA {needed // 10}.{needed % 10}")
    compiled = compile_fn(None)
    isa = ptx_isa(compiled.asm["ptx"])
    if isa is not None and limit is not None and isa > limit:
        try:
            compiled = compile_fn(limit)
        except Exception as exc:  # Triton's compile errors have no common type
            raise too_old(type(exc).__name__) from None
    problems = launch_problems(compiled.metadata, compiled.asm["ptx"], passed_params)
    if problems:
        raise ValueError(f"kernel {compiled.metadata.name}: " + "; ".join(problems))
    return compiled
