"""The Self-Vision network: FSRCNN-style 3D stage with a sub-pixel (pixel shuffle) output.

Each stage predicts a residual over fixed cubic interpolation, expressed in the same sub-pixel
form (a constant conv to r_z*r_y*r_x phases), so the whole stage stays `convs -> one pixel shuffle`
for export, and a network that learns nothing still returns interpolation instead of zeros
(the failure seen with the authors' code, GUIDE.md section 1).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import shuffle_op
from .config import ArchConfig, Factors
from .geometry import FLIPPED_AXES, Transform, ensemble_transforms, inverse
from .resize import phase_weights


def pixel_shuffle_3d(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """(N, C*rz*ry*rx, D, H, W) -> (N, C, D*rz, H*ry, W*rx); channel = (i*ry + j)*rx + k.

    Under ONNX export it becomes one custom-domain node (see `shuffle_op`), not a reshape chain.
    """
    rz, ry, rx = (int(f) for f in factors)
    n, c, d, h, w = x.shape
    oc = c // (rz * ry * rx)
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{shuffle_op.DOMAIN}::{shuffle_op.NAME}",
            (x,),
            attrs=shuffle_op.node_attributes((rz, ry, rx)),
            dtype=x.dtype,
            shape=(n, oc, d * rz, h * ry, w * rx),
            version=1,
        )
    x = x.reshape(n, oc, rz, ry, rx, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(n, oc, d * rz, h * ry, w * rx)


def interpolation_kernel(factors: Sequence[int]) -> np.ndarray:
    """Conv weights (rz*ry*rx, 1, kz, ky, kx) whose pixel shuffle is cubic interpolation.

    Axes with factor 1 get a 1-tap identity so 2D data (depth 1) needs no z padding.
    """
    per_axis = [phase_weights(f) if f > 1 else np.ones((1, 1), np.float32) for f in factors]
    wz, wy, wx = per_axis
    k = np.einsum("ia,jb,kc->ijkabc", wz, wy, wx)
    return k.reshape(-1, 1, *k.shape[3:]).astype(np.float32)


class SVStage(nn.Module):
    def __init__(self, factors: Factors, arch: ArchConfig = ArchConfig()):
        super().__init__()
        self.factors = tuple(int(f) for f in factors)
        self.arch = arch
        phases = int(np.prod(self.factors))
        a = arch
        pm, k = a.padding, a.members
        self.extract = nn.Sequential(nn.Conv3d(1, a.features * k, 5, padding=2, padding_mode=pm), nn.PReLU(a.features * k))
        self.shrink = nn.Sequential(
            nn.Conv3d(a.features * k, a.shrink * k, 3, padding=1, groups=k, padding_mode=pm), nn.PReLU(a.shrink * k)
        )
        mid = []
        for _ in range(a.mid_layers):
            mid += [nn.Conv3d(a.shrink * k, a.shrink * k, 3, padding=1, groups=a.groups * k, padding_mode=pm),
                    nn.PReLU(a.shrink * k)]
        self.mid = nn.Sequential(*mid)
        # One expansion over all members' channels: with each member's weights divided by k it
        # outputs the mean of the members' residuals (see `merge_members`).
        self.expand = nn.Conv3d(a.shrink * k, phases, 3, padding=1, padding_mode=pm)
        # Start as plain interpolation: the residual branch begins near zero.
        nn.init.normal_(self.expand.weight, std=1e-3)
        nn.init.zeros_(self.expand.bias)
        kernel = torch.from_numpy(interpolation_kernel(self.factors))
        self.register_buffer("interp_weight", kernel, persistent=False)
        self.interp_pad = tuple(p for k in reversed(kernel.shape[2:]) for p in (k // 2, k // 2))

    def interpolate_phases(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.interp_border == "replicate":
            return padded_conv(F.pad(x, self.interp_pad, mode="replicate"), self.interp_weight)
        radii = [k // 2 for k in self.interp_weight.shape[2:]]
        return padded_conv(symmetric_pad(x, radii), self.interp_weight)

    def residual_phases(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 1:  # static under export: only a 2D model is traced with depth 1
            for layer in (*self.extract, *self.shrink, *self.mid, self.expand):
                x = single_plane_conv(layer, x) if isinstance(layer, nn.Conv3d) else layer(x)
            return x
        if not use_onednn(x):  # the modules' own calls: the exported graph keeps their names
            return self.expand(self.mid(self.shrink(self.extract(x))))
        for layer in (*self.extract, *self.shrink, *self.mid, self.expand):
            if not isinstance(layer, nn.Conv3d):
                x = layer(x)
            elif layer.padding_mode == "zeros":
                x = padded_conv(x, layer.weight, layer.bias, layer.groups, layer.padding)
            else:
                pads = layer._reversed_padding_repeated_twice
                x = padded_conv(replicate_pad(x, pads) if layer.padding_mode == "replicate" else
                                F.pad(x, pads, mode=layer.padding_mode), layer.weight, layer.bias, layer.groups)
        return x

    def interpolate(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.interpolate_phases(x), self.factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.residual_phases(x) + self.interpolate_phases(x), self.factors)


def cpu_layout(x, device: torch.device):
    """A module or (N, C, D, H, W) tensor in channels-last layout on the CPU; unchanged elsewhere.

    oneDNN's 3D convolutions run faster on it: on 2 Intel cores torch's full 3D x4 recipe took 60 s
    against 94 s, and training 10-23 % less time (BENCH.md and QUALITY.md, session 20); no GPU and
    no AMD CPU has measured it.
    """
    return x.to(memory_format=torch.channels_last_3d) if device.type == "cpu" else x


def symmetric_pad(x: torch.Tensor, radii: Sequence[int]) -> torch.Tensor:
    """Half-sample symmetric padding of (N, C, D, H, W) by radii per spatial axis.

    The border rule of the degradation model (`resize.resize_matrix`), so the stage's
    interpolation path equals `resize.upsample` up to the border. Written as slices and a concat:
    plain ONNX Slice/Concat with dynamic shapes; the eager fallback covers axes shorter than
    their radius, where mirroring wraps more than once. The exported graph cannot branch on a
    length: it slices from an edge-padded copy instead, the same wherever the axis holds at least
    the radius and also where it holds one voxel (whose mirror is that voxel), so an export runs on
    volumes one voxel thin (the interpolation radius is 2 for every factor).
    """
    exporting = torch.onnx.is_in_onnx_export()
    for dim, p in zip((2, 3, 4), radii):
        n = x.shape[dim]
        if p == 0:
            continue
        if not exporting and n < p:
            period = np.concatenate([np.arange(n), np.arange(n)[::-1]])
            index = torch.as_tensor(period[np.mod(np.arange(-p, n + p), 2 * n)], device=x.device)
            x = x.index_select(dim, index)
            continue
        # Slices from the ends (no shape arithmetic in the graph, so each stage's sub-graph
        # depends on its own input only; `onnx_graph.extract_stage` relies on that).
        lead = (slice(None),) * dim
        e = p - 1 if exporting else 0  # edge voxels added on each side first
        src = edge_pad(x, dim, e) if e else x
        head = src[lead + (slice(e, e + p),)].flip(dim)
        tail = src[lead + (slice(-p - e, -e if e else None),)].flip(dim)
        x = torch.cat([head, x, tail], dim=dim)
    return x


def edge_pad(x: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """Repeat the first and last slice of (N, C, D, H, W) along dim `width` times (ONNX Pad, edge)."""
    pads = [0] * 6
    pads[2 * (4 - dim)] = pads[2 * (4 - dim) + 1] = width
    return F.pad(x, pads, mode="replicate")


def single_plane_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The same Conv3d on a depth-1 input (2D images), run as a 2D convolution.

    Replicate padding of one plane repeats it, so the kernel's z taps can be summed first; zero
    padding leaves only the centre tap. Same result, 5x fewer multiply-adds for the k5 layer, and
    2D convolution kernels (several times faster than depth-1 3D ones, BENCH.md session 7).
    """
    kz = conv.kernel_size[0]
    _, py, px = conv.padding
    plane = x.squeeze(2)
    if conv.padding_mode == "replicate":
        weight = conv.weight.sum(dim=2)
        plane = replicate_pad(plane, (px, px, py, py)) if use_onednn(plane) else \
            F.pad(plane, (px, px, py, py), mode="replicate")
        padding = (0, 0)
    else:
        weight = conv.weight[:, :, kz // 2]
        padding = (py, px)
    return padded_conv(plane, weight, conv.bias, conv.groups, padding).unsqueeze(2)


def replicate_pad(x: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """F.pad(x, pads, mode="replicate") (pads as F.pad takes them, last axis first), written into one
    new tensor of x's layout: torch's own kernel took 6x as long on channels-last maps of few
    channels (8.6 against 1.2 ms for 6x40x136x136; BENCH.md, session 21)."""
    spatial = x.dim() - 2
    if len(pads) != 2 * spatial or min(pads) < 0:
        raise ValueError(f"replicate_pad takes two widths of at least 0 per spatial axis, not {tuple(pads)}")
    widths = [(pads[2 * (spatial - 1 - a)], pads[2 * (spatial - 1 - a) + 1]) for a in range(spatial)]
    shape = tuple(x.shape[:2]) + tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[2:], widths))
    layout = torch.channels_last_3d if spatial == 3 and x.is_contiguous(memory_format=torch.channels_last_3d) \
        else torch.channels_last if spatial == 2 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)
    inner = [slice(lo, lo + n) for n, (lo, _) in zip(x.shape[2:], widths)]
    head = (slice(None), slice(None))
    out[head + tuple(inner)] = x
    for a, (lo, hi) in enumerate(widths):  # each axis over the axes before it padded, after it not yet
        n = x.shape[2 + a]
        rest = [slice(None)] * a, inner[a + 1:]
        for band, edge in ((slice(0, lo), slice(lo, lo + 1)), (slice(lo + n, lo + n + hi), slice(lo + n - 1, lo + n))):
            if band.stop > band.start:
                out[head + tuple(rest[0]) + (band,) + tuple(rest[1])] = out[head + tuple(rest[0]) + (edge,) + tuple(rest[1])]
    return out


def use_onednn(x: torch.Tensor) -> bool:
    """Whether `padded_conv` calls oneDNN itself: float32 on the CPU, a batch of one, no autograd, not traced.

    For a batch of one, torch runs 3x3(x3) convolutions through its slow reference kernel when
    N*C*D*H (N*C*H*W in 2D) is at most 20480, a rule made for small 2D images that leaves out W:
    thin stacks and small tiles (the 5-plane bead example, --max-memory blocks, training's pass over
    its volume between stages) ran their 6-channel layers 4-10x slower (BENCH.md, session 21).
    Batches (training's validation) pass torch's rule and keep the plain call, as do the export and
    torch.compile (their own graph)."""
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():  # first: nothing else is traced
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1 and not torch.is_grad_enabled()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))  # autocast casts F.conv3d's inputs, not this call's


def padded_conv(x: torch.Tensor, weight: torch.Tensor, bias=None, groups: int = 1, padding=None) -> torch.Tensor:
    """F.conv3d / F.conv2d (by x's rank), stride 1, zero `padding` (none by default)."""
    spatial = x.dim() - 2
    padding = tuple(padding) if padding is not None else (0,) * spatial
    if use_onednn(x):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, (1,) * spatial, (1,) * spatial, groups)
    conv = F.conv3d if spatial == 3 else F.conv2d
    return conv(x, weight, bias, padding=padding, groups=groups)


def merge_members(members: Sequence[SVStage]) -> SVStage:
    """One stage whose output is the mean of the given stages' outputs.

    The stages' feature channels are stacked side by side and kept apart by grouped
    convolutions; the shared expansion divides each stage's weights by their count. Each given
    stage may itself hold several members. Exact up to float rounding, and a plain `SVStage` for
    every backend and the export.
    """
    first = members[0]
    k = len(members)
    arch = dataclasses.replace(first.arch, members=sum(m.arch.members for m in members))
    merged = SVStage(first.factors, arch)
    states = [m.state_dict() for m in members]
    with torch.no_grad():
        for name, tensor in merged.state_dict().items():
            parts = [s[name] for s in states]
            if name == "expand.weight":
                tensor.copy_(torch.cat(parts, dim=1) / k)
            elif name == "expand.bias":
                tensor.copy_(torch.stack(parts).mean(dim=0))
            else:
                tensor.copy_(torch.cat(parts, dim=0))
    return merged.eval()


def fold_ensemble(stage: SVStage, transforms: Sequence[Transform]) -> SVStage:
    """One stage computing the geometric self-ensemble of `stage` in a single pass.

    Running the network on a turned or flipped input and undoing the turn on the output equals
    running a network whose kernels are turned the other way and whose sub-pixel phases are
    permuted (convolutions and replicate padding commute with these grid symmetries; the
    interpolation path is the same for all). So the ensemble mean is the mean of transformed
    copies, merged as members: the same multiply-adds, but one input, one interpolation, one
    pixel shuffle, and no turned copies of the input and output (BENCH.md, session 11).
    """
    return merge_members([_transformed(stage, t) for t in transforms])


def fold_stages(stages: Sequence[SVStage]) -> list:
    """Each stage with its full ensemble (`geometry.ensemble_transforms`) folded in."""
    return [fold_ensemble(s, ensemble_transforms(s.factors, True)) for s in stages]


def _transformed(stage: SVStage, t: Transform) -> SVStage:
    turns, flip = t
    out = copy.deepcopy(stage)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, nn.Conv3d):  # the kernel undergoes the inverse transform (geometry.inverse)
                w = torch.flip(module.weight, FLIPPED_AXES) if flip else module.weight
                module.weight.copy_(torch.rot90(w, -turns, (-2, -1)))
        order = list(phase_order(stage.factors, t))
        out.expand.weight.copy_(out.expand.weight[order])
        out.expand.bias.copy_(out.expand.bias[order])
    return out


def phase_order(factors: Sequence[int], t: Transform) -> Tuple[int, ...]:
    """Which sub-pixel phase lands on each phase when the output of a transformed input is
    turned back: shuffle the phase numbers, undo the transform, read them back in channel order."""
    rz, ry, rx = (int(f) for f in factors)
    ids = np.arange(rz * ry * rx, dtype=np.float32).reshape(1, -1, 1, 1, 1)
    block = inverse(pixel_shuffle_3d(torch.from_numpy(ids), (rz, ry, rx))[0, 0].numpy(), t)
    return tuple(int(v) for v in block.reshape(-1))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
