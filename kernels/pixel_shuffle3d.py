"""3D pixel shuffle with a fused epilogue, in Triton: the TensorRT plugin's kernel.

The shuffle is a pure copy of the largest tensor in the network, so its cost is memory traffic.
Each output element is read once and written once; de-normalization (scale, offset), clamping,
rounding and the cast to the output dtype happen in registers on the way, instead of as extra
passes over the output. Output order is contiguous, so stores coalesce; loads gather across the
r_z*r_y*r_x phase channels.

Channel convention (the same as `sv_deploy.model.pixel_shuffle_3d` and the ONNX function):
input channel c*R + (i*ry + j)*rx + k feeds output (c, z*rz + i, y*ry + j, x*rx + k).

Without a GPU, set TRITON_INTERPRET=1 before importing this module to run it on CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4
#: Stated, not left to Triton (3.9 warns that its default changes in 3.10): the epilogue's scale and
#: offset as a separate multiply and add, rounded as the CPU paths round them.
FP_FUSION = False


@dataclass(frozen=True)
class Epilogue:
    """y = clamp(x * scale + offset, low, high), rounded half up when the output is an integer type."""

    scale: float = 1.0
    offset: float = 0.0
    clamp: Optional[Tuple[float, float]] = None
    round: bool = False


def launch_grid(n_out: int, block: int = BLOCK) -> Tuple[int, int, int]:
    """One program per BLOCK output elements; a 1-D grid."""
    return (triton.cdiv(n_out, block), 1, 1)


def output_shape(shape: Sequence[int], factors: Sequence[int]) -> Tuple[int, ...]:
    n, c, d, h, w = (int(s) for s in shape)
    rz, ry, rx = (int(f) for f in factors)
    phases = rz * ry * rx
    if c % phases:
        raise ValueError(f"{c} channels cannot be shuffled by factors {tuple(factors)} ({phases} phases)")
    return (n, c // phases, d * rz, h * ry, w * rx)


@triton.jit
def _source_offsets(o, channels, depth, height, width, RZ: tl.constexpr, RY: tl.constexpr, RX: tl.constexpr):
    """Input element that lands on output element o (both flat, contiguous NCDHW)."""
    out_w = width * RX
    out_h = height * RY
    out_d = depth * RZ
    ox = o % out_w
    t = o // out_w
    oy = t % out_h
    t = t // out_h
    oz = t % out_d
    t = t // out_d
    c = t % channels
    n = t // channels
    phase = ((oz % RZ) * RY + (oy % RY)) * RX + (ox % RX)
    src_c = n * (channels * RZ * RY * RX) + c * (RZ * RY * RX) + phase
    return ((src_c * depth + oz // RZ) * height + oy // RY) * width + ox // RX


@triton.jit
def pixel_shuffle3d_kernel(
    x_ptr, n_out, channels, depth, height, width, y_ptr,
    RZ: tl.constexpr, RY: tl.constexpr, RX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Plain shuffle. Argument order (input, int scalars, output) is what TensorRT's AOT plugins pass."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_out
    src = _source_offsets(o, channels, depth, height, width, RZ, RY, RX)
    tl.store(y_ptr + o, tl.load(x_ptr + src, mask=mask), mask=mask)


@triton.jit
def pixel_shuffle3d_epilogue_kernel(
    x_ptr, n_out, channels, depth, height, width, y_ptr, scale, offset, low, high,
    RZ: tl.constexpr, RY: tl.constexpr, RX: tl.constexpr,
    CLAMP: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Shuffle + de-normalize + clamp + round + cast: the final output written once."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_out
    src = _source_offsets(o, channels, depth, height, width, RZ, RY, RX)
    v = tl.load(x_ptr + src, mask=mask).to(tl.float32)
    v = v * scale + offset
    if CLAMP:
        v = tl.minimum(tl.maximum(v, low), high)
    if ROUND:
        v = tl.floor(v + 0.5)
    tl.store(y_ptr + o, v.to(y_ptr.dtype.element_ty), mask=mask)


def pixel_shuffle3d(x, factors: Sequence[int], epilogue: Epilogue = Epilogue(), out_dtype=None, out=None):
    """Shuffle a contiguous (N, C*R, D, H, W) torch tensor; returns (N, C, D*rz, H*ry, W*rx)."""
    import torch

    if x.dim() != 5:
        raise ValueError(f"expected a 5-D tensor (N, C, D, H, W), got shape {tuple(x.shape)}")
    x = x.contiguous()
    shape = output_shape(x.shape, factors)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype or x.dtype, device=x.device)
    elif tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {shape}")
    n_out = out.numel()
    if n_out == 0:
        return out
    rz, ry, rx = (int(f) for f in factors)
    sizes = (n_out, shape[1], shape[2] // rz, shape[3] // ry, shape[4] // rx)
    grid = launch_grid(n_out)
    if epilogue == Epilogue() and out.dtype == x.dtype:
        pixel_shuffle3d_kernel[grid](x, *sizes, out, RZ=rz, RY=ry, RX=rx, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                     enable_fp_fusion=FP_FUSION)
        return out
    low, high = epilogue.clamp if epilogue.clamp is not None else (0.0, 0.0)
    pixel_shuffle3d_epilogue_kernel[grid](
        x, *sizes, out, float(epilogue.scale), float(epilogue.offset), float(low), float(high),
        RZ=rz, RY=ry, RX=rx, CLAMP=epilogue.clamp is not None, ROUND=epilogue.round,
        BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
    )
    return out


def compile_plain(dtype: str, factors: Sequence[int], target=None, ptx_version: Optional[int] = None):
    """Ahead-of-time compile the plain kernel for one dtype ("fp32"/"fp16") and factor set.

    Returns Triton's compiled kernel (`.asm["ptx"]`, `.metadata.name`, `.metadata.num_warps`,
    `.metadata.shared`); `target` (a triton GPUTarget) allows compiling without a GPU present;
    `ptx_version` (87 = ISA 8.7) caps the PTX for an older driver (`aot.compile_for_aot`).
    """
    rz, ry, rx = (int(f) for f in factors)
    signature = {"x_ptr": f"*{dtype}", "n_out": "i32", "channels": "i32", "depth": "i32", "height": "i32",
                 "width": "i32", "y_ptr": f"*{dtype}"}
    constexprs = {"RZ": rz, "RY": ry, "RX": rx, "BLOCK": BLOCK}
    src = triton.compiler.ASTSource(fn=pixel_shuffle3d_kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": NUM_WARPS, "enable_fp_fusion": FP_FUSION}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    return triton.compile(src, target=target, options=options) if target else triton.compile(src, options=options)
