"""The generator's one test seam: ``on_event(name)`` callbacks, and the SIGKILL injector built on it.

Task code never reads globals or the environment to decide whether to crash: it calls the ``on_event``
it was given at each point below. :func:`anisogen.generate.generate` takes ``on_event=``; when none is
given it installs :meth:`FaultInjector.from_env` (``ANISOGEN_FAULT``), which is inactive unless the
variable is set, so crash tests can also drive a real ``accelerate launch``.

Events, in the order a shard meets them:

``fit_chunk``      a fit-sample chunk was saved (main thread of every rank)
``queued``         a shard was handed to the background writer while another one is still waiting for it
                   (main thread): the writer has queued shards
``sample``         one sample was appended to a shard's temp tar (writer thread)
``before_rename``  the temp tar is complete and fsynced, not yet renamed (writer thread)
``after_rename``   the tar is published, its completion record not yet written (writer thread)
``after_record``   the record (the commit point) is written (writer thread)
"""

from __future__ import annotations

import os
import signal
from typing import Callable

OnEvent = Callable[[str], None]

FAULT_ENV = "ANISOGEN_FAULT"
FAULT_POINTS = ("mid_tar", "before_rename", "after_rename", "after_record", "fit_chunk", "queued")


def no_event(event: str) -> None:
    """The default ``on_event``: does nothing."""


class FaultInjector:
    """``on_event`` that SIGKILLs this process at the N-th occurrence of a point: spec ``"POINT:N[:RANK]"``.

    POINT is an event above or ``mid_tar`` (after the 2nd sample of a shard's temp tar); with RANK only the
    process of that global rank (``RANK`` env) dies. An empty spec gives an injector that does nothing.
    """

    def __init__(self, spec: str = "", *, rank: int | None = None):
        self.point, self.n, self.counts, self._samples = None, 0, {}, 0
        if not spec:
            return
        parts = spec.split(":")
        if parts[0] not in FAULT_POINTS or len(parts) not in (2, 3):
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected POINT:N[:RANK] with POINT in {FAULT_POINTS}")
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        if len(parts) == 3 and int(parts[2]) != rank:
            return
        self.point, self.n = parts[0], int(parts[1])

    @classmethod
    def from_env(cls) -> "FaultInjector":
        return cls(os.environ.get(FAULT_ENV, ""))

    @property
    def active(self) -> bool:
        return self.point is not None

    def __call__(self, event: str) -> None:
        if self.point is None:
            return
        if event == "sample":
            self._samples += 1
            event = "mid_tar" if self._samples == 2 else event
        elif event == "before_rename":
            self._samples = 0
        if event != self.point:
            return
        self.counts[event] = self.counts.get(event, 0) + 1
        if self.counts[event] == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
