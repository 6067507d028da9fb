"""Pure functions behind the TensorRT layer: optimization profiles from the tile plan, the plugin's
attribute -> field mapping, graph edits for the built-in baseline, and the engine manifest.

Nothing here imports tensorrt, so CI tests all of it; `trt_engine` only wires these to the API.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from . import shuffle_op
from .config import ArchConfig, Factors, Shape3
from .errors import UserError
from .geometry import ensemble_transforms
from .tiling import total_halo

Shape5 = Tuple[int, int, int, int, int]
MANIFEST_FORMAT = "sv-deploy-trt"
# aot_impl and the PREFER_AOT_PYTHON_PLUGINS flag arrived in 10.9; before 10.7 the parser inlined a
# model-local function even when a plugin of the same name was registered.
MIN_TENSORRT = (10, 9)


def version_error(version: str) -> Optional[str]:
    """Why this TensorRT cannot build or run our engines, or None."""
    try:
        found = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None  # a development build: let TensorRT itself decide
    if found >= MIN_TENSORRT:
        return None
    need = ".".join(map(str, MIN_TENSORRT))
    return (f"TensorRT {version} is too old (sv-deploy needs {need} or newer for its plugin); upgrade it from "
            "NVIDIA's index or use the .onnx with --backend onnxruntime")


def shuffle_layer_error(layer_types: Sequence[str], plugin: bool) -> Optional[str]:
    """Whether the parsed network shuffles as asked: the parser silently inlines the ONNX function
    when it does not match our plugin (name, version, namespace), which would measure the built-in
    path under the plugin's name. `layer_types` are the names of `trt.LayerType` per layer."""
    plugins = sum(1 for t in layer_types if t.startswith("PLUGIN"))
    if plugin and plugins == 0:
        return (f"TensorRT inlined the {shuffle_op.NAME} function instead of using the sv-deploy plugin "
                f"(plugin {shuffle_op.DOMAIN}::{shuffle_op.NAME} version {shuffle_op.PLUGIN_VERSION} not matched); "
                "build with --no-plugin, or report this with your TensorRT version")
    if not plugin and plugins:
        return "TensorRT used a plugin layer for the built-in shuffle baseline; rebuild in a fresh process"
    return None


def timing_cache_name(tensorrt_version: str, compute_capability: Tuple[int, int]) -> str:
    """One timing cache per TensorRT version and GPU architecture: a cache from another GPU is
    refused by the builder, and one from another release may not apply."""
    return f"timing.trt{tensorrt_version}.sm{compute_capability[0]}{compute_capability[1]}.cache"


@dataclass(frozen=True)
class Profile:
    """One optimization profile (min, opt, max) for a stage's input tensor."""

    min: Shape5
    opt: Shape5
    max: Shape5


def ensemble_batch(factors: Factors, ensemble: bool) -> int:
    """Largest batch `enhance.predict_ensemble` sends: members that keep the tile's y-x orientation."""
    transforms = ensemble_transforms(factors, ensemble)
    return max(sum(1 for t in transforms if t[0] % 2 == parity) for parity in (0, 1))


def stage_profiles(stages: Sequence[Factors], arch: ArchConfig, tile: Shape3, bp_iters: int,
                   ensemble: bool = True, planar: bool = False) -> List[Profile]:
    """Profiles covering every tile `enhance.iter_tiles` can send to each stage.

    The largest tile is the core plus the halo on both sides; a quarter turn swaps y and x, so
    when the ensemble turns tiles both lateral sizes get the larger bound. Later stages see the
    previous stage's output, trimmed to what is left to do. Tiles at volume edges and small volumes
    are smaller: min is 1. A 2D model's graph fixes the depth at 1 (`export`), and TensorRT wants
    min = opt = max wherever the graph fixes a dimension: `planar` keeps it there, halo or not.
    """
    scale = [1, 1, 1]
    profiles = []
    for i, factors in enumerate(stages):
        # `enhance_block` trims each stage's input to its core plus what the remaining stages need.
        halo = total_halo(stages, arch, bp_iters, start=i)
        d, h, w = (tile[a] * scale[a] + 2 * halo[a] for a in range(3))
        d = 1 if planar else d
        batch = ensemble_batch(factors, ensemble)
        if ensemble and factors[1] == factors[2]:
            h = w = max(h, w)
        largest = (batch, 1, d, h, w)
        profiles.append(Profile(min=(1, 1, 1, 1, 1), opt=largest, max=largest))
        scale = [scale[a] * factors[a] for a in range(3)]
    return profiles


KERNEL_INDEX_LIMIT = 2**31 - 1  # the kernel's element count is an int32 (TensorRT's AOT scalars are SymInt32)


def plugin_size_error(stages: Sequence[Factors], profiles: Sequence[Profile]) -> str:
    """Why a stage's largest pass is too large for the plugin kernel ('' if none is)."""
    for i, (factors, profile) in enumerate(zip(stages, profiles)):
        voxels = int(np.prod(profile.max, dtype=np.int64)) * int(np.prod(factors))
        if voxels > KERNEL_INDEX_LIMIT:
            return (f"stage {i + 1}'s largest pass gives {voxels:,} output voxels, more than our plugin kernel "
                    f"indexes (2^31 - 1); export with a smaller --tile, or with --no-plugin")
    return ""


def plugin_fields(node: onnx.NodeProto) -> Dict[str, np.ndarray]:
    """The fields TensorRT's parser hands our plugin for one PixelShuffle3D node (INTS -> int32).

    Validates what the plugin's shape function relies on, so a bad graph fails before a build.
    """
    attrs = {a.name: a for a in node.attribute}
    if node.op_type != shuffle_op.NAME:
        raise ValueError(f"node {node.name!r} is a {node.op_type}, not {shuffle_op.NAME}")
    if "factors" not in attrs:
        raise ValueError(f"{shuffle_op.NAME} node {node.name!r} has no 'factors' attribute")
    factors = np.asarray(list(attrs["factors"].ints), dtype=np.int32)
    if factors.shape != (3,) or (factors < 1).any():
        raise ValueError(f"{shuffle_op.NAME} node {node.name!r}: factors must be 3 positive ints, got {factors}")
    namespace = attrs.get("plugin_namespace")
    if namespace is not None and namespace.s.decode() != shuffle_op.DOMAIN:
        raise ValueError(f"{shuffle_op.NAME} node {node.name!r} names plugin namespace {namespace.s.decode()!r}")
    return {"factors": factors}


BUILTIN_DOMAIN = f"{shuffle_op.DOMAIN}.builtin"


def without_plugin(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy whose shuffle nodes TensorRT can only inline as the ONNX function (its built-in
    Reshape/Transpose path: the baseline the plugin is measured against).

    Without plugin_namespace the parser already inlines the function (it chooses the plugin path by
    that attribute); the nodes and their function also move to another domain, since TensorRT
    10.10's plugin fallback reads a namespace from the node's domain too.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == shuffle_op.DOMAIN and node.op_type == shuffle_op.NAME:
            keep = [a for a in node.attribute if a.name != "plugin_namespace"]
            del node.attribute[:]
            node.attribute.extend(keep)
            node.domain = BUILTIN_DOMAIN
    for function in copy.functions:
        if function.domain == shuffle_op.DOMAIN and function.name == shuffle_op.NAME:
            function.domain = BUILTIN_DOMAIN
    if not any(o.domain == BUILTIN_DOMAIN for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(BUILTIN_DOMAIN, 1))
    return copy


def uses_plugin(model: onnx.ModelProto) -> bool:
    return any(
        a.name == "plugin_namespace"
        for n in model.graph.node
        if n.op_type == shuffle_op.NAME
        for a in n.attribute
    )


@dataclass(frozen=True)
class EngineManifest:
    """Sidecar of a set of per-stage engines: what they were built from, where, and for what."""

    engines: Tuple[str, ...]  # file names beside the manifest, one per stage
    profiles: Tuple[Profile, ...]
    tile: Shape3  # the tile core the profiles were built for; infer uses it unless told otherwise
    tensorrt_version: str
    gpu_name: str
    compute_capability: Tuple[int, int]
    plugin: bool  # True: our PixelShuffle3D plugin; False: TensorRT's inlined function
    plugin_version: str
    precision: str
    source_onnx: str
    source_onnx_sha256: str
    config: str  # the model's ModelConfig JSON
    created: str
    format: str = MANIFEST_FORMAT
    ptx_isa: Optional[int] = None  # the plugin kernel's PTX version (87 = 8.7): drivers older than it cannot load it

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "EngineManifest":
        """Parsed and type-checked: a manifest names files TensorRT loads (engines are native code, so
        they must be plain names beside it, see `engine_paths`), and a field of the wrong type
        raises ValueError here, not an AttributeError somewhere later."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"its \"format\" is not {MANIFEST_FORMAT!r}")
        data["engines"] = _typed(data.get("engines"), str, "engines")
        data["profiles"] = tuple(Profile(*(_typed(p[k], int, f"profiles {k}", 5) for k in ("min", "opt", "max")))
                                 for p in _typed(data.get("profiles"), dict, "profiles"))
        data["compute_capability"] = _typed(data.get("compute_capability"), int, "compute_capability", 2)
        data["tile"] = _typed(data.get("tile"), int, "tile", 3)
        if not isinstance(data.get("plugin"), bool):
            raise ValueError("field plugin must be true or false")
        for key in ("tensorrt_version", "gpu_name", "plugin_version", "precision", "source_onnx",
                    "source_onnx_sha256", "config", "created"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"field {key} must be a string")
        isa = data.get("ptx_isa")  # absent in manifests written before it existed
        if isa is not None and (not isinstance(isa, int) or isinstance(isa, bool)):
            raise ValueError("field ptx_isa must be an integer")
        return cls(**data)


def _typed(values, kind: type, name: str, length: Optional[int] = None) -> tuple:
    if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values) \
            or (length is not None and len(values) != length):
        raise ValueError(f"field {name} must be a list of {length or 'some'} {kind.__name__} values")
    return tuple(values)


def engine_paths(folder: Path, manifest: EngineManifest) -> List[Path]:
    """The engine files, which must be plain file names in the manifest's own folder: a serialized
    engine is native code TensorRT runs, so a manifest must not reach for one elsewhere."""
    paths = []
    for name in manifest.engines:
        path = folder / name
        if Path(name).name != name or name in ("", ".", "..") or path.is_symlink() or not path.is_file():
            raise UserError(f"the manifest names engine '{name}', which is not a file beside it; engines must sit "
                            "in the manifest's folder: rebuild them with 'sv-deploy export --engine'")
        paths.append(path)
    return paths


def check_compatible(manifest: EngineManifest, tensorrt_version: str, gpu_name: str,
                     compute_capability: Tuple[int, int], where: str = "the engine",
                     driver_ptx_limit: Optional[int] = None) -> None:
    """Engines only run on the TensorRT version and the GPU model that built them (TensorRT ties an
    engine to its device type unless built hardware-compatible, which these are not): two GPUs of
    one compute capability (an H100 and an H200) are not enough alike. The plugin kernel's PTX
    was made for the building machine's driver; an older driver here refuses it when the engine loads."""
    same_trt = manifest.tensorrt_version == tensorrt_version
    same_gpu = tuple(manifest.compute_capability) == tuple(compute_capability) and manifest.gpu_name == gpu_name
    isa, limit = manifest.ptx_isa, driver_ptx_limit
    if same_trt and same_gpu and isa is not None and limit is not None and isa > limit:
        raise UserError(f"{where} holds plugin code in PTX {isa // 10}.{isa % 10}, newer than this machine's CUDA "
                        f"driver loads (up to {limit // 10}.{limit % 10}): update the NVIDIA driver, or rebuild the "
                        "engine here with 'sv-deploy export MODEL -o DIR --engine'")
    if same_trt and same_gpu:
        return
    built = ".".join(map(str, manifest.compute_capability))
    here = ".".join(map(str, compute_capability))
    raise UserError(
        f"{where} was built with TensorRT {manifest.tensorrt_version} for a {manifest.gpu_name} (compute {built}); "
        f"this machine has TensorRT {tensorrt_version} and a {gpu_name} (compute {here}): rebuild it here with "
        "'sv-deploy export MODEL -o DIR --engine'"
    )


def fits(profile: Profile, shape: Sequence[int]) -> bool:
    return all(lo <= s <= hi for lo, s, hi in zip(profile.min, shape, profile.max))


def profile_error(stage: int, profile: Profile, shape: Sequence[int]) -> Optional[str]:
    if fits(profile, shape):
        return None
    return (
        f"stage {stage + 1} got a tile of shape {tuple(shape)}, outside the engine's profile up to {profile.max}; "
        "use a smaller --tile or rebuild the engine with 'sv-deploy export --engine --tile Z,Y,X'"
    )
