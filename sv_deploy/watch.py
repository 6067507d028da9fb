"""Watch a folder and hand over each new acquisition once it is completely written.

A file counts as complete when its size and modification time have not changed for `settle`
seconds: microscope software writes a stack over seconds to minutes, and reading it early would
give a truncated volume. A writer can still pause for longer than that, so a file is handed over
again whenever it changes after it was handed over (a read that failed on a half-written file is
retried once the file is complete, and `infer` replaces an output it made of the shorter stack).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

TIFF_SUFFIXES = (".tif", ".tiff")
Stamp = Tuple[int, float]  # (size, mtime)


class SettleTracker:
    """Pure bookkeeping: which files have kept the same stamp for `settle` seconds since they were
    last handed over (or first seen)."""

    def __init__(self, settle: float):
        self.settle = settle
        self._since: Dict[str, Tuple[Stamp, float]] = {}
        self.done: Dict[str, Stamp] = {}  # path -> its stamp when handed over

    def pending(self, snapshot: Dict[str, Stamp]) -> bool:
        return any(self.done.get(p) != stamp for p, stamp in snapshot.items())

    def ready(self, snapshot: Dict[str, Stamp], now: float) -> List[str]:
        out = []
        for path, stamp in sorted(snapshot.items()):
            if self.done.get(path) == stamp:
                continue
            seen = self._since.get(path)
            if seen is None or seen[0] != stamp:
                self._since[path] = (stamp, now)
            elif now - seen[1] >= self.settle:
                out.append(path)
                self.done[path] = stamp
        for path in list(self._since):
            if path not in snapshot:
                del self._since[path]
        return out


def snapshot(folder: Path) -> Dict[str, Stamp]:
    """(size, mtime) of each TIFF in folder; files that vanish while it is listed are left out."""
    stamps = {}
    for entry in os.scandir(folder):
        if entry.name.lower().endswith(TIFF_SUFFIXES) and not entry.name.startswith("."):
            try:
                if entry.is_file():
                    st = entry.stat()
                    stamps[entry.path] = (st.st_size, st.st_mtime)
            except FileNotFoundError:
                continue
    return stamps


def watch(folder: Path, handle: Callable[[str, Optional[str]], None], settle: float = 2.0, poll: float = 0.5,
          idle_exit: Optional[float] = None, skip: Callable[[str], bool] = lambda p: False,
          log: Callable[[str], None] = print) -> None:
    """Call `handle(path, upcoming)` for each completed TIFF in `folder`, in name order, until
    Ctrl-C or idle; `upcoming` is the next file already complete, if any (to read it ahead).

    A folder that cannot be listed (a network share gone away) is waited for, not fatal."""
    tracker = SettleTracker(settle)
    last_activity = time.monotonic()
    unreachable = False
    while True:
        now = time.monotonic()
        try:
            stamps = snapshot(folder)
        except OSError as exc:
            if not unreachable:
                log(f"warning: cannot list {folder} ({exc.strerror or exc}); waiting for it to come back")
            unreachable = True
            stamps = {}
        else:
            if unreachable:
                log(f"{folder} is back; watching again")
            unreachable = False
        if tracker.pending(stamps):
            last_activity = now
        ready = tracker.ready(stamps, now)
        todo = [p for p in ready if not skip(p)]
        for path, upcoming in zip(todo, [*todo[1:], None]):
            handle(path, upcoming)  # several landed at once: the next is read while this one is enhanced
        if ready:
            last_activity = time.monotonic()
        if idle_exit is not None and time.monotonic() - last_activity >= idle_exit:
            return
        time.sleep(poll)
