import shutil

import numpy as np
import pytest
import tifffile

from sv_deploy.errors import UserError
from sv_deploy.volume_io import axes_warning, read_volume, scaled_voxel_size, volume_output, write_volume
from conftest import data_file


def test_imagej_voxel_size_is_read_in_micrometres():
    vol = read_volume(data_file("real", "3d_02_flybrain_confocal.tif"))
    assert vol.axes == "ZYX" and vol.data.shape == (57, 256, 256) and vol.dtype == np.uint8
    z, y, x = vol.voxel_size
    assert z == pytest.approx(3.947, abs=1e-3) and y == pytest.approx(2.6755, abs=1e-3) and x == y


def test_escaped_micro_sign_unit_is_understood():
    z, y, x = read_volume(data_file("real", "3d_10_chromosomes_neubias.tif")).voxel_size
    assert z == pytest.approx(0.15) and x == pytest.approx(0.03385, abs=1e-4)


def test_channel_is_picked_from_zcyx():
    path = data_file("real", "3d_08_PAIRED_nucleus_confocal_widefield.tif")
    with pytest.raises(UserError, match="--channel"):
        read_volume(path)
    conf = read_volume(path, channel=0)
    wide = read_volume(path, channel=1)
    assert conf.data.shape == wide.data.shape == (45, 130, 133)
    assert not np.array_equal(conf.data, wide.data)
    assert conf.voxel_size[0] == pytest.approx(0.4994, abs=1e-4)


def test_two_d_image_reads_as_depth_one():
    vol = read_volume(data_file("real", "2d_04_dsb2018_nuclei_stardist.tif"))
    assert vol.axes == "YX" and vol.data.shape == (1, 512, 512)


def test_ome_round_trip_keeps_data_dtype_and_voxel_size(tmp_path):
    data = np.random.default_rng(0).integers(0, 60000, (6, 9, 11)).astype(np.uint16)
    path = tmp_path / "v.ome.tif"
    write_volume(path, [data[:4], data[4:]], data.shape, np.uint16, "ZYX", (0.5, 0.125, 0.125))
    back = read_volume(path)
    np.testing.assert_array_equal(back.data, data)
    assert back.voxel_size == pytest.approx((0.5, 0.125, 0.125))
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("axes, shape", [("ZYX", (5, 37, 29)), ("YX", (1, 40, 33))])
def test_tiles_written_in_any_order_give_the_streamed_file(tmp_path, axes, shape):
    """Inference writes each tile into its place; the file must be the one `write_volume` streams
    page by page (bytes equal but for the OME UUID), readable with its voxel size."""
    data = np.random.default_rng(1).integers(0, 60000, shape).astype(np.uint16)
    boxes = [((0, 20, 9), (shape[0], shape[1], shape[2])), ((0, 0, 0), (shape[0], 20, shape[2])),
             ((0, 20, 0), (shape[0], shape[1], 9))]
    tiled, streamed = tmp_path / "tiled.ome.tif", tmp_path / "streamed.ome.tif"
    with volume_output(tiled, shape, np.uint16, axes, (0.5, 0.1, 0.1)) as out:
        for lo, hi in boxes:  # the last rows first, a narrow box last
            out.write(lo, data[tuple(slice(a, b) for a, b in zip(lo, hi))])
        with pytest.raises(ValueError, match="outside"):
            out.write((0, 30, 0), data[:, :20])
    write_volume(streamed, [data], shape, np.uint16, axes, (0.5, 0.1, 0.1))
    back = read_volume(tiled)
    np.testing.assert_array_equal(back.data, data)
    assert back.axes == axes and back.voxel_size[1:] == pytest.approx((0.1, 0.1))
    a, b = tiled.read_bytes(), streamed.read_bytes()
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    uuid = a.index(b"urn:uuid:") + len(b"urn:uuid:")
    assert len(a) == len(b) and all(uuid <= i < uuid + 36 for i in differ)
    assert not list(tmp_path.glob(".*partial*"))


def test_a_tiled_output_that_fails_or_does_not_fit_the_disk_leaves_no_file(tmp_path, monkeypatch):
    import sv_deploy.volume_io as vio

    path = tmp_path / "o.ome.tif"
    with pytest.raises(RuntimeError, match="tile failed"):
        with volume_output(path, (4, 16, 16), np.uint8, "ZYX", (1.0, 1.0, 1.0)) as out:
            out.write((0, 0, 0), np.ones((2, 16, 16), np.uint8))
            raise RuntimeError("tile failed")
    assert not path.exists() and not list(tmp_path.glob(".*partial*"))
    monkeypatch.setattr(vio, "_free_disk", lambda folder: 10_000)
    with pytest.raises(UserError, match=r"not enough disk space .* needs 3.0 MiB, 0.0 MiB are free"):
        with volume_output(path, (40, 160, 160), np.uint16, "ZYX", (1.0, 1.0, 1.0)):
            pass
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["imagej", "ome", "ome_czyx", "plain", "zlib"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95, "all but 1 byte"])
def test_a_file_cut_short_is_refused_or_read_whole(tmp_path, kind, keep):
    """A stack still being written or cut off in a copy: tifffile reads what it can of it (often only
    the first plane, as a 2D image; an OME-TIFF without its XML, which comes last, as every plane of
    every channel in one stack) and says so only in its log. Either the reader refuses it, or the
    data it returns is the whole stack (the cut fell after the pixels) with its voxel size."""
    shape = (2, 6, 20, 20) if kind == "ome_czyx" else (6, 20, 20)
    data = np.random.default_rng(1).integers(0, 4000, shape).astype(np.uint16)
    axes = "CZYX" if kind == "ome_czyx" else "ZYX"
    ome = dict(ome=True, metadata={"axes": axes, "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 0.5})
    options = {"imagej": dict(imagej=True, metadata={"axes": axes, "spacing": 0.5}, resolution=(5, 5)),
               "ome": ome, "ome_czyx": ome, "plain": {}, "zlib": dict(compression="zlib")}[kind]
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, data, **options)
    size = whole.stat().st_size
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[:size - 1 if keep == "all but 1 byte" else int(size * keep)])
    try:
        got = read_volume(cut, channel=1 if kind == "ome_czyx" else None)
    except UserError as exc:
        assert "incomplete or damaged" in str(exc) and "\n" not in str(exc)
    else:
        assert keep not in (0.3, 0.6) and np.array_equal(got.data, data[1] if kind == "ome_czyx" else data)
        assert got.voxel_size == read_volume(whole, channel=1 if kind == "ome_czyx" else None).voxel_size


@pytest.mark.parametrize("kind", ["ome", "imagej", "shaped"])
def test_a_file_copied_while_its_writer_is_still_writing_is_refused_or_read_whole(tmp_path, kind):
    """tifffile writes a stack's first page's tags, and an OME-TIFF's XML, only as it goes or when
    the file is closed; a copy taken before then must not read as nothing or as its first plane."""
    data = np.random.default_rng(2).integers(0, 4000, (8, 24, 24)).astype(np.uint16)
    path = tmp_path / "live.tif"
    with tifffile.TiffWriter(path, **{kind: True} if kind != "shaped" else {}) as writer:
        def planes():
            for i, plane in enumerate(data):
                if i == 4:
                    writer.filehandle.flush()
                    shutil.copy(path, tmp_path / "mid.tif")
                yield plane
        writer.write(planes(), shape=data.shape, dtype=data.dtype, metadata={"axes": "ZYX"})
        writer.filehandle.flush()
        shutil.copy(path, tmp_path / "unclosed.tif")
    with pytest.raises(UserError, match=r"mid.tif is incomplete or damaged \(no complete image in it yet\)"):
        read_volume(tmp_path / "mid.tif")
    try:
        got = read_volume(tmp_path / "unclosed.tif")
    except UserError as exc:
        assert kind == "ome" and "unclosed.tif is incomplete or damaged (its metadata is not written yet)" in str(exc)
    else:
        assert kind != "ome" and np.array_equal(got.data, data)
    assert np.array_equal(read_volume(path).data, data)


def test_scaled_voxel_size_divides_each_axis():
    assert scaled_voxel_size((1.0, None, 0.4), (2, 2, 4)) == (0.5, None, 0.1)


def test_four_d_with_unknown_axes_needs_axes_option(tmp_path):
    path = tmp_path / "four.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 8, 8), np.uint16), photometric="minisblack")
    with pytest.raises(UserError, match="--axes"):
        read_volume(path)
    vol = read_volume(path, axes="CZYX", channel=1)
    assert vol.data.shape == (3, 8, 8)


def test_axes_option_must_fit(tmp_path):
    path = tmp_path / "three.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint16), photometric="minisblack")
    with pytest.raises(UserError, match="does not fit"):
        read_volume(path, axes="CZYX")
    for axes, words in (("ZQX", "Q is not an axis letter"), ("ZZX", "names Z twice"),
                        ("YXZ", "leaves YXZ once a channel and a time point are picked")):
        with pytest.raises(UserError, match=words):
            read_volume(path, axes=axes)


def test_axes_that_read_a_file_otherwise_than_it_says_are_followed_with_a_warning(tmp_path):
    data = np.random.default_rng(0).integers(0, 999, (6, 2, 16, 16)).astype(np.uint16)
    path = tmp_path / "zcyx.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    own = read_volume(path, channel=1)
    assert np.array_equal(own.data, data[:, 1]) and axes_warning(own, path) is None
    assert axes_warning(read_volume(path, axes="ZCYX", channel=1), path) is None
    swapped = read_volume(path, axes="CZYX", channel=1)
    assert np.array_equal(swapped.data, data[1]) and "says its axes are ZCYX" in axes_warning(swapped, path)
    plain = tmp_path / "plain.tif"  # a file that does not say: no warning
    tifffile.imwrite(plain, data[:, 0])
    assert axes_warning(read_volume(plain, axes="ZYX"), plain) is None


def test_not_a_tiff_and_nan_are_refused(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("hello")
    with pytest.raises(UserError, match="not a readable TIFF"):
        read_volume(bad)
    nan = tmp_path / "nan.tif"
    arr = np.ones((3, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    tifffile.imwrite(nan, arr, photometric="minisblack")
    with pytest.raises(UserError, match="NaN/Inf"):
        read_volume(nan)


@pytest.mark.parametrize("unit", ["\u03bcm", "\u00b5m", "micrometre", "micron"])
def test_common_spellings_of_micrometre(tmp_path, unit):
    """Greek mu (U+03BC) and the micro sign (U+00B5) both occur in OME files; British spelling in ImageJ."""
    data = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    ome = tmp_path / "v.ome.tif"
    sizes = {f"PhysicalSize{a}": s for a, s in zip("ZYX", (0.5, 0.2, 0.1))}
    tifffile.imwrite(ome, data, ome=True, metadata={"axes": "ZYX", **sizes, **{f"{k}Unit": unit for k in sizes}})
    assert read_volume(ome).voxel_size == pytest.approx((0.5, 0.2, 0.1))
    if unit.isascii():  # ImageJ's description is ASCII (it escapes the micro sign, tested above)
        ij = tmp_path / "ij.tif"
        tifffile.imwrite(ij, data, imagej=True, resolution=(1 / 0.1, 1 / 0.2),  # (x, y) pixels per unit
                         metadata={"unit": unit, "spacing": 0.5, "axes": "ZYX"})
        assert read_volume(ij).voxel_size == pytest.approx((0.5, 0.2, 0.1))


def test_a_file_with_several_series_needs_series_and_reads_each_ones_voxel_size(tmp_path):
    path = tmp_path / "positions.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as w:
        for value, size in ((1, 0.5), (2, 0.25)):
            w.write(np.full((4, 16, 16), value, np.uint16),
                    metadata={"axes": "ZYX", "PhysicalSizeX": size, "PhysicalSizeY": size, "PhysicalSizeZ": 4 * size})
    with pytest.raises(UserError, match="--series N"):
        read_volume(path)
    for index, (value, size) in enumerate(((1, 0.5), (2, 0.25))):
        vol = read_volume(path, series=index)
        assert vol.data.mean() == value and vol.voxel_size == (4 * size, size, size)
    with pytest.raises(UserError, match="out of range"):
        read_volume(path, series=2)


def test_a_smaller_series_after_the_image_is_not_in_the_way(tmp_path):
    path = tmp_path / "with_preview.tif"
    with tifffile.TiffWriter(path) as w:
        w.write(np.ones((6, 32, 32), np.uint16))
        w.write(np.zeros((8, 8), np.uint16))  # a preview stored after the stack
    assert read_volume(path).data.shape == (6, 32, 32)
    thumb_first = tmp_path / "thumb_first.tif"
    with tifffile.TiffWriter(thumb_first) as w:
        w.write(np.zeros((8, 8), np.uint16))
        w.write(np.ones((6, 32, 32), np.uint16))
    with pytest.raises(UserError, match="--series N"):
        read_volume(thumb_first)
    assert read_volume(thumb_first, series=1).data.shape == (6, 32, 32)


def test_rgb_images_are_explained_and_read_as_channels(tmp_path):
    path = tmp_path / "rgb.tif"
    rgb = np.stack([np.full((16, 16), v, np.uint8) for v in (10, 20, 30)], axis=-1)
    tifffile.imwrite(path, rgb, photometric="rgb")
    with pytest.raises(UserError, match="--axes YXC --channel N$"):
        read_volume(path)
    planar = tmp_path / "short_stack.tif"
    tifffile.imwrite(planar, np.zeros((3, 16, 16), np.uint8), photometric="rgb", planarconfig="separate")
    with pytest.raises(UserError, match="--axes CYX --channel N; if it is a short z-stack saved that way, --axes ZYX"):
        read_volume(planar)
    assert read_volume(planar, axes="ZYX").data.shape == (3, 16, 16)
    assert read_volume(path, axes="YXC", channel=1).data.mean() == 20


@pytest.mark.parametrize("spacing", [-2.0, 0.0])
def test_a_voxel_size_that_is_not_positive_is_unknown(tmp_path, spacing):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.zeros((4, 16, 16), np.uint16), imagej=True, resolution=(2, 2),
                     metadata={"spacing": spacing, "unit": "um", "axes": "ZYX"})
    assert read_volume(path).voxel_size == (None, 0.5, 0.5)


def test_float16_is_read_as_float32(tmp_path):
    path = tmp_path / "half.tif"
    tifffile.imwrite(path, np.linspace(0, 1, 6 * 8 * 8, dtype=np.float16).reshape(6, 8, 8), photometric="minisblack")
    vol = read_volume(path)
    assert vol.dtype == np.float32 and vol.data.max() == 1.0


def test_a_file_that_declares_more_pixels_than_memory_holds_is_refused_before_reading(tmp_path, monkeypatch):
    import collections

    import psutil

    path = tmp_path / "bomb.tif"  # a few kB compressed: the header is what counts
    tifffile.imwrite(path, np.zeros((4, 256, 256), np.uint16), compression="zlib", photometric="minisblack")
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(400_000))  # less than its 512 kB
    with pytest.raises(UserError, match="more than the 0.0 GiB of memory free"):
        read_volume(path)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="POSIX pipes")
def test_a_pipe_is_refused_instead_of_read_forever(tmp_path):
    import os

    pipe = tmp_path / "pipe.tif"
    os.mkfifo(pipe)
    with pytest.raises(UserError, match="not a regular file"):
        read_volume(pipe)


def test_the_temporary_output_is_never_a_link_someone_planted(tmp_path):
    """In a folder others can write to, a link at a name they can predict must not be written through."""
    import os

    from sv_deploy.volume_io import atomic_output

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.chmod(victim, 0o600)
    out = tmp_path / "o.ome.tif"
    for guess in (f".o.ome.tif.partial-{os.getpid()}", f".o.ome.tif.partial-{os.getpid()}-0"):
        os.symlink(victim, tmp_path / guess)
    data = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    write_volume(out, [data], data.shape, np.uint16, "ZYX", (1.0, 1.0, 1.0))
    assert victim.read_text() == "keep me" and (victim.stat().st_mode & 0o777) == 0o600
    assert np.array_equal(read_volume(out).data, data) and not out.is_symlink()
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "x.tif") as tmp:
            assert tmp.is_file() and not tmp.is_symlink()
            raise RuntimeError("the writer failed")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == ["o.ome.tif", "victim.txt"]


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="POSIX owners and modes")
def test_files_others_can_write_are_told_apart(tmp_path):
    import os

    from sv_deploy.volume_io import written_only_by_me

    mine = tmp_path / "mine"
    mine.write_bytes(b"x")
    os.chmod(mine, 0o644)
    assert written_only_by_me(mine) and written_only_by_me(tmp_path / "absent")
    os.chmod(mine, 0o664)
    assert not written_only_by_me(mine)
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    assert not written_only_by_me(tmp_path / "link")


@pytest.mark.parametrize("options", [{}, dict(imagej=True, metadata={"axes": "ZYX", "spacing": 0.5, "unit": "um"},
                                              resolution=(10, 10))])
def test_a_stack_of_one_plane_is_an_image(tmp_path, options):
    """A single z-plane saved as a stack (1xYxX) is a 2D image: a 2D model enhances it, a 3D model
    calls it one, and its lateral voxel size is kept."""
    plane = np.random.default_rng(3).integers(0, 999, (24, 32)).astype(np.uint16)
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, plane[None], **options)
    vol = read_volume(path)
    assert vol.axes == "YX" and vol.data.shape == (1, 24, 32) and np.array_equal(vol.data[0], plane)
    assert vol.voxel_size == ((None, pytest.approx(0.1), pytest.approx(0.1)) if options else (None, None, None))


def test_valid_files_with_oddities_are_read_not_called_incomplete(tmp_path):
    """The checks for cut-short and half-written files must not refuse valid ones: a private tag
    an editing tool left pointing past the end, an empty description with a second series after
    the first; a compression this reader lacks is named as that, not as damage."""
    import struct

    data = np.random.default_rng(4).integers(0, 999, (8, 32, 32)).astype(np.uint16)
    private = tmp_path / "private.tif"
    tifffile.imwrite(private, data, extratags=[(65000, "s", 0, "x" * 100, True)])
    raw = bytearray(private.read_bytes())
    with tifffile.TiffFile(private) as tif:
        entry = tif.pages[0].tags[65000].offset
    struct.pack_into("<I", raw, entry + 8, len(raw) + 1000)  # the value's offset, past the end
    private.write_bytes(bytes(raw))
    assert np.array_equal(read_volume(private).data, data)
    for description in ("", " "):
        two = tmp_path / "two.tif"
        with tifffile.TiffWriter(two) as writer:
            writer.write(data, description=description, metadata=None, contiguous=True)
            writer.write(data[:3, :24, :24], metadata=None, contiguous=True, photometric="minisblack")
        assert np.array_equal(read_volume(two, series=0).data, data)
    packed = tmp_path / "packed.tif"
    tifffile.imwrite(packed, data, compression="zlib")
    raw = bytearray(packed.read_bytes())
    with tifffile.TiffFile(packed) as tif:
        entries = [page.tags[259].offset for page in tif.pages]
    for entry in entries:
        struct.pack_into("<H", raw, entry + 8, 34676)  # SGILOG: a codec this reader does not have
    packed.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="compressed in a way this reader cannot decode .*; save it uncompressed"):
        read_volume(packed)
