"""Work units and the per-shard task function shared by every executor.

Task ``i`` covers input rows ``[i * samples_per_shard, (i + 1) * samples_per_shard)`` and produces
``shard-{i:06d}.tar``. Its output depends only on those rows and the fingerprinted config, never on which
process runs it, so any executor (accelerate ranks, Slurm array jobs, Ray tasks) produces the same bytes.

The task function has three steps, so each can run where it is cheapest:

* :func:`prepare_task` (DataLoader worker): read rows, parse/validate, drop duplicates, tokenise;
* :func:`encode_task` (main thread, on the encoder's device): encode, align with the aligner's device
  transform, cast to the storage dtype, and start one asynchronous device-to-host copy;
* :func:`write_task` (background writer thread): wait for the copy, write the shard atomically, write the
  completion record (the commit point).

:func:`run_task` chains the three in one thread (the Ray executor and tests). Every step reports its
crash-test points through the ``on_event`` callback it is given (:mod:`.faults`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..encode.corpus import Corpus, Record, Reject
from ..encode.text import ClipTokenizer, EncodeStats, TextEncoder, Tokenized
from ..shards import writer
from ..shards.device import encode_embedding_torch, host_view
from .faults import OnEvent, no_event
from .transfer import HostCopies, PendingCopy


@dataclass(frozen=True)
class Task:
    """Task ``index`` over input rows ``[start, stop)``."""

    index: int
    start: int
    stop: int


def plan_tasks(num_rows: int, samples_per_shard: int) -> list[Task]:
    """All tasks of a corpus of ``num_rows`` input rows (the last one may be short; none if empty)."""
    return [Task(i, a, min(a + samples_per_shard, num_rows))
            for i, a in enumerate(range(0, num_rows, samples_per_shard))]


def assign(tasks: Sequence[Task], rank: int, world: int) -> list[Task]:
    """Tasks of process ``rank`` out of ``world``: every ``world``-th task starting at ``rank``."""
    return list(tasks[rank::world])


@dataclass
class Prepared:
    """A task after the CPU half, in columns (cheap to pass from a DataLoader worker): the valid records'
    texts, source ids and global rows, their tokens, the rejects and timings."""

    task: Task
    texts: list[str]
    ids: list[str]
    rows: np.ndarray
    tokens: Tokenized
    rejects: list[Reject]
    read_s: float = 0.0
    tokenize_s: float = 0.0


@dataclass
class TaskInputs:
    """What the CPU half needs (picklable; handed to DataLoader workers)."""

    corpus: Corpus
    tokenizer: ClipTokenizer
    duplicates: dict[int, int] = field(default_factory=dict)


@dataclass
class TaskOutputs:
    """What the device and writer steps need (lives in the main process).

    ``transform`` is the aligner's device transform (:meth:`anisogen.align.Aligner.device_transform`) on
    the encoder's device; built from ``aligner`` when not given.
    """

    out_dir: str
    encoder: TextEncoder
    aligner: Any
    model_fingerprint: str
    dtype: str = "fp16"
    keep_source: bool = False
    transform: Any = None
    copies: HostCopies | None = None

    def __post_init__(self) -> None:
        if self.transform is None:
            self.transform = self.aligner.device_transform(self.encoder.device)
        if self.copies is None:
            self.copies = HostCopies(self.encoder.device)


@dataclass
class Encoded:
    """A task after the device step: its host copy in flight, plus what the record needs."""

    prep: Prepared
    copy: PendingCopy
    stats: EncodeStats
    align_s: float


def prepare_records(inputs: TaskInputs, task: Task, records: Iterator[Record | Reject] | None = None) -> Prepared:
    """Read (or take ``records``), validate, de-duplicate and tokenise the rows of ``task``."""
    t0 = time.perf_counter()
    recs = records if records is not None else inputs.corpus.records(task.start, task.stop)
    valid: list[Record] = []
    rejects: list[Reject] = []
    for rec in recs:
        if isinstance(rec, Reject):
            rejects.append(rec)
        elif rec.row in inputs.duplicates:
            rejects.append(Reject(rec.row, "duplicate", f"same text as row {inputs.duplicates[rec.row]}", rec.id))
        else:
            valid.append(rec)
    t1 = time.perf_counter()
    texts = [r.text for r in valid]
    tokens = inputs.tokenizer(texts)
    t2 = time.perf_counter()
    return Prepared(task, texts, [r.id for r in valid], np.fromiter((r.row for r in valid), np.int64, len(valid)),
                    tokens, rejects, read_s=t1 - t0, tokenize_s=t2 - t1)


def prepare_task(inputs: TaskInputs, task: Task) -> Prepared:
    return prepare_records(inputs, task)


def encode_task(outputs: TaskOutputs, prep: Prepared) -> Encoded:
    """Encode, align and cast on the device; start the task's one device-to-host copy (does not wait)."""
    stats = EncodeStats()
    src = outputs.encoder.encode_tokenized_tensor(prep.tokens, stats)
    t0 = time.perf_counter()
    emb, bad = outputs.transform.map_async(src)  # no host sync: the flags travel with the copy
    stored = [bad, encode_embedding_torch(emb, outputs.dtype)]
    if outputs.keep_source:
        stored.append(encode_embedding_torch(src, outputs.dtype))
    copy = outputs.copies.start(*stored)
    return Encoded(prep, copy, stats, time.perf_counter() - t0)


def write_task(outputs: TaskOutputs, enc: Encoded, on_event: OnEvent = no_event) -> dict[str, Any]:
    """Publish one encoded task: the shard (atomic), then its completion record. Returns the record."""
    prep = enc.prep
    t1 = time.perf_counter()
    bad, *stored = enc.copy.wait()
    _refuse_bad_rows(prep, outputs.aligner.name, bad.numpy())
    hosts = [host_view(h, outputs.dtype) for h in stored]
    entry = _write_shard(outputs, prep, hosts[0], hosts[1] if outputs.keep_source else None, on_event)
    on_event("after_rename")
    record = _completion_record(entry, prep, enc.stats, enc.align_s, time.perf_counter() - t1)
    writer.write_record(outputs.out_dir, record)
    on_event("after_record")
    return record


def _refuse_bad_rows(prep: Prepared, aligner: str, bad: np.ndarray) -> None:
    """No NaN reaches a shard: a row whose text embedding is not finite and unit-norm, or whose substitute
    is not finite, stops the run naming its record (a model or aligner fault, not a data error)."""
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"task {prep.task.index}: row {int(prep.rows[i])} (id {prep.ids[i]!r}): the text embedding "
                         f"is not finite and unit-norm, or aligner {aligner!r} maps it to a non-finite vector "
                         f"({int(bad.sum())} such row(s) in the task); check the model weights and the aligner")


def _write_shard(outputs: TaskOutputs, prep: Prepared, emb, src, on_event: OnEvent) -> dict[str, Any]:
    return writer.write_task_shard(
        outputs.out_dir, prep.task.index, rows_in_task=prep.rows - prep.task.start, texts=prep.texts, emb=emb,
        ids=prep.ids, rows=prep.rows, n_tokens=prep.tokens.lengths, truncated=prep.tokens.truncated,
        model=outputs.model_fingerprint, aligner=outputs.aligner.name, src=src, on_event=on_event)


def _completion_record(entry: dict, prep: Prepared, stats: EncodeStats, align_s: float, write_s: float) -> dict:
    task = prep.task
    if entry["nsamples"] + len(prep.rejects) != task.stop - task.start:
        raise RuntimeError(f"task {task.index}: {entry['nsamples']} samples + {len(prep.rejects)} rejects "
                           f"!= {task.stop - task.start} input rows (corpus shorter than planned?)")
    reasons: dict[str, int] = {}
    for rej in prep.rejects:
        reasons[rej.reason] = reasons.get(rej.reason, 0) + 1
    return {
        **entry,
        "rows": [task.start, task.stop],
        "rejects": len(prep.rejects),
        "reject_reasons": dict(sorted(reasons.items())),
        "reject_list": [r.to_json(task.index) for r in prep.rejects],
        "stats": {
            "read_s": round(prep.read_s, 6), "tokenize_s": round(prep.tokenize_s + stats.tokenize_s, 6),
            "encode_s": round(stats.encode_s, 6), "align_s": round(align_s, 6), "write_s": round(write_s, 6),
            "tokens": int(stats.tokens), "truncated": int(stats.truncated), "batches": int(stats.batches),
        },
    }


def run_task(inputs: TaskInputs, outputs: TaskOutputs, task: Task, on_event: OnEvent = no_event) -> dict[str, Any]:
    """The whole task function in one thread: prepare, encode, write (removes the task's stray temps first)."""
    writer.remove_temps(outputs.out_dir, task.index)
    return write_task(outputs, encode_task(outputs, prepare_task(inputs, task)), on_event)
