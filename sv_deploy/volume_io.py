"""Reading volumes (TIFF, ImageJ TIFF, OME-TIFF) and writing OME-TIFF without half-written files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import stat
import tempfile
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import tifffile

from .errors import NoRoom, UserError

_reading = threading.local()  # the complaints tifffile logs while this thread reads a file
# Signs in them that a file ends before its pages do or that its pages do not fill its own
# metadata: tifffile then reads what it can (often just the first plane) without raising.
INCOMPLETE_SIGNS = ("invalid page offset", "metadata invalid or corrupted", "failed to reshape")
# So is the value of a tag that decides the reading past the end of the file: OME-TIFF keeps its XML
# (ImageDescription, which says the axes) last, so a copy one byte short reads as a plain stack of
# every plane. Other tags (private, EXIF) left broken by an editing tool do not matter.
_READING_TAGS = {270, 273, 279, 324, 325, 50838, 50839}  # description, strips, tiles, ImageJ metadata
_VALUE_OFFSET = re.compile(r"TiffTag (\d+) @\d+> invalid value offset|invalid value offset \d+ for tag #(\d+)")


def _incomplete_sign(complaint: str) -> bool:
    found = _VALUE_OFFSET.search(complaint)
    if found:
        return int(found.group(1) or found.group(2)) in _READING_TAGS
    return any(s in complaint for s in INCOMPLETE_SIGNS)


class _Complaints(logging.Handler):
    """Keeps tifffile's complaints for the read that caused them (`read_volume` turns the signs of
    an incomplete file into its error) instead of printing them beside the one-line error."""

    def emit(self, record: logging.LogRecord) -> None:
        found = getattr(_reading, "complaints", None)
        if found is not None:
            found.append(record.getMessage())


_tifffile_log = logging.getLogger("tifffile")
_tifffile_log.setLevel(logging.ERROR)
_tifffile_log.addHandler(_Complaints())

VoxelSize = Tuple[Optional[float], Optional[float], Optional[float]]
UNKNOWN: VoxelSize = (None, None, None)
FLOAT32_MAX = float(np.finfo(np.float32).max)
BIGTIFF_BYTES = 2**31  # switch to BigTIFF well before classic TIFF's 4 GiB limit

_UNIT_TO_UM = {
    # micro sign (U+00B5) and Greek mu (U+03BC) both occur in the wild, as does ImageJ's escaped form
    "um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "micrometre": 1.0, "micrometers": 1.0, "micrometres": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "m": 1e6,
}


@dataclass(frozen=True)
class Volume:
    """A 3D (z, y, x) array; 2D images are stored with depth 1 and axes 'YX'."""

    data: np.ndarray
    axes: str  # 'ZYX' or 'YX': what the volume is, as written back
    voxel_size: VoxelSize  # micrometres, None where unknown
    source_axes: str = ""
    overridden_axes: str = ""  # the file's own axes, where --axes read it otherwise

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype


def _positive(value) -> Optional[float]:
    """A voxel size the output can carry (OME's PositiveFloat); 0, negative or unreadable is unknown."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _unit_factor(unit: Optional[str]) -> Optional[float]:
    if unit is None:
        return None
    return _UNIT_TO_UM.get(str(unit).strip().lower())


def _resolution_um(page, unit_factor: Optional[float]) -> Tuple[Optional[float], Optional[float]]:
    """TIFF resolution is pixels per unit; return (y, x) pixel size in micrometres."""
    sizes = []
    for tag in ("YResolution", "XResolution"):
        t = page.tags.get(tag)
        if t is None or unit_factor is None:
            sizes.append(None)
            continue
        num, den = t.value
        sizes.append(_positive(unit_factor * den / num) if num else None)
    return sizes[0], sizes[1]


def _ome_voxel_size(xml: str, index: int = 0) -> VoxelSize:
    """PhysicalSize of the index-th OME Image (series), in micrometres."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return UNKNOWN
    images = [el for el in root if el.tag.endswith("}Image") or el.tag == "Image"]
    image = images[index] if index < len(images) else root
    pixels = next((el for el in image.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return UNKNOWN
    out = []
    for ax in "ZYX":
        value = pixels.get(f"PhysicalSize{ax}")
        factor = _unit_factor(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
        out.append(_positive(value) * factor if _positive(value) and factor else None)
    return tuple(out)  # type: ignore


def _read_voxel_size(tif: tifffile.TiffFile, index: int, page) -> VoxelSize:
    if tif.is_ome and tif.ome_metadata:
        size = _ome_voxel_size(tif.ome_metadata, index)
        if any(s is not None for s in size):
            return size
    if tif.is_imagej and tif.imagej_metadata:
        meta = tif.imagej_metadata
        factor = _unit_factor(meta.get("unit"))
        y, x = _resolution_um(page, factor)
        z = _positive(meta.get("spacing"))
        return (z * factor if z and factor else None, y, x)
    unit = page.tags.get("ResolutionUnit")
    if unit is not None and int(unit.value) == 3:  # centimetre; inch values are mostly 72 dpi defaults
        y, x = _resolution_um(page, 1e4)
        return (None, y, x)
    return UNKNOWN


def _select(data: np.ndarray, axes: str, channel: Optional[int], time: Optional[int],
            given: str = "") -> Tuple[np.ndarray, str]:
    """Reduce any supported axes string to ZYX or YX by picking one channel / time point (`given`:
    the --axes they came from, if any)."""
    for name, index, option in (("C", channel, "--channel"), ("T", time, "--time")):
        if name not in axes:
            if index not in (None, 0):
                raise UserError(f"{option} {index} given but the image has no {name} axis (axes {axes})")
            continue
        pos = axes.index(name)
        size = data.shape[pos]
        if index is None:
            if size > 1:
                what = "channels" if name == "C" else "time points"
                stack = (f"; if they are the planes of a z-stack, read them as one with --axes {axes.replace(name, 'Z')}"
                         if "Z" not in axes and not given else "")
                raise UserError(f"the image has {size} {what} (axes {axes}); pick one with {option} N "
                                f"(0..{size - 1}){stack}")
            index = 0
        if not 0 <= index < size:
            raise UserError(f"{option} {index} is out of range: axis {name} has {size} entries (0..{size - 1})")
        data = np.take(data, index, axis=pos)
        axes = axes.replace(name, "")
    if axes not in ("ZYX", "YX") and given:
        raise UserError(f"--axes {given} leaves {axes} once a channel and a time point are picked; it must leave "
                        "ZYX (a z-stack) or YX (an image), e.g. --axes ZYX, CZYX or TZCYX")
    if axes not in ("ZYX", "YX"):
        raise UserError(
            f"cannot interpret axes '{axes}' (shape {data.shape}); give the file's axes with --axes, "
            f"e.g. {_axes_examples(data.ndim)}"
        )
    return data, axes


def _axes_examples(ndim: int) -> str:
    """--axes values that fit an array of `ndim` dimensions."""
    return {2: "--axes YX", 3: "--axes ZYX or CYX", 4: "--axes CZYX, ZCYX or TZYX",
            5: "--axes TZCYX or TCZYX"}.get(ndim, "--axes ZYX, CZYX or TZCYX")


def _guess_axes(tif_axes: str, ndim: int) -> str:
    """tifffile's axes, with the usual reading of a plain stack: one unknown leading axis is Z."""
    axes = tif_axes.upper()
    if ndim == 3 and axes[-2:] == "YX" and axes[0] in "QI":
        return "ZYX"
    if "S" in axes and not any(a in "QI" for a in axes):
        # RGB and other samples-per-pixel images: the samples are channels
        example = axes.replace("S", "C")
        stack = "; if it is a short z-stack saved that way, --axes ZYX" if axes == "SYX" else ""
        raise UserError(
            f"this image stores several samples per pixel (RGB; tifffile reads '{tif_axes}'): "
            f"pick one as a channel with --axes {example} --channel N{stack}"
        )
    if any(a in "QIS" for a in axes):
        raise UserError(
            f"the axes of this {ndim}D image are ambiguous (tifffile reads '{tif_axes}'); "
            f"say what they are with --axes, e.g. {_axes_examples(ndim)}"
        )
    return axes


def _pick_series(tif: tifffile.TiffFile, series: Optional[int], path: Path):
    """The series to read: the one asked for, or the first when it is clearly the main image (more
    voxels than any other, as with thumbnails or previews stored after it)."""
    found = tif.series
    if not found:
        raise UserError(f"{path} holds no image data; give a .tif/.tiff volume")
    shapes = ", ".join(f"{i}: {'x'.join(map(str, s.shape))} {s.axes}" for i, s in enumerate(found))
    if series is not None:
        if not 0 <= series < len(found):
            raise UserError(f"--series {series} is out of range: {path} holds {len(found)} series ({shapes})")
        return series, found[series]
    sizes = [int(np.prod(s.shape)) for s in found]
    if len(found) > 1 and any(n >= sizes[0] for n in sizes[1:]):
        raise UserError(
            f"{path} holds {len(found)} image series (positions or views: {shapes}); pick one with --series N"
        )
    return 0, found[0]


def _check_complete(path: Path, series, complaints: Sequence[str]) -> None:
    """Refuse a file that ends before its data does, or whose pages fall short of its metadata: a
    stack still being written, or cut off in a copy, would otherwise read as its first planes."""
    signs = [c.split("> ")[-1].removesuffix("')") for c in complaints if _incomplete_sign(c)]
    sign = f"tifffile: {signs[0]}" if signs else None
    if sign is None and series is not None and (not series.shape or not series.size):
        sign = "no complete image in it yet"  # its first page's tags are not written yet
    elif sign is None and series is not None and _metadata_pending(path, series):
        sign = "its metadata is not written yet"
    if sign is None and series is not None:
        if series.dataoffset is not None:  # contiguous data: one block
            ends = [series.dataoffset + series.nbytes]
        else:
            ends = [o + n for page in series.pages if page is not None
                    for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        size = path.stat().st_size
        if ends and max(ends) > size:
            sign = f"its data runs to byte {max(ends)} of a {size}-byte file"
    if sign is not None:
        raise UserError(f"{path} is incomplete or damaged ({sign}); if it is still being "
                        "written, wait until it is complete, else copy or export it again")


def _metadata_pending(path: Path, series) -> bool:
    """tifffile's OME-TIFF writer before the file is closed: one page, its description the null bytes
    reserved for the XML written at the end, and more pixels in the file than that page: it would
    read as its first plane."""
    page = series.pages[0] if len(series.pages) == 1 else None
    tag = page.tags.get(270) if page is not None else None
    software = page.tags.get(305) if page is not None else None
    if (tag is None or tag.count != 4 or tag.value.strip("\0") or software is None
            or not str(software.value).startswith("tifffile")):
        return False
    unread = path.stat().st_size - (series.dataoffset or 0) - series.nbytes
    return series.dataoffset is not None and unread >= page.nbytes


def _check_fits_memory(path: Path, series) -> None:
    """Refuse a series that would not fit in memory before decompressing it: a compressed file of a
    few kB can declare tens of GB (and reading it would end as a bare out-of-memory)."""
    import psutil

    declared, free = int(series.nbytes), int(psutil.virtual_memory().available)
    if declared > free:
        raise UserError(f"{path} holds {declared / 2**30:.1f} GiB of pixels (as its header declares), more than the "
                        f"{free / 2**30:.1f} GiB of memory free; crop it or read it on a machine with more memory")


def read_volume(
    path: os.PathLike | str,
    axes: Optional[str] = None,
    channel: Optional[int] = None,
    time: Optional[int] = None,
    series: Optional[int] = None,
) -> Volume:
    """The ZYX (or YX) volume of one series, channel and time point, with its voxel size in micrometres.

    float16 is read as float32: OME-TIFF, the output, has no 16-bit float type.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a TIFF file")
    if not path.is_file():  # a pipe or a device would block or never end
        raise UserError(f"{path} is not a regular file; give a TIFF file")
    _reading.complaints = complaints = []
    decoding = False
    try:
        with tifffile.TiffFile(path) as tif:
            index, chosen = _pick_series(tif, series, path)
            _check_complete(path, chosen, complaints)
            _check_fits_memory(path, chosen)
            decoding = True
            data = chosen.asarray()
            decoding = False
            tif_axes = chosen.axes
            voxel = _read_voxel_size(tif, index, chosen.keyframe)
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except (UserError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile's and its codecs' errors on damaged data have no common base
        _check_complete(path, None, complaints)
        if decoding and ("not supported" in str(exc) or "imagecodecs" in str(exc)):
            raise UserError(f"{path} is compressed in a way this reader cannot decode ({exc}); save it "
                            "uncompressed or with zlib or LZW compression") from None
        if decoding:  # a TIFF whose pixels do not decode: damaged, not the wrong kind of file
            raise UserError(f"{path} is damaged: its pixels cannot be decoded ({exc}); copy or export it again") from None
        raise UserError(f"{path} is not a readable TIFF file ({exc}); give a .tif/.tiff volume") from None
    finally:
        _reading.complaints = None
    declared = "" if any(a in "QIS" for a in tif_axes.upper()) else tif_axes.upper()  # what the file itself says
    try:
        given = _check_axes_option(axes.upper(), data.shape) if axes is not None else ""
        axes = source_axes = given or _guess_axes(tif_axes, data.ndim)
        data, axes = _select(data, axes, channel, time, given)
    except UserError as exc:  # which file: evaluate and batches read several
        raise UserError(f"{path}: {exc}") from None
    if axes == "ZYX" and data.shape[0] == 1:  # one plane is an image, whatever the file calls it
        data, axes = data[0], "YX"
    if data.dtype.kind not in "uif" or data.dtype.itemsize > 8:
        raise UserError(f"{path}: pixel type {data.dtype} is not supported; use integer or float images")
    if data.dtype == np.float16:
        data = data.astype(np.float32)
    if axes == "YX":
        data = data[None]
        voxel = (None, voxel[1], voxel[2])
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise UserError(
                f"{path} contains {int(bad.sum())} NaN/Inf voxels; replace them (e.g. with 0) and try again"
            )
        top = max(float(data.max()), -float(data.min())) if data.dtype.itemsize == 8 else 0.0
        if top > FLOAT32_MAX:  # the network computes in 32-bit floats: these would become Inf
            raise UserError(f"{path} holds values up to {top:.3g}, beyond what 32-bit floats hold "
                            f"({FLOAT32_MAX:.3g}); rescale it (divide by a constant) and try again")
    return Volume(np.ascontiguousarray(data), axes, voxel, source_axes,
                  declared if given and declared and declared != given else "")


def _check_axes_option(axes: str, shape: Tuple[int, ...]) -> str:
    unknown = sorted(set(axes) - set("TZCYX"))
    twice = sorted({a for a in axes if axes.count(a) > 1})
    if unknown or twice:
        what = (f"{', '.join(unknown)} {'is not an axis letter' if len(unknown) == 1 else 'are not axis letters'}"
                if unknown else f"it names {', '.join(twice)} twice")
        raise UserError(f"--axes {axes}: {what}; use each of T, Z, C, Y, X at most once, e.g. ZYX, CZYX or TZCYX")
    if len(axes) != len(shape):
        raise UserError(f"--axes {axes} does not fit the image: it has {len(shape)} axes (shape {shape}), not "
                        f"{len(axes)}; give one letter per axis")
    return axes


def axes_warning(vol: Volume, path) -> Optional[str]:
    """What to tell a user whose --axes reads a file otherwise than its own metadata does."""
    if not vol.overridden_axes:
        return None
    return (f"warning: {path} says its axes are {vol.overridden_axes}; read as {vol.source_axes} as --axes asks "
            "(drop --axes to follow the file)")


def check_not_constant(volume: Volume, name: str, why: str = "there is no structure to enhance") -> None:
    lo, hi = volume.data.min(), volume.data.max()
    if lo == hi:
        raise UserError(f"{name} is constant (every voxel is {lo}); {why}")


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


TEMP_NAME_EXTRA = 32  # what `atomic_output` adds to a name (".", ".partial-", pid, "-", random part)


def check_output_path(path: os.PathLike | str, overwrite: bool) -> Path:
    """Refuse, before any work, an output that could not be written where it is named."""
    path = Path(path)
    if path.is_dir():  # --overwrite would not help
        raise UserError(f"{path} is a directory; give a file name for the output")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another name or pass --overwrite")
    if not path.parent.exists():
        raise UserError(f"the folder {path.parent} does not exist; create it first")
    check_output_folder(path.parent)
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # not on every system (Windows: 255 characters)
        limit = 255
    if len(os.fsencode(path.name)) + TEMP_NAME_EXTRA > limit:
        raise UserError(f"the file name {path.name[:40]}... is too long for this file system (with the temporary "
                        f"name it is written under first, at most {limit - TEMP_NAME_EXTRA} bytes); shorten it")
    return path


def check_output_folder(path: os.PathLike | str) -> Path:
    """An output folder that exists or can be made: its nearest existing ancestor must be a folder
    this user can write in (else the failure would come after all the work, naming a temporary file)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        inside = "" if existing == path else f", so {path} cannot be made in it"
        raise UserError(f"{existing} is a file, not a folder{inside}; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {existing} (permission denied); choose another folder")
    return path


def _no_room(exc: OSError) -> Optional[str]:
    """What stopped a write the disk could not hold (full, a quota, a file-size limit), or None."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return exc.strerror
    if exc.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(exc)):  # numpy's short write
        return "the disk took only part of it: it is full, or a limit on file size was met"
    return None


@contextlib.contextmanager
def atomic_output(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary name beside `path`; rename onto it only if the block finishes.

    The file gets the usual permissions for new files (0666 less the umask): some writers
    (safetensors) create theirs private, and a model on a shared microscope PC must be readable
    by the other accounts as an image is."""
    path = Path(path)
    # Created here, exclusively and under a name no one can guess: in a folder others can write to
    # (a shared microscope PC), a link planted at a predictable name would have been written through.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:  # on the file itself, not whatever its name might point to by now
            os.fchmod(fd, 0o666 & ~_UMASK) if hasattr(os, "fchmod") else os.chmod(tmp, 0o666 & ~_UMASK)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        why = _no_room(exc)
        if why:  # else it names no file, or only the temporary one
            raise NoRoom(f"{path} could not be written ({why}); free space on that disk or write it to "
                         "another disk") from None
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a share gone away: the error that got us here is the one to report
            pass


def written_only_by_me(path: Path) -> bool:
    """Whether only this user can have written `path` (absent counts: it would be created so).

    For files whose content runs or decides what runs (the export cache, a TensorRT timing cache):
    their digests can be recomputed by anyone, so a file or folder others can write to is not
    trusted."""
    if not hasattr(os, "getuid"):  # Windows: per-user profile folders
        return True
    try:
        st = Path(path).lstat()
    except (FileNotFoundError, NotADirectoryError):  # under a file: it cannot be made, so nothing to trust
        return True
    return st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode) and not st.st_mode & 0o022


def _read_umask() -> int:
    """Read once, at import: setting and restoring it later could race with threads creating files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _ome_options(shape: Tuple[int, int, int], dtype: np.dtype, axes: str, voxel_size: VoxelSize) -> dict:
    """tifffile.imwrite options of our outputs: uncompressed OME-TIFF (BigTIFF when large) with
    the voxel size in the OME metadata and the TIFF resolution tags."""
    metadata = {"axes": axes}
    for ax, size in zip("ZYX", voxel_size):
        if size is not None and (ax in axes):
            metadata[f"PhysicalSize{ax}"] = float(size)
            metadata[f"PhysicalSize{ax}Unit"] = "µm"
    extra = {}
    if voxel_size[1] and voxel_size[2]:
        extra = dict(resolution=(1e4 / voxel_size[2], 1e4 / voxel_size[1]), resolutionunit="CENTIMETER")
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return dict(shape=shape if axes == "ZYX" else shape[1:], dtype=np.dtype(dtype), bigtiff=nbytes > BIGTIFF_BYTES,
                ome=True, photometric="minisblack", metadata=metadata, **extra)


def write_volume(
    path: os.PathLike | str,
    slabs: Iterable[np.ndarray],
    shape: Tuple[int, int, int],
    dtype: np.dtype,
    axes: str,
    voxel_size: VoxelSize,
) -> None:
    """Stream z-slabs into an OME-TIFF (BigTIFF when large) under a temporary name, then rename."""
    dtype = np.dtype(dtype)

    def pages() -> Iterator[np.ndarray]:
        for slab in slabs:
            yield from np.asarray(slab, dtype=dtype)

    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, pages(), **_ome_options(shape, dtype, axes, voxel_size))


class RegionWriter:
    """Writes any box of a volume into an uncompressed OME-TIFF whose planes lie at known offsets,
    so tiles can land in any order and no z-slab of the output is ever assembled in memory."""

    def __init__(self, file, plane_offsets: Sequence[int], shape: Tuple[int, int, int], dtype: np.dtype):
        self._file, self._offsets = file, list(plane_offsets)
        self.shape, self.dtype = shape, np.dtype(dtype)

    def write(self, start: Tuple[int, int, int], block: np.ndarray) -> None:
        """Put `block` (z, y, x) at voxel `start`: one write per plane when it spans whole rows, else
        one per row."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        (z0, y0, x0), width = start, self.shape[2]
        if any(s < 0 or s + n > m for s, n, m in zip(start, block.shape, self.shape)):
            raise ValueError(f"region {start} + {block.shape} lies outside the volume {self.shape}")
        item = self.dtype.itemsize
        for dz, plane in enumerate(block):
            base = self._offsets[z0 + dz]
            if block.shape[2] == width:
                self._file.seek(base + y0 * width * item)
                self._file.write(plane.data)
                continue
            for dy, row in enumerate(plane):
                self._file.seek(base + ((y0 + dy) * width + x0) * item)
                self._file.write(row.data)


@contextlib.contextmanager
def volume_output(path: os.PathLike | str, shape: Tuple[int, int, int], dtype: np.dtype, axes: str,
                  voxel_size: VoxelSize) -> Iterator[RegionWriter]:
    """An OME-TIFF laid out first (its data space left sparse), then filled region by region under
    a temporary name, renamed onto `path` only once the block finishes: the same file as
    `write_volume` writes, but nothing needs holding in memory in page order."""
    dtype = np.dtype(dtype)
    path = Path(path)
    needed = int(np.prod(shape)) * dtype.itemsize + 2**20  # the data, and room for headers and the rest
    free = _free_disk(path.parent)
    if free is not None and free < needed:
        # an output being replaced stays on the disk until the rename: its space does not count
        replacing = " (the file it replaces stays until the new one is complete)" if path.is_file() else ""
        raise UserError(f"not enough disk space for {path}: it needs {_size(needed)}, {_size(free)} "
                        f"are free{replacing}; free some or write elsewhere")
    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, **_ome_options(shape, dtype, axes, voxel_size))
        with tifffile.TiffFile(tmp) as tif:
            layout = [(page.dataoffsets, page.databytecounts) for page in tif.pages]
        plane_bytes = shape[1] * shape[2] * dtype.itemsize
        if len(layout) != shape[0] or not all(_one_run(o, c, plane_bytes) for o, c in layout):
            raise RuntimeError(f"tifffile laid out {tmp} in an unexpected way ({len(layout)} pages)")
        with open(tmp, "r+b") as f:
            yield RegionWriter(f, [o[0] for o, _ in layout], shape, dtype)


def _one_run(offsets: Sequence[int], counts: Sequence[int], size: int) -> bool:
    """Whether a page's strips follow one another, `size` bytes in all (so a plane is one array)."""
    return sum(counts) == size and all(a + n == b for a, n, b in zip(offsets, counts, offsets[1:]))


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _free_disk(folder: Path) -> Optional[int]:
    import shutil

    try:
        return shutil.disk_usage(folder if str(folder) else ".").free
    except OSError:
        return None


def scaled_voxel_size(voxel: VoxelSize, factors: Tuple[int, int, int]) -> VoxelSize:
    return tuple(None if v is None else v / f for v, f in zip(voxel, factors))  # type: ignore
