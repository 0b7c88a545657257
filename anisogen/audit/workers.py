"""A distributor for per-task callables: in this process, or in a pool of spawned worker processes.

``TaskPool(workers)`` maps a picklable, module-level function over tasks and yields the results **in task
order** (so merging them is deterministic whatever the pool size). With ``workers <= 1`` everything runs
in the calling process; processes are started on first use only, with the ``spawn`` method (FAISS and
OpenMP are not fork-safe) and with their BLAS/OpenMP thread count set to ``cpus // workers`` so that the
pool does not oversubscribe the machine. This module imports nothing from the code that uses it.
"""

from __future__ import annotations

import multiprocessing
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(cap: int = 8) -> int:
    """The default pool size: one worker per available CPU, at most ``cap``."""
    return max(1, min(cap, available_cpus()))


@contextmanager
def _environment(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TaskPool:
    """``with TaskPool(workers) as pool: for result in pool.imap(fn, tasks): ...`` (results in task order).

    ``min_work``: an :meth:`imap` call whose ``work`` (any size measure the caller passes, e.g. rows) is
    below it runs in this process, because starting processes would cost more than it saves.
    """

    def __init__(self, workers: int = 1, *, min_work: int = 0):
        self.workers = max(1, int(workers))
        self.min_work = int(min_work)
        self._pool = None

    def __enter__(self) -> "TaskPool":
        return self

    @property
    def started(self) -> bool:
        """Whether worker processes are running."""
        return self._pool is not None

    def _start(self):
        """Start the worker processes on first use (a pool that is never used costs nothing)."""
        if self._pool is None and self.workers > 1:
            threads = str(max(1, available_cpus() // self.workers))
            with _environment({k: threads for k in _THREAD_VARS}):  # read by the children at start-up
                self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self._pool

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def imap(self, fn: Callable[[Any], Any], tasks: Iterable[Any], *, desc: str = "", unit: str = "task",
             progress: bool = False, work: int | None = None) -> Iterator[Any]:
        """``fn(task)`` for every task, yielded in task order, with a progress bar when ``progress``; in this
        process when ``work`` is below ``min_work``."""
        tasks = list(tasks)
        if self.workers <= 1 or len(tasks) <= 1 or (work is not None and work < self.min_work):
            results: Iterable[Any] = map(fn, tasks)
        else:
            results = self._start().imap(fn, tasks, chunksize=1)
        yield from tqdm(results, total=len(tasks), desc=desc, unit=unit, disable=not progress)
