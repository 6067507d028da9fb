"""A per-user cache of ONNX exports, so a .svmodel runs on ONNX Runtime without re-exporting each call.

ONNX Runtime is the faster CPU path on many CPUs (`cpu_choice`), but exporting costs seconds; the export
is written once under the cache folder, named by the model's checksum, the versions that made it
and a digest of the code that writes the graph (so an edited or upgraded install never reuses an
older graph under an unchanged version string), and checked against that checksum and its own
digest when read back. The cache is only a speed-up: when it cannot be written the export stays in
memory.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import onnx
import torch

from . import __version__, onnx_graph
from .volume_io import written_only_by_me

ENV = "SV_DEPLOY_CACHE"
KEEP_ENTRIES = 32  # exports kept, the most recently used; each is a few MB and quick to remake


def cache_dir() -> Path:
    """$SV_DEPLOY_CACHE, else $XDG_CACHE_HOME/sv-deploy, else ~/.cache/sv-deploy."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sv-deploy"


# The modules whose code decides the exported graph: the network, its folding, the interpolation
# weights, the export and its graph surgery, the pixel-shuffle node.
EXPORT_MODULES = ("model.py", "geometry.py", "resize.py", "export.py", "onnx_graph.py", "shuffle_op.py")


def code_digest(paths: Iterable[Path]) -> str:
    """sha256 over the files' names and bytes, in the given order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=1)
def export_code_digest() -> str:
    here = Path(__file__).resolve().parent
    return code_digest(here / name for name in EXPORT_MODULES)


def cache_path(sha256: str, folder: Optional[Path] = None, folded: bool = False) -> Path:
    torch_version = torch.__version__.split("+")[0]
    kind = "-ensemble" if folded else ""
    name = f"{sha256[:32]}{kind}-sv{__version__}-{export_code_digest()[:12]}-torch{torch_version}.onnx"
    return (folder or cache_dir()) / "onnx" / name


def _matches(path: Path, sha256: str, folded: bool) -> Optional[onnx.ModelProto]:
    try:
        model = onnx.load(str(path))
        meta = onnx_graph.verify(model)  # an edited entry fails its digest and is rebuilt
    except Exception:  # noqa: BLE001 - a damaged cache entry is simply rebuilt
        return None
    same = meta.get("source_sha256") == sha256 and (meta.get("folded_ensemble") == "1") == folded
    return model if same else None


def cached_export(config, stages, sha256: str, log: Callable[[str], None] = print, folded: bool = False) -> onnx.ModelProto:
    """The model's fp32 ONNX export (with the self-ensemble folded in when `folded`), from the
    cache when a matching entry exists."""
    from .export import save_onnx, to_onnx

    path = cache_path(sha256, folded=folded)
    if not written_only_by_me(path.parent):
        log(f"not using the export cache {path.parent}: other users can write to it (what it holds is what "
            f"infer would run); set {ENV} to a folder of your own")
        return to_onnx(config, stages, sha256, folded_ensemble=folded)
    if path.is_file() and not written_only_by_me(path):
        log(f"cached export {path} is not a plain file of your own; exporting again")
        try:
            path.unlink()
        except OSError:
            return to_onnx(config, stages, sha256, folded_ensemble=folded)
    if path.is_file():
        model = _matches(path, sha256, folded)
        if model is not None:
            _touch(path)
            return model
        log(f"cached export {path} does not match the model; exporting again")
    log("exporting the model to ONNX once for ONNX Runtime")
    model = to_onnx(config, stages, sha256, folded_ensemble=folded)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_onnx(model, path)
        log(f"cached the export at {path} (set {ENV} to move it)")
        for old in least_recently_used(path.parent.glob("*.onnx"), KEEP_ENTRIES):
            old.unlink(missing_ok=True)
    except OSError as exc:
        log(f"could not cache the export ({exc.strerror or exc}); it stays in memory for this run")
    return model


def least_recently_used(entries: Iterable[Path], keep: int) -> List[Path]:
    """The entries beyond the `keep` most recently used (by modification time: a hit touches it)."""
    stamped = []
    for entry in entries:
        try:
            stamped.append((entry.stat().st_mtime, entry))
        except OSError:  # removed meanwhile by another run
            continue
    return [entry for _, entry in sorted(stamped, reverse=True)[keep:]]


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves
        pass
