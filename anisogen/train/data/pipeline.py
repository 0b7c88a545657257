"""The streams: where the data comes from (:class:`StreamSpec`), epoch accounting, the resampled
training pipeline, the exact evaluation pass, and the loader."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import webdataset as wds

from .common import RejectLog, SampleError, make_seed
from .examples import Collator, ExampleBuilder, Examples
from .shard_stream import (
    GuardAllBad, ShardSamples, WorkerShuffle, list_shards, reseeded_shards, shard_samples, shard_sizes,
)
from .store import EmbeddingStore, RecordSource, load_conversation_records


@dataclass
class StreamSpec:
    """Where stage-1/2 data comes from. Exactly one of ``shards`` / ``records`` is set.

    ``extra["text_only"]``: the number of text-only records (stage 2)."""

    shards: list[str] | None = None
    records: list[dict] | None = None
    store: EmbeddingStore | None = None
    prompt: str = ""  # user instruction for caption conversations (chat templates)
    num_samples: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_shards(cls, spec, prompt: str = "", log: RejectLog | None = None) -> "StreamSpec":
        """Shards of ``spec`` with their sizes (``extra["sizes"]``: {url: n}). A listed shard file that
        does not exist (or cannot be sized) raises :class:`SampleError` naming it; with a skip-mode
        ``log`` it is a counted reject and left out."""
        urls = list_shards(spec)
        sizes = shard_sizes(urls, log)
        kept = [u for u in urls if u in sizes]
        if not kept:
            raise SampleError(f"no readable shards in {spec!r} (all {len(urls)} rejected; see the rejects file)")
        return cls(shards=kept, prompt=prompt, num_samples=sum(sizes.values()), extra={"sizes": sizes})

    @classmethod
    def from_jsonl(cls, path: str, store: EmbeddingStore | None, log: RejectLog) -> "StreamSpec":
        records = load_conversation_records(path, store, log)
        if not records:
            raise SampleError(f"{path}: no usable conversation records")
        n_text = sum(r["image"] is None for r in records)
        return cls(records=records, store=store, num_samples=len(records), extra={"text_only": n_text})


def epoch_batches(num_samples: int, batch_size: int, world_size: int, num_workers: int) -> tuple[int, int]:
    """open_clip epoch accounting: (batches per rank per data epoch, batches per worker).

    ``num_batches = ceil(N / (bs * world))`` rounded up to a multiple of the worker count.
    """
    if num_samples <= 0:
        raise ValueError("the training set is empty")
    w = max(1, num_workers)
    nb = math.ceil(num_samples / (batch_size * world_size))
    per_worker = math.ceil(nb / w)
    return per_worker * w, per_worker


def train_pipeline(
    spec: StreamSpec, builder: ExampleBuilder, *, batch_size: int, num_worker_batches: int, seed: int,
    epoch: int, shuffle_buffer: int = 1000, on_error: str = "skip", rejects_dir: str | None = None,
) -> wds.DataPipeline:
    """The infinite, resampled training stream of one data epoch, cut to ``num_worker_batches`` per worker."""
    log = RejectLog(on_error, rejects_dir, tag="train")
    collate = Collator(builder.tokenizer.pad_token_id, log)
    if spec.shards is not None:
        stages = [
            reseeded_shards(spec.shards, make_seed(seed, epoch)),
            GuardAllBad(len(spec.shards), log),
            ShardSamples(log),
            WorkerShuffle(shuffle_buffer, seed, epoch),
        ]
    else:
        stages = [RecordSource(spec.records, seed, epoch)]
    stages += [
        Examples(spec, builder, log, train=True, seed=seed, epoch=epoch),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ]
    return wds.DataPipeline(*stages).with_epoch(num_worker_batches)


def _rank_samples(spec: StreamSpec, rank: int, world_size: int, log: RejectLog) -> Iterable:
    """This rank's share of one exact pass: shards split across ranks when there are enough, else
    samples taken round-robin; records split round-robin."""
    if spec.shards is None:
        return spec.records[rank::world_size]
    by_shard = len(spec.shards) >= world_size
    mine = spec.shards[rank::world_size] if by_shard else spec.shards
    samples = shard_samples(({"url": u} for u in mine), log)
    return samples if by_shard else (s for i, s in enumerate(samples) if i % world_size == rank)


def eval_batches(
    spec: StreamSpec, builder: ExampleBuilder, *, batch_size: int, rank: int = 0, world_size: int = 1,
    on_error: str = "skip", rejects_dir: str | None = None, max_batches: int | None = None,
    padding_side: str = "right",
) -> Iterator[dict]:
    """One exact pass (in the main process); the last batch may be partial."""
    log = RejectLog(on_error, rejects_dir, tag="eval")
    collate = Collator(builder.tokenizer.pad_token_id, log, padding_side=padding_side)
    samples = iter(_rank_samples(spec, rank, world_size, log))
    examples = Examples(spec, builder, log, train=False, seed=0, epoch=0)(samples)
    buf: list[dict] = []
    produced = 0
    for ex in examples:
        buf.append(ex)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
            produced += 1
            if max_batches is not None and produced >= max_batches:
                return
    if buf:
        yield collate(buf)


def make_loader(pipeline: wds.DataPipeline, num_workers: int, *, seed: int = 0, pin_memory: bool = False):
    """``WebLoader`` over a batched pipeline (``batch_size=None``: batching happens in the workers).

    The loader gets its own ``torch.Generator`` so that creating it does not consume the global torch
    RNG (which would make a resumed run's dropout masks differ from an uninterrupted run's).
    """
    gen = torch.Generator()
    gen.manual_seed(seed)
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None, generator=gen)
