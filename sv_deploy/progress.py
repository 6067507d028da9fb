"""Progress for long work: a tqdm bar on a terminal, a plain line now and then in a log file.

Runs started from a script or a scheduler write stderr to a file, where a bar is either hidden
(tqdm's default off a terminal) or a stream of carriage returns; a line every half minute says
the same and reads well in a log.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

from tqdm import tqdm

LOG_EVERY_S = 30.0


def progress_bar(total: float, desc: str, unit: str, enabled: bool = True, **tqdm_options):
    """An object with tqdm's update / set_postfix / close, whichever fits where stderr goes."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, **tqdm_options)
    return LogProgress(total, desc, unit)


class LogProgress:
    """tqdm's small interface as one line per `every` seconds: 'enhance: 40% ..., ETA 18 s'."""

    def __init__(self, total: float, desc: str, unit: str, every: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic, write: Optional[Callable[[str], None]] = None):
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.n = 0.0
        self.postfix = ""
        self.start = self._last = clock()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            self.write(self.line(now))

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = self.n / self.total if self.total else 1.0
        eta = f", ETA {elapsed * (1 - done) / done:.0f} s" if 0 < done < 1 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {100 * done:.0f}% ({elapsed:.0f} s{eta}{extra})"

    def close(self) -> None:
        pass
