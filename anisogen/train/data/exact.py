"""Stage 1, exact-pass sampling: every planned sample exactly once per data epoch, resumable mid-epoch.

The plan (:class:`ExactPlan`) is a pure function of the shard list, the shard sizes (``sizes.json`` /
manifest), the seed, the micro-batch size and the world size:

* epoch order: the shards are permuted with a seed of (seed, epoch); inside each shard the samples
  are permuted with a seed of (seed, epoch, shard). Concatenated, this is the epoch's sequence of
  ``N`` positions (shard, sample index in tar order);
* balancing: every rank gets ``B = N // (batch_size * world_size)`` full batches, rank ``r`` the
  contiguous slice ``[r*B*bs, (r+1)*B*bs)`` of the sequence; the last ``N - B*bs*world`` positions
  of the epoch's sequence are *dropped* (a different set each epoch, never silently: the count is
  :attr:`ExactPlan.dropped_per_epoch`, logged by the trainer and stored in checkpoints);
* batch ``k`` of a rank is positions ``[k*bs, (k+1)*bs)`` of its slice; with ``W`` DataLoader workers
  and a start cursor ``c``, worker ``w`` builds the batches ``k >= c`` with ``(k - c) % W == w``. The
  loader takes batches round-robin from its workers, so a rank receives batches ``c, c+1, ..., B-1`` in
  order whatever the number of workers;
* the noise RNG of a sample is seeded by (seed, epoch, position), not by the worker.

So the batch sequence of a rank is a function of (seed, epoch, cursor) only, and a resumed run that
starts at cursor ``c`` yields exactly what the uninterrupted run yields after its ``c``-th batch.

Bad data: a sample that cannot be used is a counted reject (its batch is smaller); positions a shard
cannot deliver (truncated tar: fewer samples than its size says) are rejected with a reason naming
the file. A batch whose samples are *all* rejected stops the run with an error naming the shards
(an empty batch would desynchronise the ranks).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch.utils.data
import webdataset as wds

from .common import RejectLog, SampleError, decode_embedding
from .examples import Collator, ExampleBuilder
from .shard_stream import check_tar_header, sample_to_record, shard_samples

SAMPLING_CHOICES = ("resampled", "exact")


@dataclass(frozen=True)
class ExactPlan:
    """The exact-pass plan of a list of shards (see the module docstring)."""

    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    seed: int
    batch_size: int
    world_size: int

    @classmethod
    def build(cls, shards: Sequence[str], sizes: dict[str, int], *, seed: int, batch_size: int, world_size: int,
              log: RejectLog | None = None) -> "ExactPlan":
        """Plan over ``shards`` with ``sizes`` ({url: n}); shards missing from ``sizes`` (rejected when
        they were sized) are left out. Each planned tar's header is checked (512 bytes): a missing or
        non-tar file raises :class:`SampleError` naming it, or with a skip-mode ``log`` is a counted
        reject left out of the plan."""
        keep, ns = [], []
        for url in shards:
            if url not in sizes:
                continue
            try:
                check_tar_header(url)
                if int(sizes[url]) <= 0:
                    raise SampleError(f"shard {url} has size {sizes[url]} in sizes.json/manifest")
            except SampleError as exc:
                if log is None or log.on_error == "fail":
                    raise
                log.bad_shards.add(url)
                log.reject(url, "*", str(exc))
                continue
            keep.append(url)
            ns.append(int(sizes[url]))
        plan = cls(tuple(keep), tuple(ns), int(seed), int(batch_size), int(world_size))
        if plan.batches_per_rank < 1:
            raise ValueError(f"exact-pass sampling: {plan.num_samples} usable samples in {len(keep)} shard(s) are fewer "
                             f"than one batch per rank ({batch_size} x {world_size} processes)")
        return plan

    @property
    def num_samples(self) -> int:
        return int(sum(self.sizes))

    @property
    def batches_per_rank(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    @property
    def samples_per_epoch(self) -> int:
        """Samples actually trained on per epoch (all ranks)."""
        return self.batches_per_rank * self.batch_size * self.world_size

    @property
    def dropped_per_epoch(self) -> int:
        """Positions at the end of each epoch's sequence that no rank gets (``< batch_size * world``)."""
        return self.num_samples - self.samples_per_epoch

    def describe(self) -> dict:
        return {"num_shards": len(self.shards), "num_samples": self.num_samples,
                "batches_per_rank": self.batches_per_rank, "samples_per_epoch": self.samples_per_epoch,
                "dropped_per_epoch": self.dropped_per_epoch}

    # ---------------------------------------------------------------- epoch order
    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 43]).permutation(len(self.shards))

    def sample_order(self, epoch: int, shard: int) -> np.ndarray:
        """Permutation of the sample indices (tar order) of shard ``shard`` in ``epoch``."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), int(shard), 47]).permutation(self.sizes[shard])

    def segments(self, epoch: int, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """``(shard, first, last, shard_start)``: the pieces of the epoch sequence ``[start, stop)``,
        where positions ``first..last-1`` (global) lie in ``shard``, whose first position is ``shard_start``."""
        order = self.shard_order(epoch)
        ends = np.cumsum([self.sizes[i] for i in order])
        j = bisect.bisect_right(ends.tolist(), start)
        pos = start
        while pos < stop and j < len(order):
            shard_end = int(ends[j])
            hi = min(stop, shard_end)
            if hi > pos:
                yield int(order[j]), pos, hi, shard_end - self.sizes[int(order[j])]
            pos = hi
            j += 1

    def rank_keys(self, epoch: int, rank: int) -> list[tuple[str, int]]:
        """(shard url, sample index) of every position of ``rank`` in ``epoch``, in batch order (tests, audits)."""
        lo = rank * self.batches_per_rank * self.batch_size
        out = []
        for shard, first, last, shard_start in self.segments(epoch, lo, lo + self.batches_per_rank * self.batch_size):
            start = first - shard_start
            perm = self.sample_order(epoch, shard)
            out += [(self.shards[shard], int(perm[start + i])) for i in range(last - first)]
        return out


class ExactSource:
    """Pipeline source: this (rank, worker)'s batches of one epoch from ``start``, as lists of
    ``(position, raw sample or None, url, sample index)`` (None: the shard could not deliver it)."""

    def __init__(self, plan: ExactPlan, rank: int, epoch: int, start: int, log: RejectLog):
        self.plan, self.rank, self.epoch, self.start, self.log = plan, rank, epoch, start, log

    def __call__(self) -> Iterator[tuple[int, list]]:
        plan, bs = self.plan, self.plan.batch_size
        info = torch.utils.data.get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        base = self.rank * plan.batches_per_rank * bs
        lo, hi = base + self.start * bs, base + plan.batches_per_rank * bs

        def mine(g: int) -> bool:
            return ((g - base) // bs - self.start) % nworkers == worker

        current: list = []
        current_k = None
        for shard, first, last, shard_start in plan.segments(self.epoch, lo, hi):
            wanted = [g for g in range(first, last) if mine(g)]
            if not wanted:
                continue
            url = plan.shards[shard]
            perm = plan.sample_order(self.epoch, shard)
            offset = first - shard_start
            need = {int(perm[offset + g - first]) for g in wanted}
            got = self._read(url, need)
            for g in wanted:
                k = (g - base) // bs
                if current_k is not None and k != current_k:
                    yield current_k, current
                    current = []
                current_k = k
                j = int(perm[offset + g - first])
                current.append((g, got.get(j), url, j))
        if current:
            yield current_k, current

    def _read(self, url: str, need: set[int]) -> dict[int, dict]:
        """Samples ``need`` (indices in tar order, every key counted as in ``sizes.json``) of one shard;
        fewer when it is truncated/damaged."""
        got: dict[int, dict] = {}
        top = max(need)
        for j, sample in enumerate(shard_samples([{"url": url}], self.log, fields=None)):
            if j in need:
                got[j] = sample
            if j >= top:
                break
        return got


class ExactBatches:
    """Stage: batch groups -> collated batches (noise RNG per position; rejects counted)."""

    def __init__(self, plan: ExactPlan, builder: ExampleBuilder, log: RejectLog, *, rank: int, epoch: int,
                 prompt: str = ""):
        self.plan, self.builder, self.log = plan, builder, log
        self.rank, self.epoch, self.prompt = rank, epoch, prompt
        self.collate = Collator(builder.tokenizer.pad_token_id, log)

    def __call__(self, src):
        seed = self.plan.seed & 0xFFFFFFFF
        for k, group in src:
            examples = []
            for g, sample, url, j in group:
                if sample is None:
                    self.log.reject(url, f"#{j}", f"sample {j} of shard {url} could not be read: the shard delivers "
                                                   f"fewer samples than its size in sizes.json/manifest (truncated or damaged)")
                    continue
                try:
                    rec = sample_to_record(sample, prompt=self.prompt)
                    emb = decode_embedding(rec["emb"], name="emb.npy")
                    rng = np.random.default_rng([seed, self.epoch, g, 17])
                    examples.append(self.builder.build(rec, emb, train=True, rng=rng))
                except SampleError as exc:
                    self.log.reject(sample.get("__url__", url), sample.get("__key__", f"#{j}"), str(exc))
            if not examples:
                urls = sorted({u for _, _, u, _ in group})
                raise SampleError(f"exact-pass epoch {self.epoch}, rank {self.rank}, batch {k}: all {len(group)} samples "
                                  f"were rejected (shards {', '.join(urls)}; see the rejects file); repair or remove "
                                  f"the shard, or use --stage1-sampling resampled")
            yield self.collate(examples)


def exact_pipeline(spec, builder: ExampleBuilder, plan: ExactPlan, *, rank: int, epoch: int, start: int = 0,
                   on_error: str = "skip", rejects_dir: str | None = None) -> wds.DataPipeline:
    """The finite exact-pass stream of ``rank`` in data ``epoch``, from batch ``start`` (the resume
    cursor) to ``plan.batches_per_rank``; wrap it with :func:`make_loader` (any number of workers)."""
    if not 0 <= start <= plan.batches_per_rank:
        raise ValueError(f"batch cursor {start} outside 0..{plan.batches_per_rank}")
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank {rank} outside 0..{plan.world_size - 1}")
    log = RejectLog(on_error, rejects_dir, tag="train")
    return wds.DataPipeline(ExactSource(plan, rank, epoch, start, log),
                            ExactBatches(plan, builder, log, rank=rank, epoch=epoch, prompt=spec.prompt))
