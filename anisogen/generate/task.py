"""Work units and the per-shard task function shared by every executor.

Task ``i`` covers input rows ``[i * samples_per_shard, (i + 1) * samples_per_shard)`` and produces
``shard-{i:06d}.tar``. Its output depends only on those rows and the fingerprinted config, never on which
process runs it, so any executor (accelerate ranks, Ray tasks, Slurm array jobs) produces the same bytes.

The task function is split in two halves so the cheap CPU half can run in DataLoader workers while the
main process encodes:

* :func:`prepare_task` (worker side): read rows, parse/validate, drop duplicates, tokenise;
* :func:`finish_task` (main side): encode, align, write the shard atomically, write the completion record.

:func:`run_task` chains both (used by the Ray executor and tests).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..encode.corpus import Corpus, Record, Reject
from ..encode.text import ClipTokenizer, EncodeStats, TextEncoder, Tokenized
from ..shards import writer
from ..shards.schema import encode_embedding, make_key, sample_members


FAULT_ENV = "ANISOGEN_FAULT"
FAULT_POINTS = ("mid_tar", "before_rename", "after_rename", "after_record", "fit_chunk")


class FaultInjector:
    """Crash-test hook: ``ANISOGEN_FAULT="POINT:N[:RANK]"`` SIGKILLs the process (of global ``RANK``, default
    any) at the N-th occurrence of POINT: ``mid_tar`` (after the 2nd sample of a shard's temp tar),
    ``before_rename`` (temp tar complete), ``after_rename`` (tar published, record not yet written),
    ``after_record`` (between shards), ``fit_chunk`` (after a fit-sample chunk is saved). Inactive unless
    the variable is set.
    """

    def __init__(self, spec: str | None = None):
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        self.point, self.n, self.counts = None, 0, {}
        if not spec:
            return
        parts = spec.split(":")
        if parts[0] not in FAULT_POINTS or len(parts) not in (2, 3):
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected POINT:N[:RANK] with POINT in {FAULT_POINTS}")
        rank = int(os.environ.get("RANK", "0"))
        if len(parts) == 3 and int(parts[2]) != rank:
            return
        self.point, self.n = parts[0], int(parts[1])

    def __call__(self, point: str) -> None:
        if self.point != point:
            return
        self.counts[point] = self.counts.get(point, 0) + 1
        if self.counts[point] == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


_FAULTS: FaultInjector | None = None


def fault(point: str) -> None:
    global _FAULTS
    if _FAULTS is None:
        _FAULTS = FaultInjector()
    _FAULTS(point)


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
    """A task after the CPU half: valid records, their tokens, rejects and timings."""

    task: Task
    records: list[Record]
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
    """What the GPU half needs (lives in the main process)."""

    out_dir: str
    encoder: TextEncoder
    aligner: Any
    model_fingerprint: str
    dtype: str = "fp16"
    keep_source: bool = False


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
    tokens = inputs.tokenizer([r.text for r in valid])
    t2 = time.perf_counter()
    return Prepared(task, valid, tokens, rejects, read_s=t1 - t0, tokenize_s=t2 - t1)


def prepare_task(inputs: TaskInputs, task: Task) -> Prepared:
    return prepare_records(inputs, task)


def finish_task(outputs: TaskOutputs, prep: Prepared) -> dict[str, Any]:
    """Encode, align and publish one prepared task. Returns its completion record."""
    task = prep.task
    stats = EncodeStats()
    src = outputs.encoder.encode_tokenized(prep.tokens, stats)
    t0 = time.perf_counter()
    if len(src):
        emb = outputs.aligner.transform(src)
    else:
        emb = np.zeros_like(src)
    t1 = time.perf_counter()
    emb_store = encode_embedding(emb, outputs.dtype)
    src_store = encode_embedding(src, outputs.dtype) if outputs.keep_source else None
    aligner_name = outputs.aligner.name

    def samples():
        for i, rec in enumerate(prep.records):
            meta = {"id": rec.id, "row": rec.row, "n_tokens": int(prep.tokens.lengths[i]),
                    "truncated": bool(prep.tokens.truncated[i]), "model": outputs.model_fingerprint,
                    "aligner": aligner_name}
            yield sample_members(make_key(task.index, rec.row - task.start), rec.text, emb_store[i], meta,
                                 None if src_store is None else src_store[i])

    sample_count = [0]

    def on_event(event: str) -> None:
        if event == "sample":
            sample_count[0] += 1
            if sample_count[0] == 2:
                fault("mid_tar")
        else:
            fault(event)

    entry = writer.write_shard(outputs.out_dir, task.index, samples(), on_event=on_event)
    fault("after_rename")
    t2 = time.perf_counter()
    reasons: dict[str, int] = {}
    for rej in prep.rejects:
        reasons[rej.reason] = reasons.get(rej.reason, 0) + 1
    record = {
        **entry,
        "rows": [task.start, task.stop],
        "rejects": len(prep.rejects),
        "reject_reasons": dict(sorted(reasons.items())),
        "reject_list": [r.to_json(task.index) for r in prep.rejects],
        "stats": {
            "read_s": round(prep.read_s, 6), "tokenize_s": round(prep.tokenize_s + stats.tokenize_s, 6),
            "encode_s": round(stats.encode_s, 6), "align_s": round(t1 - t0, 6), "write_s": round(t2 - t1, 6),
            "tokens": int(stats.tokens), "truncated": int(stats.truncated), "batches": int(stats.batches),
        },
    }
    if entry["nsamples"] + len(prep.rejects) != task.stop - task.start:
        raise RuntimeError(f"task {task.index}: {entry['nsamples']} samples + {len(prep.rejects)} rejects "
                           f"!= {task.stop - task.start} input rows (corpus shorter than planned?)")
    writer.write_record(outputs.out_dir, record)
    fault("after_record")
    return record


def run_task(inputs: TaskInputs, outputs: TaskOutputs, task: Task) -> dict[str, Any]:
    """The whole task function: prepare + finish (removes the task's stray temps first)."""
    writer.remove_temps(outputs.out_dir, task.index)
    return finish_task(outputs, prepare_task(inputs, task))
