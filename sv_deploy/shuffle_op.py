"""Identity of the 3D pixel-shuffle operator shared by the ONNX export and the TensorRT plugin.

One name, domain and attribute set, so the node torch emits, the ONNX local function that defines it,
and the plugin TensorRT swaps in for it always agree.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

DOMAIN = "sv_deploy"  # ONNX custom domain == TensorRT plugin namespace
NAME = "PixelShuffle3D"
# Must stay "1": quickly deployable (tensorrt.plugin) creators always register version "1", and the
# ONNX parser matches plugin_version exactly (a mismatch silently inlines the ONNX function instead).
PLUGIN_VERSION = "1"
# (N, C, rz, ry, rx, D, H, W) -> (N, C, D, rz, H, ry, W, rx)
PERMUTATION: Tuple[int, ...] = (0, 1, 5, 2, 6, 3, 7, 4)


def node_attributes(factors: Sequence[int]) -> Dict[str, Union[str, list]]:
    """Attributes on every PixelShuffle3D node (TensorRT's parser reads the plugin_* ones)."""
    return {
        "factors": [int(f) for f in factors],
        "plugin_namespace": DOMAIN,
        "plugin_version": PLUGIN_VERSION,
    }
