"""End-to-end through the command line: outputs, metadata, and every bad input's one-line error."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from sv_deploy.cli import main
from sv_deploy.volume_io import read_volume, write_volume


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_one_line_error(result, *words):
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for w in words:
        assert w in err, err


@pytest.fixture(scope="module")
def lr_file(tmp_path_factory, flybrain_pair):
    _, lr = flybrain_pair
    data = np.clip(np.rint(lr), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("in") / "lr.tif"
    write_volume(path, [data], data.shape, np.uint8, "ZYX", (4.0, 2.5, 2.5))
    return path


def test_infer_keeps_dtype_and_divides_the_voxel_size(model_file, lr_file, tmp_path):
    out = tmp_path / "x2.ome.tif"
    result = run("infer", model_file, lr_file, "-o", out, "--bp-iters", "2", "--tile", "8,32,32", "-q")
    assert result.exit_code == 0, result.output
    vol = read_volume(out)
    src = read_volume(lr_file)
    assert vol.dtype == np.uint8
    assert vol.data.shape == tuple(2 * n for n in src.data.shape)
    assert vol.voxel_size == pytest.approx((2.0, 1.25, 1.25))
    assert vol.data.std() > 0
    out32 = tmp_path / "x2f.ome.tif"
    assert run("infer", model_file, lr_file, "-o", out32, "--dtype", "float32", "--bp-iters", "2", "-q").exit_code == 0
    floats = read_volume(out32).data
    assert floats.dtype == np.float32 and src.data.min() >= 0
    assert floats.min() >= 0  # never below zero when the input is not (not even by a rounding error)


def test_train_reports_the_patch_it_trains_on(lr_file, tmp_path):
    from sv_deploy.train import split_for_training

    result = run("train", lr_file, "-o", tmp_path / "m.svmodel", "--steps", "1", "--batch", "1", "--members", "1",
                 "--patch", "64,256,256", "-q")
    assert result.exit_code == 0, result.output
    used = ",".join(map(str, split_for_training(read_volume(lr_file).data.shape, (64, 256, 256), (2, 2, 2))[2]))
    assert f"note: --patch 64,256,256 is larger than the volume" in result.stderr and f"trains on {used} patches" in result.stderr
    assert f"patch {used}, lr" in result.stderr


def test_train_writes_a_model_with_provenance(lr_file, tmp_path):
    model = tmp_path / "m.svmodel"
    result = run("train", lr_file, "-o", model, "--steps", "3", "--batch", "2", "--patch", "8,32,32", "-q")
    assert result.exit_code == 0, result.output
    assert "overfits below about 300,000" in result.stderr  # the crop is small: the user is told
    info = run("info", model)
    assert '"input_sha256"' in info.output and '"stages"' in info.output
    # on a CPU train settles which backend infer runs (and caches the export if it is ONNX
    # Runtime), so the first infer neither times the backends nor exports
    from sv_deploy.backends import auto_backend
    from sv_deploy.cpu_choice import choose
    from sv_deploy.model_file import load_model
    from sv_deploy.onnx_cache import cache_path

    if auto_backend("svmodel", "auto") != "measure":
        return  # a CUDA machine keeps torch for a .svmodel and needs no export
    config, _, sha256 = load_model(model)
    notes = []
    chosen = choose(str(model), config, True, notes.append)
    assert notes == []  # kept by train, or nothing to time (no stage runs a network)
    assert chosen == "torch" or cache_path(sha256, folded=True).is_file()
    result = run("infer", model, lr_file, "-o", tmp_path / "o.ome.tif", "--bp-iters", "1", "-q")
    assert result.exit_code == 0 and f"with {chosen} (cpu" in result.stderr
    assert "export" not in result.stderr and "timing" not in result.stderr


def test_evaluate_prints_the_three_rows(lr_file, tmp_path, flybrain_crop):
    truth = tmp_path / "truth.tif"
    write_volume(truth, [flybrain_crop], flybrain_crop.shape, np.uint8, "ZYX", (2.0, 1.25, 1.25))
    result = run("evaluate", truth, truth, "--lowres", lr_file)
    assert result.exit_code == 0, result.output
    assert "tricubic x2 + back-projection" in result.output and "inf" in result.output
    assert "warning" not in result.stderr  # the LR voxels are the truth's times 2
    other = tmp_path / "other_lr.tif"  # the same voxels, said to be sampled x4 laterally
    write_volume(other, [read_volume(lr_file).data], read_volume(lr_file).data.shape, np.uint8, "ZYX", (4.0, 5.0, 5.0))
    warned = run("evaluate", truth, truth, "--lowres", other)
    assert warned.exit_code == 0 and "not the reference's 2,1.25,1.25 um times 2x2x2" in warned.stderr
    assert "in y, x: is it the input" in warned.stderr
    # the JSON says what was scored against what, at which factor
    report = json.loads(run("evaluate", truth, truth, "--lowres", lr_file, "--bp-iters", "3", "--json").stdout)
    assert report["output"] == str(truth) and report["lowres"] == str(lr_file)
    assert report["factors"] == [2, 2, 2] and report["bp_iters"] == 3
    assert report["rows"][2]["name"] == "tricubic x2 + back-projection (3 it)"
    # the reference itself as --lowres (no factor) is refused
    assert_one_line_error(run("evaluate", truth, truth, "--lowres", truth), "--lowres has the reference's own shape")


def test_option_and_argument_errors_are_one_line_too(tmp_path):
    assert_one_line_error(run("infer", "m.svmodel", "x.tif", "-o", "y.tif", "--tile", "16,64"),
                          "--tile", "three positive numbers", "infer --help")
    assert_one_line_error(run("infer"), "Missing argument 'MODEL'")
    assert_one_line_error(run("train", "x.tif", "--steps", "many"), "--steps", "train --help")
    assert_one_line_error(run("infer", "m.svmodel", "x.tif", "-o"), "'-o' requires an argument",
                          "(see 'sv-deploy infer --help')")
    assert_one_line_error(run("infer", "m.svmodel", "x.tif", "-o", "y.tif", "--settle", "3"),
                          "--settle only applies with --watch")
    assert run("--version").exit_code == 0 and run("infer", "--help").exit_code == 0


@pytest.fixture()
def bad_inputs(tmp_path):
    files = {}
    files["not_tiff"] = tmp_path / "notes.tif"
    files["not_tiff"].write_text("not an image")
    files["four_d"] = tmp_path / "four.tif"
    tifffile.imwrite(files["four_d"], np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32), photometric="minisblack")
    nan = np.random.default_rng(0).random((8, 32, 32)).astype(np.float32)
    nan[2, 3, 4] = np.inf
    files["nan"] = tmp_path / "nan.tif"
    tifffile.imwrite(files["nan"], nan, photometric="minisblack")
    files["constant"] = tmp_path / "constant.tif"
    tifffile.imwrite(files["constant"], np.full((8, 32, 32), 7, np.uint16))
    files["truncated"] = tmp_path / "cut.tif"  # an ImageJ stack cut off mid-copy: tifffile alone reads plane 1
    tifffile.imwrite(files["truncated"], np.random.default_rng(0).integers(0, 100, (8, 32, 32)).astype(np.uint16),
                     imagej=True, metadata={"axes": "ZYX"})
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:9000])
    files["ome_cut"] = tmp_path / "cut.ome.tif"  # OME-TIFF keeps its XML last: without it, channels read as z
    tifffile.imwrite(files["ome_cut"], np.random.default_rng(0).integers(0, 100, (2, 8, 32, 32)).astype(np.uint16),
                     ome=True, metadata={"axes": "CZYX"})
    files["ome_cut"].write_bytes(files["ome_cut"].read_bytes()[:-1])
    files["damaged"] = tmp_path / "damaged.tif"  # compressed pixels that no longer decode
    tifffile.imwrite(files["damaged"], np.random.default_rng(0).integers(0, 100, (8, 32, 32)).astype(np.uint16),
                     compression="zlib")
    raw = bytearray(files["damaged"].read_bytes())
    raw[300:340] = bytes(40)
    files["damaged"].write_bytes(bytes(raw))
    files["frames"] = tmp_path / "frames.tif"  # a z-stack an acquisition program saved as a time series
    tifffile.imwrite(files["frames"], np.random.default_rng(0).integers(0, 100, (8, 32, 32)).astype(np.uint16),
                     imagej=True, metadata={"axes": "TYX"})
    files["huge"] = tmp_path / "huge.tif"
    tifffile.imwrite(files["huge"], np.random.default_rng(0).random((8, 32, 32)) * 1e300, photometric="minisblack")
    files["tiny"] = tmp_path / "tiny.tif"
    tifffile.imwrite(files["tiny"], np.random.default_rng(0).integers(0, 100, (2, 12, 12)).astype(np.uint16))
    return files


@pytest.mark.parametrize(
    "key,words",
    [
        ("not_tiff", ["not a readable TIFF"]),
        ("missing", ["no such file"]),
        ("four_d", ["--axes"]),
        ("nan", ["NaN/Inf"]),
        ("constant", ["constant"]),
        ("truncated", ["incomplete or damaged", "wait until it is complete"]),
        ("ome_cut", ["incomplete or damaged", "invalid value offset"]),
        ("damaged", ["is damaged: its pixels cannot be decoded", "copy or export it again"]),
        ("frames", ["8 time points", "--time N", "--axes ZYX"]),
        ("huge", ["beyond what 32-bit floats hold", "rescale it"]),
    ],
)
def test_bad_volumes_give_one_line_and_no_output(key, words, bad_inputs, model_file, tmp_path):
    src = bad_inputs.get(key, tmp_path / "missing.tif")
    out = tmp_path / "out.ome.tif"
    assert_one_line_error(run("infer", model_file, src, "-o", out), *words)
    model = tmp_path / "m.svmodel"
    assert_one_line_error(run("train", src, "-o", model), *words)
    assert not out.exists() and not model.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_volume_smaller_than_a_patch(bad_inputs, tmp_path):
    model = tmp_path / "m.svmodel"
    assert_one_line_error(run("train", bad_inputs["tiny"], "-o", model, "-q"), "smaller than one training patch")
    assert not model.exists()


def test_existing_output_is_kept_without_overwrite(model_file, lr_file, tmp_path):
    out = tmp_path / "out.ome.tif"
    out.write_bytes(b"precious")
    assert_one_line_error(run("infer", model_file, lr_file, "-o", out), "--overwrite")
    assert out.read_bytes() == b"precious"
    folder = tmp_path / "named like a model.svmodel"
    folder.mkdir()
    for overwrite in ([], ["--overwrite"]):  # not first asked for --overwrite, which cannot help
        assert_one_line_error(run("train", lr_file, "-o", folder, *overwrite), f"{folder} is a directory")
    assert folder.is_dir() and not list(folder.iterdir())


def test_model_that_is_not_ours_or_edited(model_file, lr_file, tmp_path):
    out = tmp_path / "out.ome.tif"
    assert_one_line_error(run("infer", lr_file, lr_file, "-o", out), "is an image, not a model file")
    raw = bytearray(model_file.read_bytes())
    raw[-5] ^= 0x55
    edited = tmp_path / "edited.svmodel"
    edited.write_bytes(bytes(raw))
    assert_one_line_error(run("infer", edited, lr_file, "-o", out), "checksum")
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_kill_mid_run_leaves_no_output(model_file, tmp_path, flybrain_crop, sig):
    big = tmp_path / "big.tif"
    data = np.tile(flybrain_crop, (2, 1, 1))
    write_volume(big, [data], data.shape, np.uint8, "ZYX", (1.0, 1.0, 1.0))
    out = tmp_path / "out.ome.tif"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sv_deploy", "infer", str(model_file), str(big), "-o", str(out), "--tile", "8,32,32"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
        # a test run started in the background of a shell ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.ome.tif.partial-*")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    why = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert err.strip().splitlines()[-1] == f"error: {why}; the output in progress was not written"
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.ome.tif.partial-*"))


def test_export_then_onnxruntime_infer_equals_torch_infer(model_file, lr_file, tmp_path):
    result = run("export", model_file, "-o", tmp_path / "exp")
    assert result.exit_code == 0, result.output
    onnx_file = tmp_path / "exp" / "small.onnx"
    assert onnx_file.is_file()

    from sv_deploy.model_file import read_header

    shown = json.loads(run("info", onnx_file).stdout)  # the export tells what it came from
    assert shown["source_sha256"] == read_header(model_file)["sha256"] and shown["config"]["stages"] == [[2, 2, 2]]
    assert shown["halo"] > 0 and shown["folded_ensemble"] is False and shown["opset"] == 18
    assert "torch" in shown["exported_with"] and shown["stages_run_as_interpolation"] == []
    # an export is not a .svmodel: exporting it again names what to give instead
    assert_one_line_error(run("export", onnx_file, "-o", tmp_path / "exp2"), "is an ONNX export, not a .svmodel")
    common = ["--tile", "8,24,24", "--bp-iters", "2", "--dtype", "float32", "-q"]
    torch_out, ort_out = tmp_path / "t.ome.tif", tmp_path / "o.ome.tif"
    assert run("infer", model_file, lr_file, "-o", torch_out, "--backend", "torch", *common).exit_code == 0
    result = run("infer", onnx_file, lr_file, "-o", ort_out, "--backend", "onnxruntime", *common)
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.stderr
    a, b = read_volume(torch_out), read_volume(ort_out)
    assert a.voxel_size == b.voxel_size
    span = float(a.data.max() - a.data.min())
    assert np.abs(a.data - b.data).max() <= 1e-5 * span


def test_auto_backend_on_a_cpu_times_both_once_per_kind_of_run_and_keeps_the_faster(model_file, lr_file, tmp_path,
                                                                                   monkeypatch):
    from sv_deploy import cpu_choice

    monkeypatch.setenv("SV_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(cpu_choice.TIMED_BLOCK, "3d", (10, 48, 48))  # the real code, a smaller block
    common = ["--tile", "8,24,24", "--bp-iters", "2", "--dtype", "float32", "-q", "--device", "cpu"]
    # a bad input fails at once, before anything is timed
    (tmp_path / "notes.tif").write_text("not an image")
    assert_one_line_error(run("infer", model_file, tmp_path / "notes.tif", "-o", tmp_path / "n.ome.tif", *common),
                          "notes.tif")
    assert not (tmp_path / "cache" / cpu_choice.FILE).exists()
    first = run("infer", model_file, lr_file, "-o", tmp_path / "a.ome.tif", *common)
    assert first.exit_code == 0, first.output
    assert "timing ONNX Runtime and torch on this CPU for 3D models with the ensemble" in first.stderr
    kept = cpu_choice.read_choices(tmp_path / "cache" / cpu_choice.FILE)
    (entry,) = kept.values()
    seconds = entry["seconds"]
    assert set(seconds) == {"onnxruntime", "torch"} and min(seconds.values()) > 0 and entry["block"] == [10, 48, 48]
    chosen = entry["backend"]
    assert chosen == cpu_choice.faster(seconds) and f"infer runs {chosen} here" in first.stderr
    assert f"with {chosen} (cpu" in first.stderr
    # kept: the next run goes straight to it, with the same result as naming it
    second = run("infer", model_file, lr_file, "-o", tmp_path / "b.ome.tif", *common)
    assert second.exit_code == 0 and "timing" not in second.stderr and f"with {chosen} (cpu" in second.stderr
    named = run("infer", model_file, lr_file, "-o", tmp_path / "c.ome.tif", *common, "--backend", chosen)
    assert named.exit_code == 0
    a, b, c = (read_volume(tmp_path / n).data for n in ("a.ome.tif", "b.ome.tif", "c.ome.tif"))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    # without the ensemble the runs differ (one pass each): timed on their own
    fast = run("infer", model_file, lr_file, "-o", tmp_path / "d.ome.tif", *common, "--no-ensemble")
    assert fast.exit_code == 0 and "for 3D models without the ensemble" in fast.stderr
    assert len(cpu_choice.read_choices(tmp_path / "cache" / cpu_choice.FILE)) == 2
    # a damaged record is timed again, not trusted or fatal
    (tmp_path / "cache" / cpu_choice.FILE).write_text("{not json")
    again = run("infer", model_file, lr_file, "-o", tmp_path / "e.ome.tif", *common)
    assert again.exit_code == 0 and "timing ONNX Runtime and torch" in again.stderr
    # an export, --compile and a named backend run as asked, with nothing timed
    def refuse(*args):
        raise AssertionError("timed the backends")

    monkeypatch.setattr(cpu_choice, "measure", refuse)
    assert run("export", model_file, "-o", tmp_path / "export").exit_code == 0
    (onnx_file,) = (tmp_path / "export").glob("*.onnx")
    (tmp_path / "cache" / cpu_choice.FILE).unlink()
    for extra in ([], ["--backend", "torch"], ["--compile"]):
        model = onnx_file if not extra else model_file
        done = run("infer", model, lr_file, "-o", tmp_path / f"x{len(extra)}.ome.tif", *common, *extra)
        assert done.exit_code == 0 and "timing" not in done.stderr, done.stderr
    assert not (tmp_path / "cache" / cpu_choice.FILE).exists()


def test_auto_backend_runs_torch_where_onnxruntime_fails_and_does_not_keep_that(model_file, lr_file, tmp_path,
                                                                                 monkeypatch):
    """ONNX Runtime failing to load the model (its session raises, as for a graph it cannot run):
    infer goes on with torch."""
    import onnxruntime

    from sv_deploy import cpu_choice

    monkeypatch.setenv("SV_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(cpu_choice.TIMED_BLOCK, "3d", (10, 48, 48))

    def no_session(*args, **kwargs):
        raise onnxruntime.capi.onnxruntime_pybind11_state.Fail("this ONNX Runtime cannot load the model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    result = run("infer", model_file, lr_file, "-o", tmp_path / "a.ome.tif", "--tile", "8,24,24", "--bp-iters", "1",
                 "-q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime could not run this model here (" in result.stderr and "with torch (cpu" in result.stderr
    assert cpu_choice.read_choices(tmp_path / "cache" / cpu_choice.FILE) == {}  # the next run tries again


def test_onnxruntime_on_a_svmodel_caches_its_export_once(model_file, lr_file, tmp_path, monkeypatch):
    from sv_deploy.onnx_cache import cache_path
    from sv_deploy.model_file import read_header

    monkeypatch.setenv("SV_DEPLOY_CACHE", str(tmp_path / "cache"))
    common = ["--tile", "8,24,24", "--bp-iters", "2", "--dtype", "float32", "-q", "--device", "cpu",
              "--backend", "onnxruntime"]
    first = run("infer", model_file, lr_file, "-o", tmp_path / "a.ome.tif", *common)
    assert first.exit_code == 0, first.output
    assert "onnxruntime" in first.stderr and "cached the export" in first.stderr
    cached = cache_path(read_header(model_file)["sha256"], folded=True)  # the ensemble folded in (the default)
    assert cached.is_file() and cached.parent.parent == tmp_path / "cache"
    second = run("infer", model_file, lr_file, "-o", tmp_path / "b.ome.tif", *common)
    assert second.exit_code == 0 and "onnxruntime" in second.stderr and "export" not in second.stderr
    assert run("infer", model_file, lr_file, "-o", tmp_path / "t.ome.tif", *common[:-1], "torch").exit_code == 0
    a, b, t = (read_volume(tmp_path / n).data for n in ("a.ome.tif", "b.ome.tif", "t.ome.tif"))
    assert np.array_equal(a, b)
    assert np.abs(a - t).max() <= 1e-5 * float(t.max() - t.min())
    # a damaged cache entry is noticed and rebuilt, not trusted
    cached.write_bytes(b"not onnx")
    third = run("infer", model_file, lr_file, "-o", tmp_path / "c.ome.tif", *common)
    assert third.exit_code == 0 and "does not match" in third.stderr
    assert np.array_equal(read_volume(tmp_path / "c.ome.tif").data, a)
    # so is an entry that still parses, with its metadata intact, but weights changed
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(cached))
    for init in graph.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(graph, str(cached))
    fourth = run("infer", model_file, lr_file, "-o", tmp_path / "d.ome.tif", *common)
    assert fourth.exit_code == 0 and "does not match" in fourth.stderr
    assert np.array_equal(read_volume(tmp_path / "d.ome.tif").data, a)


def test_an_edited_export_or_model_is_refused_by_infer_and_info(model_file, lr_file, tmp_path):

    import onnx
    from onnx import numpy_helper

    assert run("export", model_file, "-o", tmp_path / "exp").exit_code == 0
    exported = tmp_path / "exp" / "small.onnx"
    info = run("info", exported)
    assert info.exit_code == 0 and json.loads(info.output)["checksum"] == "verified"

    def edited(name, change):
        graph = onnx.load(str(exported))
        change(graph)
        path = tmp_path / "exp" / name
        onnx.save(graph, str(path))
        return path

    def set_prop(key, value):
        def change(graph):
            next(p for p in graph.metadata_props if p.key == key).value = value
        return change

    def scale_weights(graph):
        init = next(i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))

    def older_opset(graph):  # the same graph read under another opset: its operators could mean other things
        next(o for o in graph.opset_import if o.domain in ("", "ai.onnx")).version -= 1

    def older_ir(graph):
        graph.ir_version -= 1


    config = json.loads(next(p.value for p in onnx.load(str(exported)).metadata_props if p.key == "sv_deploy.config"))
    config["stages"] = [[1, 2, 2]]
    for path in (edited("garbage.onnx", set_prop("sv_deploy.config", "garbage")),
                 edited("stages.onnx", set_prop("sv_deploy.config", json.dumps(config))),
                 edited("tensors.onnx", set_prop("sv_deploy.stage_tensors", "xx")),
                 edited("weights.onnx", scale_weights), edited("opset.onnx", older_opset),
                 edited("ir.onnx", older_ir), edited("model_sum.onnx", set_prop("sv_deploy.model_sha256", "0" * 64))):
        assert_one_line_error(run("info", path), "fails its checksum")
        out = tmp_path / f"{path.stem}.ome.tif"
        assert_one_line_error(run("infer", path, lr_file, "-o", out), "fails its checksum", path.name)
        assert not out.exists()
    # a .svmodel whose weights changed: info checks the checksum as infer does
    raw = bytearray(model_file.read_bytes())
    raw[-10] ^= 0xFF
    flipped = tmp_path / "flipped.svmodel"
    flipped.write_bytes(bytes(raw))
    assert_one_line_error(run("info", flipped), "fails its checksum")
    assert json.loads(run("info", model_file).output)["checksum"] == "verified"


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_a_64_bit_integer_input_needs_a_dtype_ome_tiff_can_hold(model_file, lr_file, tmp_path, dtype):
    src = tmp_path / "wide.tif"
    tifffile.imwrite(src, read_volume(lr_file).data.astype(dtype))
    out = tmp_path / "wide_x2.ome.tif"
    assert_one_line_error(run("infer", model_file, src, "-o", out, "-q"), "--dtype float32")
    assert not out.exists()
    ok = run("infer", model_file, src, "-o", out, "-q", "--dtype", "float32", "--no-ensemble", "--bp-iters", "0")
    assert ok.exit_code == 0, ok.output
    assert read_volume(out).dtype == np.float32


def test_a_float16_input_comes_out_as_float32(model_file, lr_file, tmp_path):
    src = tmp_path / "half.tif"
    tifffile.imwrite(src, (read_volume(lr_file).data / 255).astype(np.float16))
    out = tmp_path / "half_x2.ome.tif"
    result = run("infer", model_file, src, "-o", out, "-q", "--no-ensemble", "--bp-iters", "0")
    assert result.exit_code == 0, result.output
    vol = read_volume(out)
    assert vol.dtype == np.float32 and vol.data.min() >= 0 and vol.data.max() > 0.1


def test_export_errors(model_file, lr_file, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = run("export", model_file, "-o", tmp_path / "e", "--engine")
        assert_one_line_error(result, "TensorRT is not installed")
        assert not (tmp_path / "e").exists()
    assert_one_line_error(run("export", lr_file, "-o", tmp_path / "e2"), "is an image, not a model file")
    assert not (tmp_path / "e2").exists()
    assert_one_line_error(run("export", model_file, "-o", tmp_path / "e3", "--tile", "8,32,32", "--no-plugin"),
                          "--tile and --plugin/--no-plugin only apply to TensorRT engines")
    assert not (tmp_path / "e3").exists()
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"\x00not a protobuf at all")
    assert_one_line_error(run("infer", not_onnx, lr_file, "-o", tmp_path / "x.ome.tif"), "fake.onnx")
    assert not (tmp_path / "x.ome.tif").exists()
    assert_one_line_error(
        run("infer", model_file, lr_file, "-o", tmp_path / "y.ome.tif", "--backend", "tensorrt"), "export"
    )


def test_train_names_a_wrong_model_name_or_a_too_small_patch(lr_file, tmp_path):
    assert_one_line_error(run("train", lr_file, "-o", tmp_path / "m.tif", "-q"), ".svmodel")
    assert_one_line_error(run("train", lr_file, "-o", tmp_path / "m.svmodel", "--patch", "2,8,8", "-q"),
                          "--patch 2,8,8", "at least 4,16,16")
    assert not list(tmp_path.iterdir())


def test_infer_refuses_to_replace_its_input(model_file, lr_file, tmp_path):
    src = tmp_path / "acq.tif"
    src.write_bytes(lr_file.read_bytes())
    assert_one_line_error(run("infer", model_file, src, "-o", src, "--overwrite", "-q"), "the input itself")
    assert src.read_bytes() == lr_file.read_bytes()


def test_output_dtype_that_would_clip_or_round_is_refused(model_file, tmp_path, flybrain_crop):
    wide = tmp_path / "wide.tif"
    data = flybrain_crop[:8, :48, :48].astype(np.uint16) * 16  # not a uint8 any more
    write_volume(wide, [data], data.shape, np.uint16, "ZYX", (1.0, 1.0, 1.0))
    fine = tmp_path / "fine.ome.tif"  # uint16 holds it (and the export is cached before the errors)
    assert run("infer", model_file, wide, "-o", fine, "--dtype", "uint16", "--no-ensemble", "-q").exit_code == 0
    out = tmp_path / "o.ome.tif"
    assert_one_line_error(run("infer", model_file, wide, "-o", out, "--dtype", "uint8", "-q"), "--dtype uint8",
                          f"0..{data.max()}")
    unit = tmp_path / "unit.tif"
    floats = data.astype(np.float32) / data.max()  # a [0, 1] float volume: uint16 would keep only 0 and 1
    write_volume(unit, [floats], floats.shape, np.float32, "ZYX", (1.0, 1.0, 1.0))
    assert_one_line_error(run("infer", model_file, unit, "-o", out, "--dtype", "uint16", "-q"), "fractional")
    assert not out.exists()


def test_two_d_model_refuses_a_stack(lr_file, tmp_path, flybrain_crop):
    image = tmp_path / "plane.tif"
    plane = flybrain_crop[flybrain_crop.shape[0] // 2]
    write_volume(image, [plane[None]], (1, *plane.shape), np.uint8, "YX", (None, 0.2, 0.2))
    model = tmp_path / "plane.svmodel"
    result = run("train", image, "-o", model, "--steps", "2", "--members", "1", "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "o.ome.tif"
    assert_one_line_error(run("infer", model, lr_file, "-o", out, "-q"), "2D images only", "--scale 1,2,2")
    assert not out.exists()


def test_evaluate_reads_axes_and_refuses_a_constant_reference(lr_file, tmp_path, flybrain_crop):
    ref = tmp_path / "czyx.tif"  # no axes metadata: --axes says what the dimensions are
    tifffile.imwrite(ref, np.stack([flybrain_crop, flybrain_crop[::-1]]), photometric="minisblack")
    out = tmp_path / "same.tif"
    write_volume(out, [flybrain_crop], flybrain_crop.shape, np.uint8, "ZYX", (1.0, 1.0, 1.0))

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    scores = []
    for channel in ("0", "1"):
        result = run("evaluate", out, ref, "--axes", "CZYX", "--channel", channel, "--json")
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout, parse_constant=no_constants)["rows"][0]["matched"]["psnr"])
    assert scores[0] is None  # identical volumes: an infinite PSNR has no JSON number
    assert 0 < scores[1] < 40  # the other channel (z flipped) differs
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.full(flybrain_crop.shape, 9, np.uint8))
    assert_one_line_error(run("evaluate", lr_file, flat), "constant")
    blank = run("evaluate", flat, out, "--json")  # a blank output is scored, with a warning
    assert blank.exit_code == 0 and json.loads(blank.stdout)["rows"][0]["matched"]["psnr"] > 0
    assert f"warning: {flat} is constant (every voxel 9)" in blank.stderr
    assert "warning" not in run("evaluate", out, ref, "--axes", "CZYX", "--channel", "1").stderr
    # which file it is whose axes are not known, when --axes reads the other files
    assert_one_line_error(run("evaluate", ref, out), f"{ref}: the axes of this 4D image are ambiguous")


def test_a_missing_voxel_size_is_reported_and_can_be_given(model_file, tmp_path, flybrain_crop):
    plain = tmp_path / "plain.tif"  # no resolution tags, no ImageJ or OME metadata
    tifffile.imwrite(plain, flybrain_crop[:8, :40, :40], photometric="minisblack")
    out = tmp_path / "o.ome.tif"
    result = run("infer", model_file, plain, "-o", out, "--no-ensemble", "--bp-iters", "0", "-q")
    assert result.exit_code == 0 and "voxel size in z, y, x" in result.stderr and "--voxel-size" in result.stderr
    assert read_volume(out).voxel_size == (None, None, None)
    result = run("infer", model_file, plain, "-o", out, "--overwrite", "--no-ensemble", "--bp-iters", "0", "-q",
                 "--voxel-size", "1,0.5,0.5")
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert read_volume(out).voxel_size == pytest.approx((0.5, 0.25, 0.25))


def test_memory_and_voxel_size_options_are_checked(model_file, lr_file, tmp_path):
    out = tmp_path / "o.ome.tif"
    assert_one_line_error(run("infer", model_file, lr_file, "-o", out, "--max-memory", "0"), "more than 0")
    # a tile given beside a limit keeps to it, or the run would crawl through passes of a few voxels
    assert_one_line_error(run("infer", model_file, lr_file, "-o", out, "--tile", "16,64,64", "--max-memory", "10M", "--backend", "torch"),
                          "--tile 16x64x64 needs about", "more than the 10.0 MiB --max-memory allows")
    assert run("infer", model_file, lr_file, "-o", out, "--tile", "16,64,64", "--max-memory", "1G", "-q").exit_code == 0
    out.unlink()
    result = run("infer", model_file, lr_file, "-o", out, "--voxel-size", "nan,1,1")
    assert result.exit_code == 2 and "three positive numbers" in result.output and "0.5,0.1,0.1" in result.output
    assert not out.exists()


def test_compile_is_refused_where_it_does_not_apply(model_file, lr_file, tmp_path):
    out = tmp_path / "o.ome.tif"
    assert_one_line_error(run("infer", model_file, lr_file, "-o", out, "--compile", "--backend", "onnxruntime"),
                          "--compile", "--backend torch")
    assert run("export", model_file, "-o", tmp_path / "export").exit_code == 0
    onnx = next((tmp_path / "export").glob("*.onnx"))
    assert_one_line_error(run("infer", onnx, lr_file, "-o", out, "--compile"), "--compile", onnx.name)
    assert not out.exists()


def test_backend_tensorrt_on_a_model_file_says_how_to_get_an_engine(model_file, lr_file, tmp_path):
    import importlib.util

    out = tmp_path / "o.ome.tif"
    result = run("infer", model_file, lr_file, "-o", out, "--backend", "tensorrt")
    assert_one_line_error(result, "--backend tensorrt runs an engine", f"sv-deploy export {model_file} -o DIR --engine")
    installed = importlib.util.find_spec("tensorrt") is not None
    assert ("install TensorRT from NVIDIA's package index" in result.stderr) is not installed
    assert not out.exists()


def test_info_reads_an_engine_manifest_and_refuses_other_json(model_file, lr_file, tmp_path):

    from sv_deploy.model_file import read_header
    from sv_deploy.trt_plan import EngineManifest, stage_profiles
    from sv_deploy.config import ModelConfig

    config = ModelConfig.from_json(read_header(model_file)["config"])
    manifest = EngineManifest(
        engines=("small.plugin.stage1.engine",), profiles=tuple(stage_profiles(config.stages, config.arch, (8, 32, 32), 10, True)),
        tile=(8, 32, 32), tensorrt_version="10.13.0", gpu_name="NVIDIA H100", compute_capability=(9, 0), plugin=True,
        plugin_version="1", precision="fp32", source_onnx="small.onnx", source_onnx_sha256="a" * 64,
        config=config.to_json(), created="2026-11-21T00:00:00+00:00",
    )
    path = tmp_path / "small.plugin.trt.json"
    path.write_text(manifest.to_json())
    shown = run("info", path)
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    assert report["gpu_name"] == "NVIDIA H100" and report["config"]["stages"] == [list(f) for f in config.stages]
    other = tmp_path / "notes.json"
    other.write_text('{"hello": 1}')
    assert_one_line_error(run("info", other), "not an sv-deploy engine manifest")
    named = tmp_path / "notes.trt.json"  # infer says so too, before it looks for TensorRT
    named.write_text('{"hello": 1}')
    assert_one_line_error(run("infer", named, lr_file, "-o", tmp_path / "o.ome.tif"), "not an sv-deploy engine manifest")
    assert not (tmp_path / "o.ome.tif").exists()


def test_an_export_onnx_runtime_cannot_run_is_one_error_line(model_file, lr_file, tmp_path):
    """A graph ONNX Runtime cannot run whose digests hold (another writer, or edited by hand and the
    digests recomputed): refused in one line, no traceback."""
    import onnx

    from sv_deploy import onnx_graph

    assert run("export", model_file, "-o", tmp_path / "exp").exit_code == 0
    graph = onnx.load(str(tmp_path / "exp" / "small.onnx"))
    next(n for n in graph.graph.node if n.op_type == "Conv").op_type = "NoSuchOp"
    onnx_graph.seal(graph, onnx_graph.read_metadata(graph))
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    out = tmp_path / "o.ome.tif"
    assert_one_line_error(run("infer", tmp_path / "bad.onnx", lr_file, "-o", out), "ONNX Runtime cannot run this export")
    assert not out.exists()


def test_outputs_under_a_file_or_with_too_long_a_name_are_refused_before_any_work(model_file, lr_file, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for args in (("train", lr_file, "-o", afile / "m.svmodel", "--steps", "1"),
                 ("infer", model_file, lr_file, "-o", afile / "o.ome.tif"),
                 ("infer", model_file, str(lr_file.parent / "*.tif"), "-o", afile / "out"),
                 ("export", model_file, "-o", afile / "sub"),
                 ("simulate", "beads", afile / "s"),
                 ("bench", "--quick", afile / "b")):
        result = run(*args)
        assert_one_line_error(result, f"{afile} is a file, not a folder")
        assert result.exit_code == 2, args
    too_long = tmp_path / ("a" * 240 + ".ome.tif")
    assert_one_line_error(run("infer", model_file, lr_file, "-o", too_long), "too long for this file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_training_numbers_that_are_not_finite_or_out_of_range_are_one_line(lr_file, tmp_path):
    model = tmp_path / "m.svmodel"
    for args in (("--lr", "nan"), ("--lr", "inf"), ("--ema", "nan"), ("--seed", "-1"), ("--seed", str(2**70)),
                 ("--scale", "2,"), ("--l1-weight", "-0.1"), ("--l1-weight", "nan")):
        result = run("train", lr_file, "-o", model, "--steps", "1", *args)
        assert_one_line_error(result, args[0])
        assert result.exit_code == 2 and "training on" not in result.stderr
    assert not model.exists()


def test_the_loss_weight_asked_for_is_the_one_saved_and_the_paper_recipe_keeps_squared_error(lr_file, tmp_path):
    from sv_deploy.config import TrainConfig
    from sv_deploy.model_file import load_model

    model = tmp_path / "m.svmodel"
    for extra, expected in (((), TrainConfig().l1_weight), (("--recipe", "paper"), 0.0),
                            (("--recipe", "paper", "--l1-weight", "0.5"), 0.5)):
        result = run("train", lr_file, "-o", model, "--steps", "1", "--batch", "1", "--members", "1",
                     "--patch", "8,32,32", "-q", "--overwrite", *extra)
        assert result.exit_code == 0, result.output
        assert load_model(model)[0].train.l1_weight == expected, extra


def test_infer_takes_the_training_voxel_size_where_the_input_gives_none(lr_file, tmp_path):
    plain = tmp_path / "my stack.tif"  # no resolution tags, no ImageJ or OME metadata
    tifffile.imwrite(plain, read_volume(lr_file).data, photometric="minisblack")
    model = tmp_path / "m.svmodel"
    trained = run("train", plain, "-o", model, "--steps", "1", "--batch", "1", "--members", "1", "--patch", "8,32,32",
                  "-q", "--voxel-size", "1,0.5,0.5")
    assert trained.exit_code == 0, trained.output
    beside = tmp_path / "my stack_x2.ome.tif"
    assert f"next: sv-deploy infer {model} '{plain}' -o '{beside}' --voxel-size 1,0.5,0.5" in trained.stderr
    out = tmp_path / "o.ome.tif"
    result = run("infer", model, plain, "-o", out, "--no-ensemble", "--bp-iters", "0", "-q")
    assert result.exit_code == 0 and "using the model's training input's (1, 0.5, 0.5 um" in result.stderr
    assert read_volume(out).voxel_size == pytest.approx((0.5, 0.25, 0.25))
