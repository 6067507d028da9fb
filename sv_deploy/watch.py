"""Watch a folder and hand over each new acquisition once it is completely written.

A file counts as complete when its size and modification time have not changed for `settle`
seconds: microscope software writes a stack over seconds to minutes, and reading it early would
give a truncated volume.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

TIFF_SUFFIXES = (".tif", ".tiff")
Stamp = Tuple[int, float]  # (size, mtime)


class SettleTracker:
    """Pure bookkeeping: which files have kept the same stamp for `settle` seconds."""

    def __init__(self, settle: float):
        self.settle = settle
        self._since: Dict[str, Tuple[Stamp, float]] = {}
        self.done: set = set()

    def ready(self, snapshot: Dict[str, Stamp], now: float) -> List[str]:
        out = []
        for path, stamp in sorted(snapshot.items()):
            if path in self.done:
                continue
            seen = self._since.get(path)
            if seen is None or seen[0] != stamp:
                self._since[path] = (stamp, now)
            elif now - seen[1] >= self.settle:
                out.append(path)
                self.done.add(path)
        for path in list(self._since):
            if path not in snapshot:
                del self._since[path]
        return out


def snapshot(folder: Path) -> Dict[str, Stamp]:
    stamps = {}
    for entry in os.scandir(folder):
        if entry.is_file() and entry.name.lower().endswith(TIFF_SUFFIXES) and not entry.name.startswith("."):
            st = entry.stat()
            stamps[entry.path] = (st.st_size, st.st_mtime)
    return stamps


def watch(folder: Path, handle: Callable[[str], None], settle: float = 2.0, poll: float = 0.5,
          idle_exit: Optional[float] = None, skip: Callable[[str], bool] = lambda p: False) -> None:
    """Call `handle(path)` for each completed TIFF in `folder`, oldest first, until Ctrl-C or idle."""
    tracker = SettleTracker(settle)
    last_activity = time.monotonic()
    while True:
        now = time.monotonic()
        stamps = snapshot(folder)
        if any(p not in tracker.done for p in stamps):
            last_activity = now
        for path in tracker.ready(stamps, now):
            if not skip(path):
                handle(path)
            last_activity = time.monotonic()
        if idle_exit is not None and time.monotonic() - last_activity >= idle_exit:
            return
        time.sleep(poll)
