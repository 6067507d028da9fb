"""torch.compile as `infer --compile` runs it: the same enhancement as eager, or eager with a warning."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from sv_deploy.backends import TorchBackend, open_backend
from sv_deploy.config import ArchConfig
from sv_deploy.enhance import InferenceOptions, enhance_volume

CPU = torch.device("cpu")


def _enhance(runner, volume):
    options = InferenceOptions(ensemble=True, bp_iters=2, tile=volume.shape)
    return enhance_volume(runner, ((2, 2, 2),), ArchConfig(), volume, options)


def test_compiled_enhancement_equals_eager_and_compiles_once_per_pass_shape(model_file, trained_small, tmp_path,
                                                                           monkeypatch):
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: inductor cannot compile for the CPU here")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compiled now, not taken from an earlier run
    torch._dynamo.reset()
    stage, _, x, _ = trained_small
    volume = np.ascontiguousarray(x[:8, :24, :32])  # y != x: the ensemble's transposed members are a second shape
    notes = []
    _, compiled = open_backend(str(model_file), "auto", "cpu", log=notes.append, compile=True)  # auto: torch
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = _enhance(compiled, volume)
    want = _enhance(TorchBackend([stage], CPU), volume)
    assert compiled.compiled and compiled.name == "torch compiled (cpu)", notes
    assert np.abs(got - want).max() <= 1e-5 * float(np.ptp(want))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2  # 8 members, two pass shapes
    assert sum("compiling the network" in n for n in notes) == 2, notes
    assert not any(n.startswith("warning") for n in notes), notes


def test_past_the_recompile_limit_it_says_so_and_runs_uncompiled(trained_small, tmp_path, monkeypatch):
    """Dynamo alone would run every shape past its limit uncompiled without a word."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: inductor cannot compile for the CPU here")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    stage, _, x, _ = trained_small
    notes = []
    runner = TorchBackend([copy.deepcopy(stage)], CPU, compile=True, log=notes.append)
    first = np.ascontiguousarray(x[None, None, :4, :12, :12])
    second = np.ascontiguousarray(x[None, None, :4, :12, :14])
    with torch._dynamo.config.patch(recompile_limit=1):
        runner.predict(0, first)
        assert runner.compiled
        got = runner.predict(0, second)
    assert not runner.compiled and "pass shapes" in runner.compile_failure, notes
    assert [n for n in notes if n.startswith("warning: torch.compile failed")], notes
    np.testing.assert_array_equal(got, TorchBackend([stage], CPU).predict(0, second))


def test_a_compile_failure_runs_uncompiled_and_says_why(trained_small, tmp_path, monkeypatch):
    """A real failure: inductor pointed at a C++ compiler that does not exist (as on a PC without one)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    stage, _, x, _ = trained_small
    volume = np.ascontiguousarray(x[:6, :20, :20])  # a shape no other test compiles (no in-memory kernel to reuse)
    notes = []
    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-compiler"))}):
        runner = TorchBackend([copy.deepcopy(stage)], CPU, compile=True, log=notes.append)
        got = _enhance(runner, volume)
    assert not runner.compiled and runner.name == "torch (cpu)"
    assert runner.compile_failure and "compiler" in runner.compile_failure.lower(), runner.compile_failure
    assert [n for n in notes if n.startswith("warning: torch.compile failed")], notes
    np.testing.assert_array_equal(got, _enhance(TorchBackend([stage], CPU), volume))


def test_compiled_code_is_kept_in_a_folder_of_the_users_own(tmp_path, monkeypatch):
    """Inductor's default folder under /tmp can be made by anyone, and what it holds is loaded and
    run; a folder the user chose is left as it is."""
    import getpass
    import os
    import stat
    import tempfile

    from sv_deploy.backends import compile_stages

    monkeypatch.setenv("SV_DEPLOY_CACHE", str(tmp_path / "cache"))
    default = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")  # what torch sets at import
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)
    compile_stages([])
    ours = tmp_path / "cache" / "torchinductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(ours)
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_stages([])
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    # our folder made writable by others (a shared cache setting): a private folder of this run's own
    ours.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)
    notes = []
    compile_stages([], notes.append)
    fresh = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert fresh not in (default, str(ours)) and stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    assert notes and "other users can write" in notes[0], notes
    os.rmdir(fresh)


def test_bench_warms_a_compiled_network_up_on_the_timed_file(model_file, trained_small, tmp_path, monkeypatch):
    """A small warm-up crop would leave the timed file's pass shapes to compile inside the timed run."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: inductor cannot compile for the CPU here")
    from sv_deploy.bench import time_file
    from sv_deploy.volume_io import write_volume

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    _, _, x, _ = trained_small
    volume = np.clip(np.rint(x[:8, :24, :32] * 200), 0, 255).astype(np.uint8)
    src, crop = tmp_path / "src.tif", tmp_path / "crop.tif"
    write_volume(src, [volume], volume.shape, np.uint8, "ZYX", (1.0, 1.0, 1.0))
    write_volume(crop, [volume[:4, :12, :12]], (4, 12, 12), np.uint8, "ZYX", (1.0, 1.0, 1.0))
    notes = []
    config, runner = open_backend(str(model_file), "auto", "cpu", log=notes.append, compile=True)
    row = time_file(runner, config, src, crop, tmp_path / "out.ome.tif", InferenceOptions(bp_iters=1), 2, 0.0)
    assert row["compute"]["runs"] == 2
    compiles = [n for n in notes if "compiling the network" in n]
    assert len(compiles) == 2, notes  # the timed file's two pass shapes (y != x), each once, in the warm-up
    assert not any("4x12x12" in n for n in compiles), notes  # nothing of the crop's
