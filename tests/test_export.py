"""ONNX export and the ONNX Runtime backend, on the small model trained on the real fly-brain crop."""

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sv_deploy import onnx_graph, shuffle_op
from sv_deploy.backends import TorchBackend
from sv_deploy.config import ModelConfig
from sv_deploy.enhance import InferenceOptions, enhance_volume
from sv_deploy.errors import UserError
from sv_deploy.export import Chain, to_onnx
from sv_deploy.metrics import psnr
from sv_deploy.model import SVStage
from sv_deploy.ort_backend import OnnxRuntimeBackend


@pytest.fixture(scope="module")
def x2(trained_small):
    stage, _, x, (lo, hi) = trained_small
    config = ModelConfig(stages=((2, 2, 2),), norm_values=(lo, hi))
    return config, [stage], x


@pytest.fixture(scope="module")
def x4(trained_small):
    """A two-stage x4 chain built from the trained x2 stage (the second stage reuses its weights)."""
    stage, _, x, (lo, hi) = trained_small
    config = ModelConfig(stages=((2, 2, 2), (2, 2, 2)), norm_values=(lo, hi))
    return config, [stage, copy.deepcopy(stage)], x


@pytest.fixture(scope="module")
def x2_onnx(x2):
    config, stages, _ = x2
    return to_onnx(config, stages, "0" * 64)


@pytest.fixture(scope="module")
def x4_onnx(x4):
    config, stages, _ = x4
    return to_onnx(config, stages, "1" * 64)


def value_range(a):
    return float(a.max() - a.min())


def test_graph_has_the_custom_node_and_its_local_function(x2_onnx, x4_onnx):
    for model, count in ((x2_onnx, 1), (x4_onnx, 2)):
        nodes = onnx_graph.shuffle_nodes(model)
        assert len(nodes) == count
        assert all(n.domain == shuffle_op.DOMAIN for n in nodes)
        attrs = {a.name: a for a in nodes[0].attribute}
        assert list(attrs["factors"].ints) == [2, 2, 2]
        assert attrs["plugin_namespace"].s.decode() == shuffle_op.DOMAIN
        functions = [(f.domain, f.name) for f in model.functions]
        assert functions == [(shuffle_op.DOMAIN, shuffle_op.NAME)]
        assert [n.op_type for n in model.functions[0].node].count("Transpose") == 1
        assert model.ir_version <= 10
        onnx.checker.check_model(model, full_check=True)


def test_metadata_describes_the_model(x4_onnx, x4):
    config, _, _ = x4
    meta = onnx_graph.read_metadata(x4_onnx)
    assert ModelConfig.from_json(meta["config"]) == config
    assert meta["factors"] == "[4, 4, 4]"
    assert meta["stage_tensors"] == '["input", "stage1_output", "output"]'
    assert int(meta["halo"]) == config.arch.halo()
    assert meta["source_sha256"] == "1" * 64
    assert "torch" in meta["versions"] and "onnx" in meta["versions"]


def test_exports_of_older_and_newer_releases_are_checked_over_what_they_cover(x2_onnx):
    """An older release's export has no model_sha256: its digest over graph, functions and
    metadata still verifies, and still catches a changed weight. And sha256 leaves model_sha256 out,
    so an older release, which checks only the keys it knows, still reads a newer export."""
    meta = onnx_graph.verify(x2_onnx)
    known_before = {k: v for k, v in meta.items() if k != "model_sha256"}
    assert onnx_graph.digest(x2_onnx, known_before) == meta["sha256"]
    older = copy.deepcopy(x2_onnx)
    del older.metadata_props[:]
    onnx.helper.set_model_props(older, {f"sv_deploy.{k}": v for k, v in known_before.items()})
    assert "model_sha256" not in onnx_graph.verify(older)
    weight = next(i for i in older.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) + 1, weight.name))
    with pytest.raises(ValueError, match="changed after export"):
        onnx_graph.verify(older)


def test_dynamic_axes(x2_onnx):
    dims = x2_onnx.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, "D", "H", "W"]


def test_onnxruntime_equals_torch_per_stage_and_chained(x4, x4_onnx):
    _, stages, x = x4
    runner = OnnxRuntimeBackend(x4_onnx, device="cpu")
    block = x[None, None, :10, :20, :24]
    with torch.no_grad():
        s1 = stages[0](torch.from_numpy(block)).numpy()
        s2 = stages[1](torch.from_numpy(s1)).numpy()
        chained = Chain(stages)(torch.from_numpy(block)).numpy()
    assert s2.shape == (1, 1, 40, 80, 96)
    np.testing.assert_allclose(runner.predict(0, block), s1, rtol=0, atol=1e-5 * value_range(s1))
    np.testing.assert_allclose(runner.predict(1, s1), s2, rtol=0, atol=1e-5 * value_range(s2))
    np.testing.assert_allclose(runner.run_chain(block), chained, rtol=0, atol=1e-5 * value_range(chained))


def test_anisotropic_chain_exports_and_matches():
    torch.manual_seed(0)
    stages = [SVStage((1, 2, 2)), SVStage((2, 1, 3))]
    for s in stages:
        torch.nn.init.normal_(s.expand.weight, std=0.05)
    config = ModelConfig(stages=((1, 2, 2), (2, 1, 3)))
    model = to_onnx(config, stages, "2" * 64)
    x = np.random.default_rng(0).random((2, 1, 5, 7, 9), dtype=np.float32)
    with torch.no_grad():
        ref = Chain(stages)(torch.from_numpy(x)).numpy()
    got = OnnxRuntimeBackend(model, device="cpu").run_chain(x)
    assert got.shape == (2, 1, 10, 14, 54)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * value_range(ref))


def test_tiled_ensemble_volume_matches_torch(x2, x2_onnx):
    config, stages, x = x2
    options = InferenceOptions(ensemble=True, bp_iters=2, tile=(8, 24, 24))
    ref = enhance_volume(TorchBackend(stages, torch.device("cpu")), config.stages, config.arch, x, options)
    got = enhance_volume(OnnxRuntimeBackend(x2_onnx, device="cpu"), config.stages, config.arch, x, options)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * value_range(ref))


@pytest.mark.parametrize("crop", [np.s_[:6, :20, 7:8], np.s_[:6, 3:4, :20], np.s_[2:3, :20, :18]])
def test_volumes_one_voxel_thin_run_as_on_torch(x2, x2_onnx, crop):
    """The graph's mirrored border cannot wrap as torch's does; on one voxel it must not need to."""
    config, stages, x = x2
    options = InferenceOptions(ensemble=True, bp_iters=2)
    volume = np.ascontiguousarray(x[crop])
    ref = enhance_volume(TorchBackend(stages, torch.device("cpu")), config.stages, config.arch, volume, options)
    got = enhance_volume(OnnxRuntimeBackend(x2_onnx, device="cpu"), config.stages, config.arch, volume, options)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * value_range(ref))


def test_folded_ensemble_runs_the_same_full_recipe_in_one_pass_per_tile(x4):
    """The x4 full recipe (ensemble, back-projection, several tiles) with the ensemble folded
    into the graph and into torch equals the 8 passes per tile; without the ensemble it refuses."""
    config, stages, x = x4
    options = InferenceOptions(ensemble=True, bp_iters=2, tile=(6, 20, 20))
    volume = x[:10, :40, :36]
    ref = enhance_volume(TorchBackend(stages, torch.device("cpu")), config.stages, config.arch, volume, options)
    folded = OnnxRuntimeBackend(to_onnx(config, stages, "0" * 64, folded_ensemble=True), device="cpu")
    assert folded.folded_ensemble and not OnnxRuntimeBackend(to_onnx(config, stages, "0" * 64)).folded_ensemble
    got = enhance_volume(folded, config.stages, config.arch, volume, options)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * value_range(ref))
    in_torch = TorchBackend(copy.deepcopy(stages), torch.device("cpu"), fold_ensemble=True)
    np.testing.assert_allclose(enhance_volume(in_torch, config.stages, config.arch, volume, options), ref,
                               rtol=0, atol=1e-5 * value_range(ref))
    with pytest.raises(UserError, match="--no-ensemble"):
        enhance_volume(folded, config.stages, config.arch, volume, InferenceOptions(ensemble=False))


def test_fp16_export_stays_close(x2, x2_onnx):
    """fp16 bound: PSNR of the fp16 graph against fp32 stays above 60 dB on the real crop."""
    config, stages, x = x2
    half = to_onnx(config, stages, "0" * 64, precision="fp16")
    assert onnx_graph.is_fp16(half)
    onnx.checker.check_model(half, full_check=True)
    block = x[None, None]
    ref = OnnxRuntimeBackend(x2_onnx, device="cpu").run_chain(block)
    got = OnnxRuntimeBackend(half, device="cpu").run_chain(block)
    assert psnr(got, ref, value_range(ref)) > 60.0


def test_export_leaves_the_torch_model_untouched(x2):
    config, stages, _ = x2
    to_onnx(config, stages, "0" * 64, precision="fp16")
    assert all(p.dtype == torch.float32 for p in stages[0].parameters())


def test_a_2d_model_exports_single_plane_convolutions():
    """A model trained on 2D images gets depth fixed at 1 and 2D-sized kernels, same output."""
    torch.manual_seed(0)
    stages = [SVStage((1, 2, 2)), SVStage((1, 2, 2))]
    for s in stages:
        torch.nn.init.normal_(s.expand.weight, std=0.05)
    config = ModelConfig(stages=((1, 2, 2), (1, 2, 2)), axes="YX")
    model = to_onnx(config, stages, "3" * 64)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[2].dim_value == 1
    kernels = [list(i.dims) for i in model.graph.initializer if len(i.dims) == 5]
    assert kernels and all(k[2] == 1 for k in kernels)  # no z taps left
    x = np.random.default_rng(1).random((2, 1, 1, 12, 16), dtype=np.float32)
    with torch.no_grad():
        ref = Chain(stages)(torch.from_numpy(x)).numpy()
    got = OnnxRuntimeBackend(model, device="cpu").run_chain(x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * value_range(ref))


def test_averaged_networks_export_as_one_graph_and_match():
    from sv_deploy.config import ArchConfig
    from sv_deploy.model import merge_members

    torch.manual_seed(0)
    members = [SVStage((2, 2, 2)) for _ in range(3)]
    for s in members:
        torch.nn.init.normal_(s.expand.weight, std=0.05)
    merged = merge_members(members)
    config = ModelConfig(stages=((2, 2, 2),), arch=ArchConfig(members=3))
    model = to_onnx(config, [merged], "4" * 64)
    x = np.random.default_rng(2).random((2, 1, 6, 10, 12), dtype=np.float32)
    with torch.no_grad():
        ref = (sum(s(torch.from_numpy(x)) for s in members) / 3).numpy()
    got = OnnxRuntimeBackend(model, device="cpu").run_chain(x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * value_range(ref))


def test_onnxruntime_runs_on_the_gpu_it_is_told(monkeypatch):
    """--device cuda:1 must reach ONNX Runtime as device_id 1 (bare provider names mean GPU 0)."""
    import onnxruntime as ort

    from sv_deploy.ort_backend import pick_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert pick_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert pick_providers("auto")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert pick_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="cuda:x"):
        pick_providers("cuda:x")


def test_the_export_cache_is_keyed_by_the_code_that_writes_the_graph(tmp_path):
    from sv_deploy import onnx_cache

    a, b = tmp_path / "model.py", tmp_path / "export.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    before = onnx_cache.code_digest([a, b])
    assert onnx_cache.code_digest([a, b]) == before
    a.write_text("x = 2\n")  # an edited module gives another digest, so another cache entry
    assert onnx_cache.code_digest([a, b]) != before
    here = Path(onnx_cache.__file__).parent
    assert all((here / name).is_file() for name in onnx_cache.EXPORT_MODULES)
    assert onnx_cache.export_code_digest()[:12] in onnx_cache.cache_path("0" * 64, tmp_path).name


def test_the_export_cache_keeps_the_most_recently_used_entries(tmp_path):
    import os

    from sv_deploy import onnx_cache

    entries = []
    for age in range(5):
        entry = tmp_path / f"e{age}.onnx"
        entry.write_bytes(b"x")
        os.utime(entry, (1e9 - age * 60, 1e9 - age * 60))
        entries.append(entry)
    os.utime(entries[4], (2e9, 2e9))  # the oldest, used just now
    assert onnx_cache.least_recently_used(tmp_path.glob("*.onnx"), 2) == entries[1:4]
    assert onnx_cache.least_recently_used(entries, 5) == []


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="POSIX owners and modes")
def test_an_export_cache_others_can_write_to_is_not_used(tmp_path, monkeypatch):
    """What the cache holds is what infer runs: a folder or entry others could have written is not trusted."""
    import os

    from sv_deploy import onnx_cache
    from sv_deploy.config import ArchConfig, ModelConfig

    monkeypatch.setenv(onnx_cache.ENV, str(tmp_path / "cache"))
    arch = ArchConfig(mid_layers=0)
    config, stages = ModelConfig(stages=((2, 2, 2),), arch=arch), [SVStage((2, 2, 2), arch)]
    logs = []
    onnx_cache.cached_export(config, stages, "1" * 64, log=logs.append)
    entry = onnx_cache.cache_path("1" * 64)
    assert entry.is_file() and (entry.parent.stat().st_mode & 0o077) == 0  # made private
    os.chmod(entry, 0o666)  # an entry others could have replaced: exported again, and private
    onnx_cache.cached_export(config, stages, "1" * 64, log=logs.append)
    assert "not a plain file of your own" in logs[-3] and (entry.stat().st_mode & 0o022) == 0
    os.chmod(entry.parent, 0o777)  # a shared folder: not used at all
    before = entry.stat().st_mtime_ns
    model = onnx_cache.cached_export(config, stages, "1" * 64, log=logs.append)
    assert "other users can write to it" in logs[-1] and model.graph.node and entry.stat().st_mtime_ns == before


def test_prelu_as_max_and_min_is_exact_for_any_slope():
    """ONNX Runtime's CPU path runs PRelu as Mul + Max (+ Min for slopes above 1): every slope
    sign and size must give the network's own output."""
    torch.manual_seed(3)
    stage = SVStage((2, 2, 2)).eval()
    with torch.no_grad():
        stage.expand.weight.normal_(std=0.05)
        for module in stage.modules():
            if isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(-0.5, 1.5)  # negative, in [0, 1] and above 1
    graph = to_onnx(ModelConfig(stages=((2, 2, 2),)), [stage], "2" * 64)
    rewritten = onnx_graph.prelu_as_max(graph)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "PRelu" not in ops and "Max" in ops and "Min" in ops
    assert "PRelu" in [n.op_type for n in graph.graph.node]  # the export itself keeps PRelu
    x = np.random.default_rng(0).standard_normal((1, 1, 9, 14, 11)).astype(np.float32)
    with torch.no_grad():
        expected = stage(torch.from_numpy(x)).numpy()
    got = OnnxRuntimeBackend(graph, device="cpu").predict(0, x)  # the CPU backend uses the rewrite
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * value_range(expected))


def test_prelu_slopes_within_one_need_no_min():
    torch.manual_seed(4)
    graph = to_onnx(ModelConfig(stages=((1, 2, 2),)), [SVStage((1, 2, 2)).eval()], "3" * 64)
    ops = [n.op_type for n in onnx_graph.prelu_as_max(graph).graph.node]
    assert "PRelu" not in ops and "Max" in ops and "Min" not in ops


def test_a_cached_export_onnx_runtime_refuses_is_exported_again(model_file, tmp_path, monkeypatch):
    import onnx

    from sv_deploy import onnx_cache
    from sv_deploy.backends import open_backend

    monkeypatch.setenv(onnx_cache.ENV, str(tmp_path / "cache"))
    logs = []
    open_backend(str(model_file), "onnxruntime", "cpu", log=logs.append, ensemble=False)
    entry = next((tmp_path / "cache" / "onnx").glob("*.onnx"))
    graph = onnx.load(str(entry))
    # a graph ONNX Runtime cannot run whose digests were recomputed (another writer, or by hand)
    next(n for n in graph.graph.node if n.op_type == "Conv").op_type = "NoSuchOp"
    onnx_graph.seal(graph, onnx_graph.read_metadata(graph))
    onnx.save(graph, str(entry))
    onnx_graph.verify(onnx.load(str(entry)))  # the entry "matches"
    config, runner = open_backend(str(model_file), "onnxruntime", "cpu", log=logs.append, ensemble=False)
    assert "the cached export does not load; exporting again, in memory" in logs
    assert runner.predict(0, np.zeros((1, 1, 4, 8, 8), np.float32)).shape == (1, 1, 8, 16, 16)
