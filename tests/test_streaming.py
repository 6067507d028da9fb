"""Streaming inference: overlap, memory planning and bounds, many inputs, and watching a folder."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from sv_deploy.config import ArchConfig
from sv_deploy.enhance_file import ReadOptions, is_out_of_memory, output_name, shrink_after_oom
from sv_deploy.errors import UserError
from sv_deploy.memory import (MIN_BLOCK_VOXELS, TileDoesNotFit, choose_block, choose_tile, least_budget, map_threshold,
                              parse_size, plan_bytes)
from sv_deploy.pipeline import Aborted, ReadAhead, write_behind
from sv_deploy.volume_io import read_volume, write_volume
from sv_deploy.progress import LogProgress
from sv_deploy.watch import SettleTracker, watch

from test_cli import assert_one_line_error, run


def test_write_behind_delivers_everything_in_order():
    got = []
    write_behind(lambda items: got.extend(items), iter(range(50)), depth=2)
    assert got == list(range(50))


def test_write_behind_aborts_the_writer_when_the_producer_fails():
    seen = []

    def consumer(items):
        try:
            for item in items:
                seen.append(item)
        except Aborted:
            seen.append("aborted")
            raise

    def failing():
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        write_behind(consumer, failing())
    assert seen == [1, "aborted"]


def test_ctrl_c_while_the_writer_finishes_discards_the_output():
    """Every slab handed over, the writer still busy with the last one: Ctrl-C must still abort
    it, or a complete-looking output would appear after "not written"."""
    import signal

    seen = []

    def slow_consumer(items):
        try:
            for item in items:
                time.sleep(0.6)  # writing the last slab
                seen.append(item)
        except Aborted:
            seen.append("aborted")
            raise
        seen.append("renamed")

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # lands in the final wait for the writer
        with pytest.raises(KeyboardInterrupt):
            write_behind(slow_consumer, iter([1]))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert seen == [1, "aborted"]


def test_write_behind_stops_the_producer_when_the_writer_fails():
    produced = []

    def counting():
        for i in range(1000):
            produced.append(i)
            yield i

    def consumer(items):
        for item in items:
            if item == 3:
                raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_behind(consumer, counting())
    assert len(produced) < 10


def test_read_ahead_reads_the_next_input_while_the_current_one_is_worked_on():
    next_read = threading.Event()

    def read(key):
        if key == "bad":
            raise UserError("bad is not a TIFF")
        if key == "b":
            next_read.set()
        return key.upper()

    with ReadAhead(read) as reader:
        assert reader.take("a") == "A"  # nothing ahead: read now
        reader.prefetch("b")
        # the caller works on "a" now; "b" is read meanwhile, not when its turn comes
        assert next_read.wait(5)
        assert reader.take("b") == "B"
        reader.prefetch("bad")  # its error waits for its turn
        with pytest.raises(UserError, match="bad is not a TIFF"):
            reader.take("bad")
        reader.prefetch("c")
        reader.prefetch("d")  # replaces "c", which is then read when asked for
        assert reader.take("c") == "C" and reader.take("d") == "D"
    versions, reads = {"f": 1}, []
    with ReadAhead(lambda key: reads.append(key) or f"{key}{versions[key]}", version=versions.get) as reader:
        reader.prefetch("f")
        versions["f"] = 2  # rewritten after it was read ahead: read again at its turn
        assert reader.take("f") == "f2" and len(reads) == 2
        reader.prefetch("f")
        assert reader.take("f") == "f2" and len(reads) == 3  # unchanged: the copy read ahead


def test_settle_tracker_waits_for_a_stable_file():
    t = SettleTracker(settle=2.0)
    assert t.ready({"a": (10, 1.0)}, now=0.0) == []
    assert t.ready({"a": (20, 2.0)}, now=1.5) == []  # still growing
    assert t.ready({"a": (20, 2.0)}, now=3.0) == []  # stable for 1.5 s only
    assert t.ready({"a": (20, 2.0)}, now=3.6) == ["a"]
    assert t.ready({"a": (20, 2.0)}, now=9.0) == []  # handed over once
    # the writer had only paused: the file changes again and is handed over again once stable
    assert t.ready({"a": (30, 10.0)}, now=10.0) == []
    assert t.ready({"a": (30, 10.0)}, now=12.5) == ["a"]
    assert not t.pending({"a": (30, 10.0)}) and t.pending({"a": (30, 10.0), "b": (1, 1.0)})


def test_watch_waits_for_a_folder_that_is_gone(tmp_path):
    lines = []
    watch(tmp_path / "unplugged", lambda p, upcoming: None, settle=0.1, poll=0.05, idle_exit=0.3, log=lines.append)
    assert len(lines) == 1 and "cannot list" in lines[0]


def test_log_progress_writes_a_line_now_and_then():
    clock, lines = [0.0], []
    bar = LogProgress(200, "enhance", "vox", every=30, clock=lambda: clock[0], write=lines.append)
    for _ in range(20):
        clock[0] += 5
        bar.update(10)
    assert lines == ["enhance: 30% (30 s, ETA 70 s)", "enhance: 60% (60 s, ETA 40 s)", "enhance: 90% (90 s, ETA 10 s)"]


def test_progress_counts_the_network_passes_of_a_single_tile():
    import torch

    from sv_deploy.backends import TorchBackend
    from sv_deploy.enhance import InferenceOptions, _Counting, enhance_block, tile_work
    from sv_deploy.model import SVStage
    from sv_deploy.tiling import plan_tiles

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    torch.manual_seed(0)
    backend, bar = TorchBackend([SVStage((2, 2, 2))], torch.device("cpu")), Bar()
    volume = np.random.default_rng(0).random((6, 20, 20), dtype=np.float32)
    (tile,) = plan_tiles(volume.shape, (6, 20, 20), (0, 0, 0), (2, 2, 2))
    counting = _Counting(backend, bar)
    counting.limit = 10**9
    enhance_block(counting, [(2, 2, 2)], ArchConfig(), volume, InferenceOptions(bp_iters=0))
    assert bar.n == tile_work(tile, [(2, 2, 2)], InferenceOptions()) == 8 * volume.size  # one pass per ensemble member
    # passes smaller than the tile each read their own halo: counted, so the bar reaches its end
    # when the last pass does, not while small passes go on
    small = InferenceOptions(bp_iters=0, block=600)
    bar.n = 0
    enhance_block(counting, [(2, 2, 2)], ArchConfig(), volume, small)
    assert bar.n == tile_work(tile, [(2, 2, 2)], small, halo=ArchConfig().halo()) > 8 * volume.size


def test_sizes_and_names():
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size("1000") == 1000
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots")
    assert output_name("a/stack.tif", (2, 2, 2)) == "stack_x2.ome.tif"
    assert output_name("b.ome.tiff", (1, 2, 2)) == "b_x1x2x2.ome.tif"
    assert output_name("h.tif", (2, 2, 2), ReadOptions(channel=1, time=0)) == "h_c1_t0_x2.ome.tif"
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(RuntimeError("CUDA out of memory."))
    # a pass that failed on the device shrinks the passes only; host memory shrinks the tile too
    assert shrink_after_oom(RuntimeError("CUDA out of memory."), (12, 48, 48), 100_000) == ((12, 48, 48), 50_000)
    assert shrink_after_oom(MemoryError(), (12, 48, 48), 100_000) == ((6, 24, 24), 50_000)
    assert shrink_after_oom(RuntimeError("CUDA out of memory."), (12, 48, 48), 1) == ((6, 24, 24), 1)
    assert shrink_after_oom(MemoryError(), (4, 4, 4), 100_000) == ((2, 4, 4), 50_000)  # a small tile never grows
    # passes stop halving at MIN_BLOCK_VOXELS (1-voxel passes would crawl); then the tile shrinks
    assert shrink_after_oom(RuntimeError("failed to allocate"), (12, 48, 48), MIN_BLOCK_VOXELS + 99) == ((12, 48, 48), MIN_BLOCK_VOXELS)
    assert shrink_after_oom(RuntimeError("failed to allocate"), (12, 48, 48), MIN_BLOCK_VOXELS) == ((6, 24, 24), MIN_BLOCK_VOXELS)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    # cuDNN's and cuBLAS's ways of saying it, and torch's own type whatever its message
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("GET was unable to find an engine to execute this computation"))
    assert is_out_of_memory(torch.OutOfMemoryError("Tried to allocate 2.00 GiB"))


def test_the_heap_threshold_under_a_memory_limit_scales_with_it():
    """Blocks from 1/64 of --max-memory up are returned when freed; never below 1 MiB (each mapped
    block costs fresh pages) nor above glibc's own 32 MiB ceiling."""
    assert map_threshold(56 * 2**20) == 2**20
    assert map_threshold(2**30) == 16 * 2**20
    assert map_threshold(2 * 2**30) == map_threshold(64 * 2**30) == 32 * 2**20
    assert map_threshold(1) == 2**20


def test_the_heap_is_set_for_each_kind_of_run_and_restored_after(monkeypatch):
    """What `enhance_file` asks of glibc: without --max-memory every block from its heap and freed
    memory kept for the next pass (a quarter of the budget, 64 MiB to 1 GiB), handed back when
    the run ends; under a limit the scaled threshold, blocks mapped again, passed by position as
    the CLI passes it; afterwards the settings of the run around it, else glibc's end values, also
    when the run fails."""
    from sv_deploy import memory

    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda param, size: calls.append((param, size)) or True)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append("trim"))
    monkeypatch.setattr(memory, "default_budget", lambda already_read=0: 8 * 2**30)
    T, N, K = memory.M_MMAP_THRESHOLD, memory.M_MMAP_MAX, memory.M_TRIM_THRESHOLD
    end_values = [(T, 32 * 2**20), (N, 65536), (K, 64 * 2**20)]
    reuse = [(T, 32 * 2**20), (N, 0), (K, 2**30)]

    @memory.heap_set_for_run
    def work(path, max_memory=None, fail=False):
        if fail:
            raise ValueError("the run failed")
        return list(calls)

    assert work("a") == reuse
    assert calls[3:] == end_values + ["trim"]
    calls.clear()
    assert work("a", 56 * 2**20) == [(T, 2**20), (N, 65536), (K, 2**21)]
    assert calls[3:] == end_values  # mapped blocks went back when freed: nothing to trim
    calls.clear()
    assert work("a", max_memory=4 * 2**30)[0] == (T, 32 * 2**20)
    calls.clear()
    assert memory.heap_keeps() == 0
    with memory.heap_for(2**27):  # a small machine: the kept memory shrinks with its budget
        assert calls == [(T, 32 * 2**20), (N, 0), (K, 64 * 2**20)]
        assert memory.heap_keeps() == 64 * 2**20  # what the run's tile plan leaves room for
        work("a", 56 * 2**20)
        assert calls[-3:] == [(T, 32 * 2**20), (N, 0), (K, 64 * 2**20)]  # the outer run's again
        calls.clear()
        work("a")
        assert "trim" not in calls  # the outer run goes on reusing its heap
    assert calls[-4:] == end_values + ["trim"]
    calls.clear()
    with memory.heap_for(2**30, limited=True):
        assert memory.heap_keeps() == 0
        with pytest.raises(ValueError):
            work("a", fail=True)
        assert calls[-4:] == [(T, 16 * 2**20), (N, 65536), (K, 2**25), "trim"]  # the limit's again, trimmed
    assert calls[-3:] == end_values and memory._in_force == []


def test_the_heap_is_left_alone_where_glibc_refuses_or_the_user_set_it(monkeypatch):
    from sv_deploy import memory

    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda param, size: calls.append((param, size)) or False)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append("trim"))
    with memory.heap_for(2**30):
        assert memory._in_force == [] and memory.heap_keeps() == 0  # nothing kept: the plan keeps its budget
    assert calls == [(memory.M_MMAP_THRESHOLD, 32 * 2**20)]  # tried the threshold, nothing more
    environ = {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.trim_threshold=1000"}
    assert memory.user_set(memory.M_TRIM_THRESHOLD, environ)
    assert not memory.user_set(memory.M_MMAP_THRESHOLD, environ)
    assert memory.user_set(memory.M_MMAP_MAX, {"MALLOC_MMAP_MAX_": "0"})


def test_every_run_without_a_limit_keeps_its_heap():
    """Inference, training and the CPU backend timing each run under `heap_for`."""
    from sv_deploy.cpu_choice import measure
    from sv_deploy.enhance_file import enhance_file
    from sv_deploy.train import train_stages

    from sv_deploy.memory import heap_set_for_run

    wrapper = heap_set_for_run(lambda max_memory=None: None).__code__
    for func in (enhance_file, train_stages, measure):
        assert func.__code__ is wrapper


HEAP_PROBE = """
import os, numpy as np
from sv_deploy import memory
page = os.sysconf("SC_PAGE_SIZE")

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

def left_after_freeing():
    a = np.ones(96 * 2**20 // 8)  # touched: every page resident
    before = resident()
    del a
    return before - resident()

with memory.heap_for(8 * 2**30):
    kept = left_after_freeing()
    held = resident()
    np.ones(96 * 2**20 // 8).sum()
    reused = resident() - held
handed_back = held - resident()
with memory.heap_for(2**30, limited=True):
    returned = left_after_freeing()
print(kept >> 20, reused >> 20, handed_back >> 20, returned >> 20)
"""


def test_settings_of_glibcs_heap_keep_or_return_freed_memory():
    """The settings do what they are for, on a fresh process's own heap (no other test's threads
    beside it): without a limit a freed 96 MiB array stays in the process, and the next one reuses
    its pages; when the run ends they leave; under a limit such an array leaves at once. (Under
    glibc's defaults it leaves at once too, so the first check fails without the settings.)"""
    import ctypes

    from sv_deploy import memory

    if not sys.platform.startswith("linux") or any(memory.user_set(p) for p in memory._USER_SETTING) \
            or os.environ.get("LD_PRELOAD"):
        pytest.skip("glibc's heap settings are used on Linux only, not where the user set them or "
                    "preloads another allocator")
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept, reused, handed_back, returned = map(int, out.stdout.split())  # MiB
    assert kept < 16 and reused < 16  # stayed, and served the next array
    assert handed_back > 80 and returned > 80


def test_default_budget_is_taken_before_the_input_is_read(model_file, tmp_path, monkeypatch):
    """The plan counts the input (`plan_bytes`); a budget measured after loading it would count it
    twice and refuse volumes that fit."""
    import sv_deploy.enhance_file as ef
    from sv_deploy.backends import TorchBackend
    from sv_deploy.enhance import InferenceOptions
    from sv_deploy.model_file import load_model

    events = []
    real_read = ef.read_input
    monkeypatch.setattr(ef, "default_budget", lambda already_read=0: events.append("budget") or 2**30)
    monkeypatch.setattr(ef, "read_input", lambda *a: events.append("read") or real_read(*a))
    src = tmp_path / "in.tif"
    write_volume(src, [np.random.default_rng(0).integers(0, 200, (6, 20, 20), dtype=np.uint8)], (6, 20, 20), np.uint8, "ZYX", (1.0, 1.0, 1.0))
    config, stages, _ = load_model(model_file)
    ef.enhance_file(TorchBackend(stages, torch.device("cpu")), config, src, tmp_path / "o.ome.tif",
                    InferenceOptions(ensemble=False, bp_iters=0), progress=False, log=lambda m: None)
    assert events == ["budget", "read"]


@pytest.mark.parametrize("stages", [((2, 2, 2),), ((2, 2, 2), (2, 2, 2)), ((1, 2, 2),)])
def test_chosen_tile_fits_the_budget_and_grows_with_it(stages):
    arch, volume = ArchConfig(), (40, 300, 300)
    # x4 with the ensemble needs about 1.65 GiB at the smallest tile here (stage 2's read region
    # with the x4 back-projection's halo, its network pass at the measured arena cost)
    small = choose_tile(2 * 2**30, volume, stages, arch, 10, True, 2, (32, 96, 96))
    large = choose_tile(6 * 2**30, volume, stages, arch, 10, True, 2, (32, 96, 96))
    assert plan_bytes(volume, small, stages, arch, 10, True, 2) <= 2 * 2**30
    assert all(s <= big for s, big in zip(small, large))
    with pytest.raises(UserError, match="--max-memory"):
        choose_tile(2**20, volume, stages, arch, 10, True, 2, (32, 96, 96))


@pytest.mark.parametrize("stages", [((2, 2, 2),), ((2, 2, 2), (2, 2, 2))])
def test_the_memory_a_refusal_names_is_enough(stages):
    """Passes shrink with the budget, so the need is searched for: given the figure, a tile fits;
    2 MiB less, none does."""
    arch, volume = ArchConfig(), (16, 64, 64)
    need = least_budget(volume, stages, arch, 10, True, 1)

    def tile_for(budget):
        return choose_tile(budget, volume, stages, arch, 10, True, 1, (16, 64, 64),
                           choose_block(budget, stages, arch, True))

    assert tile_for(need)
    with pytest.raises(TileDoesNotFit):
        tile_for(need - 2 * 2**20)
    assert "--no-ensemble" not in str(TileDoesNotFit(2**20, need, False, 0))


@pytest.mark.parametrize("stages, most", [(((2, 2, 2),), 1.4), (((2, 2, 2), (2, 2, 2)), 2.0)])
def test_the_automatic_tile_of_a_large_volume_is_not_mostly_halo(stages, most):
    """Each tile recomputes the back-projection's halo around it (20 input voxels at x2, 24 at
    x4), so the automatic choice must let tiles grow as far as the budget allows: at 11 GiB the
    tiles of a 100x1024x1024 volume read, at x2, 1.75x its voxels with cores capped at 64x256x256
    and 1.16x now; at x4, 7.8x while whole output z-slabs were held (13 GiB of output, 134 MiB per
    input plane, took the budget) and 1.76x now that tiles go straight into the file."""
    from sv_deploy.enhance_file import AUTO_TILE_LIMIT
    from sv_deploy.tiling import _computed, total_halo

    arch, volume = ArchConfig(), (100, 1024, 1024)
    halo = total_halo(stages, arch, 10)
    tile = choose_tile(11 * 2**30, volume, stages, arch, 10, True, 2, AUTO_TILE_LIMIT, 1_000_000)
    read = np.prod([_computed(n, c, h) for n, c, h in zip(volume, tile, halo)])
    assert read / np.prod(volume) < most
    assert plan_bytes(volume, tile, stages, arch, 10, True, 2, 1_000_000) <= 11 * 2**30


def test_passes_on_a_gpu_are_not_charged_to_the_host_budget():
    """A GPU sizes its passes from its own free memory (`choose_block`); their activations live
    there, so the host plan counts only each pass's input and output staging."""
    from sv_deploy.memory import choose_block, network_bytes

    arch, stages, volume = ArchConfig(), ((2, 2, 2), (2, 2, 2)), (38, 256, 256)
    block = choose_block(8 * 2**30, stages, arch, True, device_free=70 * 2**30)
    assert block > 5_000_000  # an H100-sized pass, far above the host's
    host = 10 * 2**30
    charged = choose_tile(host, volume, stages, arch, 10, True, 2, (64, 256, 256), block)
    tile = choose_tile(host, volume, stages, arch, 10, True, 2, (64, 256, 256), block, on_device=True)
    assert tile == volume  # the whole volume in one tile: its host arrays fit in 10 GiB
    assert np.prod(charged) < np.prod(volume) / 2  # counting GPU activations on the host cut it up
    assert plan_bytes(volume, tile, stages, arch, 10, True, 2, block, on_device=True) <= host
    assert network_bytes(1000, (2, 2, 2), arch, 4, on_device=True) == 1000 * 4 * 4 * 9
    assert network_bytes(1000, (2, 2, 2), arch, 4, on_device=True) < network_bytes(1000, (2, 2, 2), arch, 4)


def structured(shape, seed=0):
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.float32)
    idx = tuple(rng.integers(0, n, 300) for n in shape)
    vol[idx] = 200
    from scipy.ndimage import gaussian_filter

    return np.clip(gaussian_filter(vol, 1.5) * 8 + 10, 0, 255).astype(np.uint8)


def test_many_inputs_with_one_bad_file(model_file, tmp_path):
    good = []
    for i in range(2):
        path = tmp_path / f"acq{i}.tif"
        data = structured((8, 24, 24), seed=i)
        write_volume(path, [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))
        good.append(path)
    (tmp_path / "acq2.tif").write_bytes(b"not a tiff")
    result = run("infer", model_file, str(tmp_path / "acq*.tif"), "-o", tmp_path / "out", "--bp-iters", "1", "-q")
    assert result.exit_code == 1
    assert "acq2.tif" in result.stderr and "enhanced 2 file(s), 1 failed" in result.stderr
    assert "time to first output" in result.stderr
    for i in range(2):
        out = read_volume(tmp_path / "out" / f"acq{i}_x2.ome.tif")
        assert out.data.shape == (16, 48, 48) and out.voxel_size == (0.5, 0.25, 0.25)
    assert not (tmp_path / "out" / "acq2_x2.ome.tif").exists()
    assert_one_line_error(run("infer", model_file, str(tmp_path / "none*.tif"), "-o", tmp_path / "o2"), "no files match")
    # run again: the files already enhanced are skipped, not failed, and kept as they were
    before = (tmp_path / "out" / "acq0_x2.ome.tif").stat().st_mtime_ns
    again = run("infer", model_file, *good, "-o", tmp_path / "out", "--bp-iters", "1", "-q")
    assert again.exit_code == 0, again.output
    assert "enhanced 0 file(s), 0 failed, 2 skipped (output exists)" in again.stderr
    assert (tmp_path / "out" / "acq0_x2.ome.tif").stat().st_mtime_ns == before


def test_many_inputs_are_read_one_ahead_unless_memory_is_capped(model_file, tmp_path, monkeypatch):
    """While a file is enhanced, the next is read in the reader thread (a bad one still fails
    alone); under --max-memory every file is read when its turn comes, inside the limit."""
    import sv_deploy.enhance_file as ef

    for i in range(4):
        data = structured((8, 24, 24), seed=i)
        write_volume(tmp_path / f"acq{i}.tif", [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))
    (tmp_path / "acq1.tif").write_bytes(b"not a tiff")
    reads = []
    real_read = ef.read_input
    monkeypatch.setattr(ef, "read_input", lambda path, *a: reads.append(
        (os.path.basename(path), threading.current_thread().name)) or real_read(path, *a))
    result = run("infer", model_file, str(tmp_path / "acq*.tif"), "-o", tmp_path / "out", "--bp-iters", "1", "-q")
    assert result.exit_code == 1 and "enhanced 3 file(s), 1 failed" in result.stderr, result.stderr
    assert "acq1.tif" in result.stderr
    assert [name for name, _ in reads] == [f"acq{i}.tif" for i in range(4)]
    assert reads[0][1] == "MainThread" and all(t.startswith("sv-deploy-reader") for _, t in reads[1:])
    for i in (0, 2, 3):
        assert read_volume(tmp_path / "out" / f"acq{i}_x2.ome.tif").data.shape == (16, 48, 48)
    reads.clear()
    capped = run("infer", model_file, str(tmp_path / "acq*.tif"), "-o", tmp_path / "out2", "--bp-iters", "1",
                 "-q", "--max-memory", "1G")
    assert capped.exit_code == 1 and "enhanced 3 file(s), 1 failed" in capped.stderr
    assert [t for _, t in reads] == ["MainThread"] * 4


def test_an_output_the_disk_cannot_hold_is_refused_before_any_work(model_file, tmp_path, monkeypatch):
    import sv_deploy.volume_io as vio

    data = structured((8, 24, 24))
    src = tmp_path / "acq.tif"
    write_volume(src, [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))
    monkeypatch.setattr(vio, "_free_disk", lambda folder: 100_000)  # the x2 output: 37 kB, and 1 MiB to spare
    result = run("infer", model_file, src, "-o", tmp_path / "o.ome.tif", "-q")
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not enough disk space" in errors[0] and "needs 1.0 MiB, 0.1 MiB are free" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acq.tif"]
    # an output being replaced stays until the new one is renamed over it: its size is not free
    old = tmp_path / "old.ome.tif"
    old.write_bytes(bytes(500_000))
    monkeypatch.setattr(vio, "_free_disk", lambda folder: 2**20)  # enough only if old.ome.tif counted
    again = run("infer", model_file, src, "-o", old, "-q", "--overwrite")
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.exit_code == 2 and len(errors) == 1 and "the file it replaces stays" in errors[0], again.stderr
    assert old.read_bytes() == bytes(500_000)


def test_a_disk_that_fills_while_writing_ends_in_one_line_and_no_file(model_file, tmp_path, monkeypatch):
    import errno

    import sv_deploy.volume_io as vio

    data = structured((8, 24, 24))
    src = tmp_path / "acq.tif"
    write_volume(src, [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))

    def full(self, start, block):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vio.RegionWriter, "write", full)
    result = run("infer", model_file, src, "-o", tmp_path / "o.ome.tif", "-q")
    assert result.exit_code == 4 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'o.ome.tif'} could not be written (No space "
                                                      "left on device); free space on that disk or write it to another disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acq.tif"]


def test_batch_outputs_that_would_collide_or_a_file_name_for_many_are_refused(model_file, tmp_path):
    data = structured((8, 24, 24))
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        write_volume(tmp_path / folder / "x.tif", [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))
    out = tmp_path / "out"
    result = run("infer", model_file, str(tmp_path / "d1" / "*.tif"), str(tmp_path / "d2" / "*.tif"), "-o", out,
                 "--overwrite", "--backend", "torch")  # torch: no export message, whatever the cache holds
    assert_one_line_error(result, "would both be written to", "x_x2.ome.tif")
    assert not out.exists()
    two = run("infer", model_file, tmp_path / "d1" / "x.tif", tmp_path / "d2" / "x.tif", "-o", tmp_path / "r.ome.tif")
    assert_one_line_error(two, "names one file, but there are 2 inputs")
    glob_one = run("infer", model_file, str(tmp_path / "d1" / "*.tif"), "-o", tmp_path / "g.ome.tif")
    assert_one_line_error(glob_one, "is a glob")
    assert not (tmp_path / "r.ome.tif").exists() and not (tmp_path / "g.ome.tif").exists()


def test_a_batch_run_again_into_its_input_folder_leaves_its_outputs_alone(model_file, tmp_path):
    acq = tmp_path / "acq"
    acq.mkdir()
    data = structured((8, 24, 24))
    for name in ("a", "b"):
        write_volume(acq / f"{name}.tif", [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))
    first = run("infer", model_file, str(acq / "*.tif"), "-o", acq, "--bp-iters", "1", "-q")
    assert first.exit_code == 0, first.stderr
    again = run("infer", model_file, str(acq / "*.tif"), acq / "a.tif", "-o", acq, "--bp-iters", "1", "-q")
    assert again.exit_code == 0, again.stderr
    assert "1 input(s) named more than once" in again.stderr
    assert "leaving out 2 input(s) that are this batch's own outputs" in again.stderr
    assert "enhanced 0 file(s), 0 failed, 2 skipped (output exists)" in again.stderr
    assert sorted(p.name for p in acq.iterdir()) == ["a.tif", "a_x2.ome.tif", "b.tif", "b_x2.ome.tif"]
    # a folder as INPUT is its TIFF files, and its output a folder even for one file
    (acq / "notes.txt").write_text("not an image")
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.tif").write_bytes((acq / "a.tif").read_bytes())
    folder = run("infer", model_file, one, "-o", tmp_path / "out", "--bp-iters", "1", "-q")
    assert folder.exit_code == 0 and (tmp_path / "out" / "a_x2.ome.tif").is_file(), folder.stderr
    again = run("infer", model_file, acq, "-o", acq, "--bp-iters", "1", "-q")
    assert again.exit_code == 0 and "enhanced 0 file(s), 0 failed, 2 skipped (output exists)" in again.stderr
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("infer", model_file, tmp_path / "empty", "-o", tmp_path / "o3"), "holds no .tif")


def test_watch_enhances_completed_files_and_skips_bad_ones(model_file, tmp_path):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sv_deploy", "infer", str(model_file), "--watch", str(incoming), "-o", str(out),
         "--settle", "1.0", "--exit-when-idle", "8", "--bp-iters", "1", "-q", "--backend", "onnxruntime"],  # named: no timing of backends first
        stderr=subprocess.PIPE, text=True,
    )
    try:
        data = structured((8, 24, 24), seed=3)
        staged = tmp_path / "staged.tif"
        write_volume(staged, [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))
        blob = staged.read_bytes()
        time.sleep(2.0)  # the watcher is running
        target = incoming / "first.tif"
        with open(target, "wb") as f:  # written slowly, in pieces closer together than --settle
            for k in range(0, len(blob), len(blob) // 4 + 1):
                f.write(blob[k:k + len(blob) // 4 + 1])
                f.flush()
                time.sleep(0.4)
        (incoming / "broken.tif").write_bytes(b"II*\x00garbage")
        time.sleep(1.5)
        (incoming / "second.tif").write_bytes(blob)
        (incoming / "paused.tif").write_bytes(blob[: len(blob) // 3])  # the writer stalls past --settle...
        time.sleep(5.0)  # (room for second.tif, handled between the two reads, on a busy machine)
        (incoming / "paused.tif").write_bytes(blob[: 2 * len(blob) // 3])  # ...twice...
        time.sleep(5.0)
        (incoming / "paused.tif").write_bytes(blob)  # ...then finishes: the file is read again
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert err.count("paused.tif is incomplete or damaged") == 2, err  # its truncated reads failed
    assert "enhanced 3 file(s), 1 failed (" in err and "broken.tif)" in err  # and do not count once it is through
    for name in ("first", "second", "paused"):
        assert read_volume(out / f"{name}_x2.ome.tif").data.shape == (16, 48, 48)


def test_watch_reads_ahead_and_enhances_a_file_again_that_changed_after_it(model_file, tmp_path):
    """Two files waiting when the watch starts are ready together (the second is read ahead), and a
    file that was a complete but shorter stack when the acquisition paused past --settle, then grew,
    is enhanced again over the output this run made of it."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    data = structured((8, 24, 24), seed=3)
    for name in ("a", "b"):
        write_volume(incoming / f"{name}.tif", [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sv_deploy", "infer", str(model_file), "--watch", str(incoming), "-o", str(out),
         "--settle", "0.5", "--exit-when-idle", "4", "--bp-iters", "1", "-q", "--backend", "onnxruntime"],  # named: no timing of backends first
        stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)
        write_volume(incoming / "c.tif", [data[:4]], (4, 24, 24), np.uint8, "ZYX", (1.0, 0.5, 0.5))
        time.sleep(3.0)  # past --settle: the 4-plane stack is enhanced
        write_volume(incoming / "c.tif", [data], data.shape, np.uint8, "ZYX", (1.0, 0.5, 0.5))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "c.tif changed after it was enhanced; enhancing it again" in err
    assert "enhanced 3 file(s), 0 failed" in err
    for name in ("a", "b", "c"):
        assert read_volume(out / f"{name}_x2.ome.tif").data.shape == (16, 48, 48)


MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, torch
    torch.set_num_threads(2)
    from sv_deploy.backends import open_backend
    from sv_deploy.enhance import InferenceOptions
    from sv_deploy.enhance_file import enhance_file, read_input, ReadOptions
    from sv_deploy.memory import parse_size
    from sv_deploy.memory import choose_tile
    from sv_deploy.tiling import total_halo
    model, src, dst, limit, mode = sys.argv[1:6]
    config, runner = open_backend(model, "torch", "cpu", log=lambda m: None)
    options = InferenceOptions(ensemble=False, bp_iters=0)
    vol = read_input(src, ReadOptions())  # the baseline holds the input and a model that has run once
    tile = choose_tile(parse_size(limit), vol.data.shape, config.stages, config.arch, 0, False, 4, options.tile)
    halo = total_halo(config.stages, config.arch, 0)
    runner.predict(0, np.zeros((1, 1, *(t + 2 * h for t, h in zip(tile, halo))), np.float32))
    del vol
    if mode == "run":
        result = enhance_file(runner, config, src, dst, options, out_dtype="float32",
                              max_memory=parse_size(limit), progress=False, log=lambda m: None)
        print("tile", result.tile)
    # VmHWM, not ru_maxrss: ru_maxrss carries over the (larger) pytest parent's peak through exec
    print("peak_kib", next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
""")


def test_output_larger_than_the_memory_limit_streams_under_it(tmp_path):
    """A 64 MiB float32 output enhanced with a 56 MiB working-memory limit: peak RSS grows less."""
    import torch

    from sv_deploy.config import ModelConfig
    from sv_deploy.model import SVStage
    from sv_deploy.model_file import save_model

    torch.manual_seed(0)
    arch = ArchConfig(mid_layers=0)  # a small net: the point is memory, not quality
    model = tmp_path / "m.svmodel"
    save_model(model, ModelConfig(stages=((2, 2, 2),), arch=arch), [SVStage((2, 2, 2), arch)])
    data = structured((256, 64, 128), seed=1)
    src = tmp_path / "deep.tif"
    write_volume(src, [data], data.shape, np.uint8, "ZYX", (1.0, 1.0, 1.0))
    limit = 56 * 2**20
    assert 8 * data.size * 4 > limit  # the float32 output alone is larger than the limit
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    peaks = {}
    for mode in ("baseline", "run"):
        proc = subprocess.run([sys.executable, str(script), str(model), str(src), str(tmp_path / "o.ome.tif"),
                               str(limit), mode], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        peaks[mode] = int(proc.stdout.split("peak_kib")[1]) * 1024
    assert read_volume(tmp_path / "o.ome.tif").data.shape == (512, 128, 256)
    grew = peaks["run"] - peaks["baseline"]
    assert 0 < grew < limit, f"peak RSS grew by {grew / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB"


class RefusesLargePasses:
    """A backend whose allocator fails above a size, as a device short of memory does."""

    def __init__(self, inner, max_voxels):
        self.inner, self.max_voxels, self.name = inner, max_voxels, inner.name
        self.largest = 0

    def predict(self, stage, x):
        if x.size > self.max_voxels:
            raise RuntimeError(f"Failed to allocate memory for a pass of {x.size} voxels")
        self.largest = max(self.largest, x.size)
        return self.inner.predict(stage, x)


def test_out_of_memory_retries_with_smaller_passes_and_gives_the_same_output(model_file, tmp_path):
    from sv_deploy.backends import open_backend
    from sv_deploy.enhance import InferenceOptions
    from sv_deploy.enhance_file import enhance_file

    data = structured((12, 48, 48), seed=5)
    src = tmp_path / "in.tif"
    write_volume(src, [data], data.shape, np.uint8, "ZYX", (1.0, 1.0, 1.0))
    config, runner = open_backend(str(model_file), "torch", "cpu", log=lambda m: None)
    options = InferenceOptions(ensemble=False, bp_iters=1, block=100_000)
    kw = dict(out_dtype="float32", tile=(12, 48, 48), progress=False)
    enhance_file(runner, config, src, tmp_path / "ref.ome.tif", options, log=lambda m: None, **kw)
    logs = []
    limited = RefusesLargePasses(runner, 6_000)
    result = enhance_file(limited, config, src, tmp_path / "out.ome.tif", options, log=logs.append, **kw)
    assert any("out of memory" in m and "retrying" in m for m in logs)
    assert 0 < limited.largest <= 6_000 and result.block < 100_000
    ref, out = read_volume(tmp_path / "ref.ome.tif").data, read_volume(tmp_path / "out.ome.tif").data
    assert np.abs(out - ref).max() <= 1e-5 * np.ptp(ref)


PLAN_SCRIPT = textwrap.dedent("""
    import json, sys
    from math import prod
    import numpy as np
    from sv_deploy.backends import open_backend
    from sv_deploy.enhance import InferenceOptions
    from sv_deploy.enhance_file import enhance_file, memory_view, read_input, ReadOptions
    from sv_deploy.memory import FIXED_BYTES, INPUT_BYTES_PER_VOXEL, plan_bytes
    model, src, dst = sys.argv[1:4]
    config, runner = open_backend(model, "onnxruntime", "cpu", log=lambda m: None, ensemble=True)
    if dst == "export-only":  # the export's own peak would hide the run's: a process of its own
        sys.exit(0)
    options = InferenceOptions(ensemble=True, bp_iters=10)
    shape = read_input(src, ReadOptions()).data.shape

    def high_water():  # this process's peak RSS (ru_maxrss would carry over the parent's through exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    base = high_water()
    tile = (shape[0], shape[1] // 2, shape[2] // 2)
    result = enhance_file(runner, config, src, dst, options, tile=tile, max_memory=8 << 30, progress=False,
                          log=lambda m: None)
    grew = high_water() - base
    arch, ensemble = memory_view(runner, config, options)
    plan = plan_bytes(shape, tile, config.stages, arch, 10, ensemble, 2, result.block)
    print(json.dumps({"grew": grew, "plan": plan - FIXED_BYTES - INPUT_BYTES_PER_VOXEL * prod(shape)}))
""")


def test_the_memory_plan_covers_the_folded_ensemble_on_onnx_runtime(tmp_path):
    """The full recipe as `infer` runs it on a CPU (ONNX Runtime, ensemble folded, tiles whose
    network passes differ in shape): peak RSS grows by no more than the memory plan counts, which
    is what lets --max-memory hold (its arena once grew past the plan, BENCH.md session 14)."""
    import json

    from sv_deploy.bench import fresh_model
    from sv_deploy.model_file import save_model

    config, nets = fresh_model([(2, 2, 2)])
    model = tmp_path / "m.svmodel"
    save_model(model, config, nets)
    data = structured((30, 96, 96), seed=2).astype(np.uint16)
    src = tmp_path / "in.tif"
    write_volume(src, [data], data.shape, np.uint16, "ZYX", (1.0, 1.0, 1.0))
    script = tmp_path / "plan.py"
    script.write_text(PLAN_SCRIPT)
    env = {**os.environ, "SV_DEPLOY_CACHE": str(tmp_path / "cache")}
    for dst in ("export-only", str(tmp_path / "o.ome.tif")):
        proc = subprocess.run([sys.executable, str(script), str(model), str(src), dst],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < report["grew"] <= report["plan"], report
