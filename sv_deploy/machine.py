"""What machine a measurement was made on: the CPU, its features, the versions that ran."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

import psutil
import torch

# Vector-unit flags that decide how fast the CPU kernels can be: two machines both named "AMD EPYC"
# ran the same bench 1.4x apart (BENCH.md, session 15).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "asimd", "sve")


def cpu() -> dict:
    """The CPU's name, family/model, vector flags and count (from /proc/cpuinfo where there is one)."""
    name, family, model, flags = platform.processor(), None, None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                name = value
            elif key == "cpu family":
                family = value
            elif key == "model":
                model = value
            elif key in ("flags", "Features"):
                flags = [f for f in CPU_FLAGS if f in value.split()]
                break
    except OSError:
        pass
    return {"cpu": name, "cpu_family_model": None if family is None else f"{family}/{model}", "cpu_flags": flags,
            "cpus": os.cpu_count()}


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {**cpu(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu,
            "platform": platform.platform(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": module_version("onnxruntime")}


def module_version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None
