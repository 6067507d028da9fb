"""Overlap computing and writing: the next slab is computed while the previous one is written.

The writer runs in a worker thread and the compute stays in the calling thread: torch and ONNX
Runtime keep their thread pools and buffers where they were first used (a compute thread of its own
cost about 130 MiB more peak memory, measured), and file writes release the GIL.
"""

from __future__ import annotations

import queue
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, List, TypeVar

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

    def feed() -> Iterator[T]:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if item is _ABORT:
                raise Aborted()
            yield item

    def work() -> None:
        try:
            consumer(feed())
        except BaseException as exc:  # handed back to the calling thread
            errors.append(exc)

    def put(item) -> None:
        while True:
            if errors:
                raise errors[0]
            try:
                with interrupts_held():
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
    except BaseException:
        while worker.is_alive():
            try:
                with interrupts_held():
                    q.put(_ABORT, timeout=0.1)
                break
            except queue.Full:
                try:
                    with interrupts_held():
                        q.get_nowait()
                except queue.Empty:
                    pass
        worker.join()
        raise
    worker.join()
    if errors:
        raise errors[0]


@contextmanager
def interrupts_held():
    """Hold Ctrl-C while inside the queue's locks and raise it right after.

    A KeyboardInterrupt raised between a lock's acquire and its `with` block leaves the lock held
    (CPython does not guarantee `__exit__` there), and the next put or get hangs both threads: an
    interrupted `infer` then never exited (the likely cause of a hang seen twice in the Ctrl-C test).
    Off the main thread, or when Ctrl-C is not Python's default KeyboardInterrupt, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: List[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt
