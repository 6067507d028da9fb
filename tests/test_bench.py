"""`sv-deploy bench`: statistics, and a real --quick run that writes JSON, Markdown and PNG."""

import json

import numpy as np
import pytest

from sv_deploy.bench_stats import PAPER, fastest, speedup, summarize

from test_cli import run


def test_summary_statistics():
    s = summarize([3.0, 1.0, 2.0, 4.0, 100.0])
    assert s["runs"] == 5 and s["min"] == 1.0 and s["median"] == 3.0 and s["max"] == 100.0
    assert s["mean"] == pytest.approx(22.0)
    assert s["p90"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
    assert s["p99"] > s["p90"] > s["median"]
    with pytest.raises(ValueError):
        summarize([])
    assert speedup(62.0, 31.0) == 2.0 and speedup(None, 1.0) is None


def test_fastest_backend_per_task_from_a_real_run():
    """Session 20's table (BENCH.md): on that Intel machine compiled torch was fastest on every
    task, ONNX Runtime second or third."""
    from pathlib import Path

    rows = json.loads((Path(__file__).parents[1] / "benchmarks/results/session20/bench_all/bench.json")
                      .read_text())["inference"]
    best = {(f["task"], f["mode"]): f for f in fastest(rows)}
    assert set(best) == {("2d", "full"), ("2d", "fast"), ("3d", "full"), ("3d", "fast")}
    assert {f["backend"] for f in best.values()} == {"torch compiled (cpu)"}
    assert best["3d", "full"]["file_to_file_s"] == pytest.approx(59.293, abs=1e-3)
    assert best["3d", "full"]["infer_with"].startswith("infer --compile --device cpu;")
    # 59.3 against torch eager's 69.8 s is a clear lead; 10.41 against 10.55 s (3D fast) is not
    assert best["3d", "full"]["runner_up"] == "torch eager (cpu)" and best["3d", "full"]["clear"]
    assert not best["3d", "fast"]["clear"] and best["3d", "fast"]["infer_with"].startswith("infer --no-ensemble --compile")
    without = [r for r in rows if r["backend"] != "torch compiled (cpu)"]
    assert {(f["task"], f["mode"]): f["backend"] for f in fastest(without)}[("3d", "full")] == "torch eager (cpu)"
    # one backend timed for a task is no choice: left out
    assert fastest([r for r in rows if r["backend"] == "onnxruntime (cpu)"]) == []


def test_peak_rss_sees_a_freed_allocation_and_only_its_own_block():
    from sv_deploy.bench import PeakRSS

    size = 300 * 2**20
    with PeakRSS() as big:
        block = np.ones(size // 8)  # touched, so resident
        del block
    assert big.peak - big.start >= 0.9 * size  # gone before the block ended, still counted
    with PeakRSS() as small:
        block = np.ones(2**20 // 8)
        del block
    assert small.peak - small.start < 0.5 * size  # the earlier peak does not carry over


def test_quick_bench_writes_its_reports(tmp_path):
    out = tmp_path / "bench"
    result = run("bench", out, "--quick", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert json.loads((out / "bench.json").read_text()) == report
    assert (out / "bench.md").read_text().startswith("# sv-deploy bench (quick)")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["paper"] == PAPER
    names = {b["name"]: b for b in report["backends"]}
    assert names["torch eager (cpu)"]["available"] and names["onnxruntime (cpu)"]["available"]
    assert all(b["available"] or b["reason"] for b in report["backends"])
    rows = {(r["task"], r["mode"], r["backend"]) for r in report["inference"]}
    for task in ("2d", "3d"):
        for mode in ("full", "fast"):
            assert (task, mode, "torch eager (cpu)") in rows
    for r in report["inference"]:
        assert 0 < r["compute"]["median"] <= r["file_to_file_s"] * 1.5
        assert r["voxels_per_s"] > 0 and r["peak_rss_mib"] > 0
        if r["backend"].endswith("(cpu)"):  # transfers and device memory exist only on a GPU
            assert r["host_to_device"] is r["device_to_host"] is None
        if r["backend"] == "torch eager (cuda)":
            assert r["host_to_device"]["median"] > 0 and r["device_to_host"]["median"] > 0
            assert r["peak_device_mib"] > 0
    assert report["training"][0]["seconds"] > 0
    series = {(r["task"], r["backend"].split(" ")[0]): r for r in report["series"]}
    assert set(series) == {(t, b) for t in ("2d", "3d") for b in ("torch", "onnxruntime")}
    for (task, backend), r in series.items():
        assert r["files"] == 2 and 0 < r["load_s"] < r["first_output_s"] and r["per_file"]["median"] > 0
        assert r["export_cached"] == (backend == "onnxruntime")  # --quick reuses its one export
    assert "## Repeated inference" in (out / "bench.md").read_text()
    assert "export cache held this model already" in (out / "bench.md").read_text()
    assert set(report["ratios"]) == {"2d full", "2d fast", "3d full", "3d fast"}
    for f in report["fastest"]:  # shortest of the rows timed for it, named as infer runs it
        timed = [r for r in report["inference"] if (r["task"], r["mode"]) == (f["task"], f["mode"])]
        assert f["file_to_file_s"] == min(r["file_to_file_s"] for r in timed) and f["infer_with"]
    assert {(f["task"], f["mode"]) for f in report["fastest"]} == {(t, m) for t in ("2d", "3d") for m in ("full", "fast")}
    assert "a smoke check, not a choice to make from it" in (out / "bench.md").read_text()
    assert "fastest here" not in result.stderr  # --quick: not on screen as if it were a measurement
    shown = [line for line in result.stderr.splitlines() if line.startswith("not available: torch compiled (cpu)")]
    assert shown and "skipped with --quick" in shown[0]  # on screen too, not only in the files
    assert "not compared here: --quick times smaller volumes" in (out / "bench.md").read_text()
    assert any(m.startswith("--quick: the paper-recipe training") for m in report["not_measured"])
    again = run("bench", out, "--quick")  # an earlier report is not replaced unasked
    assert again.exit_code == 2 and "pass --overwrite" in again.stderr
    assert json.loads((out / "bench.json").read_text()) == report


def test_bench_repeated_only(tmp_path):
    result = run("bench", tmp_path / "b", "--quick", "--repeated-only", "--task", "2d", "--backend", "onnxruntime", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inference"] == [] and report["training"] == []
    assert [r["backend"] for r in report["series"]] == ["onnxruntime (cpu, fp32)"]


def _stack(path, shape=(6, 40, 36)):
    from sv_deploy.volume_io import write_volume

    vol = np.random.default_rng(0).integers(0, 4000, shape, dtype=np.uint16)
    write_volume(path, [vol], vol.shape, vol.dtype, "ZYX", (0.5, 0.2, 0.2))
    return path


def test_bench_times_a_users_own_file(tmp_path):
    src = _stack(tmp_path / "mine.tif")
    result = run("bench", tmp_path / "b", "--quick", "--task", "files", "--input", src, "--backend", "ONNXRuntime",
                 "--no-training", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {(r["task"], r["mode"]) for r in report["inference"]} == {("file mine.tif", "full"), ("file mine.tif", "fast")}
    for r in report["inference"]:
        assert r["input_shape"] == [6, 40, 36] and r["paper_s"] is None and r["file_to_file_s"] > 0
        assert r["compute"]["runs"] == 2  # --runs holds with --quick too
    assert [r["task"] for r in report["series"]] == ["file mine.tif"]
    assert "file mine.tif" in (tmp_path / "b" / "bench.md").read_text()


def test_bench_refuses_bad_user_files_before_timing_anything(tmp_path):
    from sv_deploy.bench import fresh_model
    from sv_deploy.model_file import save_model

    from test_cli import assert_one_line_error

    bad = tmp_path / "notes.tif"
    bad.write_text("not an image")
    assert_one_line_error(run("bench", tmp_path / "b", "--input", bad), "notes.tif")
    model_2d = tmp_path / "flat.svmodel"
    save_model(model_2d, *fresh_model([(1, 2, 2)], axes="YX"))
    assert_one_line_error(run("bench", tmp_path / "b", "--input", _stack(tmp_path / "s.tif"), "--model", model_2d), "2D")
    assert_one_line_error(run("bench", tmp_path / "b", "--task", "files"), "--input")
    assert_one_line_error(run("bench", tmp_path / "b", "--backend", "onnx-runtime"), "matches none of")
    assert_one_line_error(run("bench", tmp_path / "b", "--model", model_2d), "add --input")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    assert_one_line_error(run("bench", tmp_path / "b", "--input", bad, "--model", onnx), "give the .svmodel")
    assert_one_line_error(run("bench", tmp_path / "b", "--repeated-only", "--backend", "compiled"), "picks neither")
    assert not (tmp_path / "b").exists()


def test_bench_refuses_backends_that_are_all_unavailable_naming_why(tmp_path):
    from test_cli import assert_one_line_error

    result = run("bench", tmp_path / "b", "--quick", "--task", "2d", "--no-training", "--backend", "compiled")
    assert_one_line_error(result, "torch compiled (cpu): skipped with --quick")
    assert not (tmp_path / "b" / "bench.json").exists()


def test_an_interrupted_bench_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    from sv_deploy import bench

    def interrupted(quick, log):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "time_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(tmp_path / "b", quick=True, select=["2d"], only=["onnxruntime"], log=lambda m: None)
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["interrupted"] and {r["mode"] for r in report["inference"]} == {"full", "fast"}
    assert "everything after the interruption" in report["not_measured"]
    assert (tmp_path / "b" / "bench.md").read_text().startswith("# sv-deploy bench (quick, interrupted")


def test_backends_left_out_by_backend_are_not_built(tmp_path):
    """Compiling (minutes) and engine builds are skipped for backends --backend does not pick."""
    from sv_deploy.bench import backends, fresh_model

    config, stages = fresh_model([(2, 2, 2)])
    found = {b["name"]: b for b in backends(config, stages, False, tmp_path, lambda m: None, only=["onnxruntime (cpu)"])}
    assert found["torch compiled (cpu)"]["reason"] == "not picked by --backend"
    assert found["tensorrt (plugin shuffle)"]["reason"] == "not picked by --backend"
    assert found["onnxruntime (cpu)"]["available"] and found["onnxruntime (cpu)"]["runner_full"] is not None
