"""Overlap reading, computing and writing: the next tile is computed while the previous one is
written, and with several inputs the next file is read while the current one is enhanced.

The writer and the reader run in worker threads and the compute stays in the calling thread: torch
and ONNX Runtime keep their thread pools and buffers where they were first used (a compute thread of
its own cost about 130 MiB more peak memory, measured), and file reads and writes release the GIL.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, Generic, Hashable, Iterable, Iterator, List, Tuple, TypeVar

T = TypeVar("T")
_DONE = object()
_ABORT = object()


class Aborted(Exception):
    """Raised inside the consumer when the producer failed, so it can discard partial output."""


def write_behind(consumer: Callable[[Iterator[T]], None], items: Iterable[T], depth: int = 1) -> None:
    """Run `consumer(iterator)` in a worker thread, feeding it `items` at most `depth` ahead.

    An exception on either side stops both and re-raises here; the consumer sees `Aborted` when the
    producer failed (atomic writers then remove their temporary file).
    """
    q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
    errors: List[BaseException] = []
    stop = threading.Event()  # set when the caller gives up, even after it handed over every item

    def feed() -> Iterator[T]:
        while True:
            item = q.get()
            if item is _ABORT or (item is _DONE and stop.is_set()):
                raise Aborted()
            if item is _DONE:
                return
            yield item

    finished = threading.Event()  # not Thread.is_alive: an interrupted join() can leave it False early

    def work() -> None:
        try:
            consumer(feed())
        except BaseException as exc:  # handed back to the calling thread
            errors.append(exc)
        finally:
            finished.set()

    def put(item) -> None:
        while True:
            if errors:
                raise errors[0]
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    worker = threading.Thread(target=work, name="sv-deploy-writer", daemon=True)
    worker.start()
    try:
        for item in items:
            put(item)
        put(_DONE)
        # Ctrl-C while the writer finishes the last slabs lands here too, and must discard the
        # output as it would earlier (a complete-looking file after "not written" otherwise).
        finished.wait()
    except BaseException:
        stop.set()
        while not finished.is_set():
            try:
                q.put(_ABORT, timeout=0.1)
                break
            except queue.Full:
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
        finished.wait()
        raise
    if errors:
        raise errors[0]


K = TypeVar("K", bound=Hashable)


class ReadAhead(Generic[K, T]):
    """Read one input ahead in a worker thread: while file k is enhanced, file k+1 is read, so a
    batch from a slow share (an instrument PC's network drive) waits for no read between files.
    One read at most is ahead, so at most one more input is in memory; a read that fails raises
    when its file's turn comes (`take`), not before. With `version` (a file's size and mtime, say),
    what was read ahead is used only if the version is unchanged at its turn: a file rewritten in
    between (a watched acquisition written again) is read again."""

    def __init__(self, read: Callable[[K], T], version: Callable[[K], Hashable] = lambda key: None):
        self._read, self._version = read, version
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sv-deploy-reader")
        self._ahead: Dict[K, Tuple[Hashable, Future]] = {}

    def prefetch(self, key: K) -> None:
        if key not in self._ahead:  # an earlier one not taken is dropped
            self._ahead = {key: (self._version(key), self._pool.submit(self._read, key))}

    def take(self, key: K) -> T:
        """What was read ahead for `key` (its error raised here), or read it now."""
        version, future = self._ahead.pop(key, (None, None))
        if future is None or self._version(key) != version:
            return self._read(key)
        return future.result()

    def close(self) -> None:
        self._ahead = {}
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ReadAhead[K, T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
