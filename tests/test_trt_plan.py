"""The pure functions under the TensorRT layer (profiles, plugin fields, manifest, compatibility).

TensorRT itself is not needed: these are the parts CI can check.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from onnx import helper

from sv_deploy import shuffle_op
from sv_deploy.backends import TorchBackend
from sv_deploy.config import ArchConfig
from sv_deploy.enhance import InferenceOptions, enhance_volume
from sv_deploy.errors import UserError
from sv_deploy.model import SVStage
from sv_deploy.trt_plan import (
    EngineManifest,
    ensemble_batch,
    fits,
    plugin_fields,
    plugin_size_error,
    profile_error,
    shuffle_layer_error,
    stage_profiles,
    timing_cache_name,
    uses_plugin,
    version_error,
    without_plugin,
)


class Recording:
    """A torch backend that remembers every (stage, shape) it was asked to run."""

    def __init__(self, stages):
        self.inner = TorchBackend(stages, torch.device("cpu"))
        self.name = "recording"
        self.seen = []

    def predict(self, stage, x):
        self.seen.append((stage, x.shape))
        return self.inner.predict(stage, x)


@pytest.mark.parametrize("stages,ensemble", [
    (((2, 2, 2), (2, 2, 2)), True),
    (((1, 2, 2),), True),
    (((2, 1, 2),), True),
    (((2, 2, 2),), False),
])
def test_profiles_cover_every_tile_inference_sends(stages, ensemble):
    arch = ArchConfig(mid_layers=1)
    options = InferenceOptions(ensemble=ensemble, bp_iters=1, tile=(3, 5, 7))
    profiles = stage_profiles(stages, arch, options.tile, options.bp_iters, options.ensemble)
    backend = Recording([SVStage(f, arch) for f in stages])
    volume = np.random.default_rng(0).random((7, 13, 17), dtype=np.float32)
    enhance_volume(backend, stages, arch, volume, options)
    assert backend.seen
    for stage, shape in backend.seen:
        assert fits(profiles[stage], shape), (stage, shape, profiles[stage])


@pytest.mark.parametrize("axes, stages", [("YX", ((1, 2, 2), (1, 2, 2))), ("ZYX", ((2, 2, 2),))])
def test_profiles_agree_with_the_dimensions_the_exported_graph_fixes(axes, stages):
    """TensorRT wants min = opt = max wherever the graph fixes a dimension (a 2D model's depth of 1)."""
    from sv_deploy import onnx_graph
    from sv_deploy.config import ModelConfig
    from sv_deploy.export import to_onnx

    arch = ArchConfig(mid_layers=1)
    config = ModelConfig(stages=stages, arch=arch, axes=axes)
    graph = to_onnx(config, [SVStage(f, arch) for f in stages], "0" * 64)
    profiles = stage_profiles(stages, arch, (1, 16, 16) if axes == "YX" else (4, 16, 16), 2, True,
                              planar=axes == "YX")
    for i, profile in enumerate(profiles):
        dims = onnx_graph.extract_stage(graph, i).graph.input[0].type.tensor_type.shape.dim
        fixed = {a: d.dim_value for a, d in enumerate(dims) if d.HasField("dim_value")}
        assert (2 in fixed) == (axes == "YX" and i == 0)  # later stages: symbolic, from the previous one
        if axes == "YX":  # whose graph squeezes a depth of 1 all the same
            assert profile.min[2] == profile.opt[2] == profile.max[2] == 1
        for a, value in fixed.items():
            assert profile.min[a] == profile.opt[a] == profile.max[a] == value, (i, a, profile)
    if axes == "YX":  # and they still cover what inference sends a 2D image
        backend = Recording([SVStage(f, arch) for f in stages])
        image = np.random.default_rng(0).random((1, 21, 19), dtype=np.float32)
        enhance_volume(backend, stages, arch, image, InferenceOptions(ensemble=True, bp_iters=2, tile=(1, 16, 16)))
        assert backend.seen and all(fits(profiles[stage], shape) for stage, shape in backend.seen)


def test_ensemble_batch_sizes():
    assert ensemble_batch((2, 2, 2), True) == 4
    assert ensemble_batch((1, 2, 3), True) == 4  # the 4 orientation-keeping members in one batch
    assert ensemble_batch((2, 2, 2), False) == 1


def shuffle_node(**attrs):
    return helper.make_node(shuffle_op.NAME, ["x"], ["y"], domain=shuffle_op.DOMAIN, **attrs)


def test_passes_too_large_for_the_kernels_int32_count_are_refused_before_a_build():
    arch, stages = ArchConfig(), ((2, 2, 2), (2, 2, 2))

    def largest_output(tile):  # what the shuffle of each stage writes at most, counted independently
        profiles = stage_profiles(stages, arch, tile, 10, True)
        return profiles, [int(np.prod(p.max, dtype=np.int64)) * 8 for p in profiles]

    profiles, voxels = largest_output((32, 96, 96))  # the default tile
    assert max(voxels) < 2**31 - 1 and plugin_size_error(stages, profiles) == ""
    profiles, voxels = largest_output((64, 512, 512))
    assert voxels[0] < 2**31 - 1 < voxels[1]
    assert plugin_size_error(stages, profiles).startswith("stage 2's largest pass")
    assert "--no-plugin" in plugin_size_error(stages, profiles)


def test_plugin_fields_from_node_attributes():
    fields = plugin_fields(shuffle_node(**shuffle_op.node_attributes((1, 2, 3))))
    assert fields["factors"].dtype == np.int32
    assert fields["factors"].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="factors must be 3 positive"):
        plugin_fields(shuffle_node(factors=[2, 2]))
    with pytest.raises(ValueError, match="no 'factors'"):
        plugin_fields(shuffle_node(plugin_namespace="sv_deploy"))
    with pytest.raises(ValueError, match="namespace"):
        plugin_fields(shuffle_node(factors=[2, 2, 2], plugin_namespace="other"))


def test_builtin_baseline_drops_only_the_plugin_namespace():
    node = shuffle_node(**shuffle_op.node_attributes((2, 2, 2)))
    graph = helper.make_graph([node], "g", [], [])
    model = helper.make_model(graph)
    assert uses_plugin(model)
    bare = without_plugin(model)
    assert not uses_plugin(bare)
    assert uses_plugin(model)  # the original is untouched
    assert plugin_fields(bare.graph.node[0])["factors"].tolist() == [2, 2, 2]
    assert bare.graph.node[0].domain != shuffle_op.DOMAIN  # TensorRT >= 10.10 reads the namespace from it


def test_builtin_baseline_graph_computes_the_same():
    """The baseline graph (nodes and function in another domain) still runs, to the same output."""
    import onnxruntime as ort

    from sv_deploy.config import ModelConfig
    from sv_deploy.export import to_onnx

    torch.manual_seed(0)
    stage = SVStage((1, 2, 2)).eval()
    graph = to_onnx(ModelConfig(stages=((1, 2, 2),)), [stage], "0" * 64)
    x = np.random.default_rng(0).random((1, 1, 5, 9, 7)).astype(np.float32)
    outputs = []
    for model in (graph, without_plugin(graph)):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"input": x})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    with torch.no_grad():
        np.testing.assert_allclose(outputs[1], stage(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_tensorrt_version_floor_and_per_gpu_timing_cache():
    assert version_error("10.9.0") is None and version_error("11.0.1.5") is None
    assert "10.8.1 is too old" in version_error("10.8.1") and "10.9" in version_error("8.6.1")
    assert len({timing_cache_name(v, cc) for v in ("10.13.0", "11.0.0") for cc in ((9, 0), (8, 9))}) == 4


def test_a_silently_inlined_plugin_is_caught():
    with_plugin = ["CONVOLUTION", "PLUGIN_V3", "ELEMENTWISE"]
    inlined = ["CONVOLUTION", "SHUFFLE", "SHUFFLE", "ELEMENTWISE"]
    assert shuffle_layer_error(with_plugin, plugin=True) is None
    assert shuffle_layer_error(inlined, plugin=False) is None
    assert "inlined" in shuffle_layer_error(inlined, plugin=True)
    assert shuffle_layer_error(with_plugin, plugin=False)


def make_manifest(**changes):
    profiles = stage_profiles(((2, 2, 2),), ArchConfig(), (8, 16, 16), 0)
    base = EngineManifest(
        engines=("m.plugin.stage1.engine",), profiles=tuple(profiles), tile=(8, 16, 16), tensorrt_version="10.13.0",
        gpu_name="NVIDIA H100", compute_capability=(9, 0), plugin=True, plugin_version="1", precision="fp16",
        source_onnx="m.onnx", source_onnx_sha256="a" * 64, config="{}", created="2026-11-21T00:00:00+00:00",
    )
    return dataclasses.replace(base, **changes)


def test_manifest_round_trips_through_json():
    manifest = make_manifest()
    assert EngineManifest.from_json(manifest.to_json()) == manifest
    with_isa = make_manifest(ptx_isa=87)
    assert EngineManifest.from_json(with_isa.to_json()) == with_isa
    older = json.loads(manifest.to_json())
    del older["ptx_isa"]  # written before the field existed
    assert EngineManifest.from_json(json.dumps(older)).ptx_isa is None
    with pytest.raises(ValueError, match="ptx_isa"):
        EngineManifest.from_json(json.dumps({**older, "ptx_isa": "8.7"}))
    with pytest.raises(ValueError, match='its "format" is not'):
        EngineManifest.from_json('{"format": "other"}')
    for bad, field in (([1, 2], "is not"), ({"engines": "abc"}, "engines"), ({"compute_capability": "9.0"},
                       "compute_capability"), ({"plugin": "no"}, "plugin"), ({"config": {}}, "config"),
                       ({"tile": [8, 16]}, "tile")):
        text = json.dumps(bad if isinstance(bad, list) else {**json.loads(manifest.to_json()), **bad})
        with pytest.raises(ValueError, match=field):
            EngineManifest.from_json(text)


def test_engines_must_be_files_beside_their_manifest(tmp_path):
    """A serialized engine is native code: a manifest may not point TensorRT at a file elsewhere."""
    import os

    from sv_deploy.trt_plan import engine_paths

    (tmp_path / "m.plugin.stage1.engine").write_bytes(b"engine")
    assert engine_paths(tmp_path, make_manifest()) == [tmp_path / "m.plugin.stage1.engine"]
    elsewhere = tmp_path / "elsewhere.engine"
    elsewhere.write_bytes(b"x")
    os.symlink(elsewhere, tmp_path / "link.engine")
    for name in ("/etc/passwd", "../m.plugin.stage1.engine", "sub/x.engine", "link.engine", "missing.engine", ".."):
        with pytest.raises(UserError, match="not a file beside it"):
            engine_paths(tmp_path, make_manifest(engines=(name,)))


def test_engine_for_another_gpu_or_version_is_refused_naming_both():
    from sv_deploy.trt_plan import check_compatible

    manifest = make_manifest()
    check_compatible(manifest, "10.13.0", "NVIDIA H100", (9, 0))
    with pytest.raises(UserError) as err:
        check_compatible(manifest, "10.13.0", "NVIDIA A100", (8, 0))
    assert "H100" in str(err.value) and "A100" in str(err.value) and "9.0" in str(err.value)
    with pytest.raises(UserError, match="rebuild it here"):  # another GPU model of the same compute capability
        check_compatible(manifest, "10.13.0", "NVIDIA H200", (9, 0))
    with pytest.raises(UserError) as err:
        check_compatible(manifest, "11.0.0", "NVIDIA H100", (9, 0))
    assert "10.13.0" in str(err.value) and "11.0.0" in str(err.value)
    # the plugin kernel's PTX against this machine's driver: an older driver would refuse it at load
    with_isa = make_manifest(ptx_isa=87)
    check_compatible(with_isa, "10.13.0", "NVIDIA H100", (9, 0), driver_ptx_limit=87)
    check_compatible(manifest, "10.13.0", "NVIDIA H100", (9, 0), driver_ptx_limit=84)  # no plugin PTX recorded
    with pytest.raises(UserError, match=r"PTX 8\.7, newer than this machine's CUDA driver loads \(up to 8\.4\)"):
        check_compatible(with_isa, "10.13.0", "NVIDIA H100", (9, 0), driver_ptx_limit=84)


def test_profile_error_names_the_fix():
    profile = make_manifest().profiles[0]
    assert profile_error(0, profile, profile.max) is None
    too_big = (1, 1, profile.max[2] + 1, 4, 4)
    assert "--tile" in profile_error(0, profile, too_big)
