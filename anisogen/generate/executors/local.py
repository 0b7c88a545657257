"""The local executor: DataLoader workers prepare, the main thread encodes on the device, a thread writes.

Pipeline per process::

    DataLoader workers            main thread                          writer thread
    read + validate + tokenise -> encode, align, cast (device)     -> wait for the host copy, tar, sha256,
                                  start the async host copy           fsync, rename, completion record
                                  submit (bounded queue)           <- records -> on_record (main thread)

``tasks`` are this process's pending tasks; for a streaming corpus ``tasks`` is ``None`` and a
:class:`StreamPlan` says how to cut the stream into tasks and which ones are this process's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..background import BackgroundWriter
from ..faults import OnEvent, no_event
from ..task import Task, TaskInputs, encode_task, prepare_records, prepare_task, write_task


@dataclass(frozen=True)
class StreamPlan:
    """How a streaming corpus becomes tasks: ``samples_per_shard`` rows each, task ``i`` belongs to
    process ``i % world``, and only tasks for which ``pending(i)`` is true are prepared."""

    samples_per_shard: int
    rank: int
    world: int
    pending: Callable[[int], bool]


class _TaskData(torch.utils.data.Dataset):
    """Map-style dataset over pending tasks; item = :class:`Prepared` (made in a DataLoader worker)."""

    def __init__(self, inputs: TaskInputs, tasks: list[Task]):
        self.inputs, self.tasks = inputs, tasks

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, i):
        return prepare_task(self.inputs, self.tasks[i])


class _StreamTaskData(torch.utils.data.IterableDataset):
    """Read a streaming corpus sequentially, cut it into tasks, prepare this process's pending ones.

    Yields :class:`Prepared` items and finally ``("end", num_rows)``.
    """

    def __init__(self, inputs: TaskInputs, plan: StreamPlan):
        self.inputs, self.plan = inputs, plan

    def __iter__(self) -> Iterator:
        sps, buf, n, index = self.plan.samples_per_shard, [], 0, 0
        for rec in self.inputs.corpus.records():
            n += 1
            buf.append(rec)
            if len(buf) == sps:
                yield from self._emit(index, buf)
                index, buf = index + 1, []
        if buf:
            yield from self._emit(index, buf)
        yield ("end", n)

    def _emit(self, index: int, recs: list):
        if index % self.plan.world == self.plan.rank and self.plan.pending(index):
            start = index * self.plan.samples_per_shard
            yield prepare_records(self.inputs, Task(index, start, start + len(recs)), iter(recs))


def _first(batch):
    return batch[0]


def _loader(inputs: TaskInputs, tasks: list[Task] | None, stream: StreamPlan | None, workers: int):
    if tasks is not None:
        ds: torch.utils.data.Dataset = _TaskData(inputs, tasks)
        workers = workers if tasks else 0
    else:
        ds, workers = _StreamTaskData(inputs, stream), min(workers, 1)
    return torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=_first, num_workers=workers,
                                       prefetch_factor=2 if workers else None)


def run_local(tasks: list[Task] | None, make_context: Callable, on_record: Callable[[dict], None], *,
              workers: int = 1, stream: StreamPlan | None = None, on_event: OnEvent = no_event,
              max_queued: int = 2) -> int | None:
    """Run ``tasks`` (or the tasks of ``stream``) in this process; ``on_record`` gets each completion record.

    Returns the number of input rows read for a streaming corpus, else ``None``.
    """
    if (tasks is None) == (stream is None):
        raise ValueError("give exactly one of tasks and stream")
    ctx = make_context()
    bg = BackgroundWriter(lambda enc: write_task(ctx.outputs, enc, on_event), max_queued=max_queued)
    total_rows = None
    try:
        for item in _loader(ctx.inputs, tasks, stream, workers):
            if isinstance(item, tuple):
                total_rows = int(item[1])
                continue
            bg.submit(encode_task(ctx.outputs, item))
            if bg.backlog >= 2:
                on_event("queued")
            for rec in bg.finished():
                on_record(rec)
        for rec in bg.close():
            on_record(rec)
    except BaseException:
        bg.abort()
        raise
    return total_rows
