"""The background writer: shard publishing off the main thread, with a bounded queue.

The main thread hands each encoded task to :meth:`BackgroundWriter.submit` and goes on encoding the next
one; a single writer thread runs ``write(item)`` (wait for the host copy, tar assembly, json, sha256,
fsync, rename, completion record) in submission order. Finished records come back to the main thread
through :meth:`BackgroundWriter.finished`, so ``on_record`` callbacks (progress, interim manifests) stay
single-threaded.

Why a thread and not a process pool: the writer's work is mostly hashing and file I/O, which release the
GIL, and a process would have to receive every embedding through a pipe. The queue bound (``max_queued``
tasks waiting besides the one being written) caps the host memory held by in-flight shards.

Guarantees are unchanged: the completion record is still the commit point, written after the tar is
renamed into place. A crash loses at most the queued and in-progress shards, which have no record, so a
resume redoes exactly those (``tests/test_generate_crash.py`` kills a run with queued shards).
An exception in the writer is re-raised in the main thread at the next ``submit``/``finished``/``close``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_STOP = object()


class BackgroundWriter:
    """Run ``write(item) -> record`` for submitted items in one background thread, in order."""

    def __init__(self, write: Callable[[Any], dict], *, max_queued: int = 2):
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self._write = write
        self._todo: queue.Queue = queue.Queue(maxsize=max_queued)
        self._done: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._pending = 0  # submitted, not yet returned by finished()
        self._thread = threading.Thread(target=self._run, name="anisogen-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is _STOP or self._abort.is_set():
                return
            try:
                self._done.put(self._write(item))
            except BaseException as exc:  # handed to the main thread
                self._error = exc
                self._abort.set()
                return

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def backlog(self) -> int:
        """Tasks submitted and not yet written (the one being written included)."""
        return self._pending - self._done.qsize()

    def submit(self, item: Any) -> None:
        """Queue ``item``; blocks while ``max_queued`` items are already waiting."""
        self._raise()
        while True:
            try:
                self._todo.put(item, timeout=0.1)
                break
            except queue.Full:
                self._raise()
                if not self._thread.is_alive():
                    raise RuntimeError("the background writer stopped")
        self._pending += 1

    def finished(self) -> list[dict]:
        """Records written since the last call (submission order)."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self._pending -= len(out)
        self._raise()
        return out

    def close(self) -> list[dict]:
        """Write everything queued, stop the thread, return the remaining records."""
        self._raise()
        self._todo.put(_STOP)
        self._thread.join()
        return self.finished()

    def abort(self) -> None:
        """Stop after the item being written; queued items are dropped (they have no record: redone on resume)."""
        self._abort.set()
        try:
            self._todo.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join()
