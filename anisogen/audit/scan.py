"""Scanning the audit's inputs in tasks: one shard of a shard folder, or one row range of ``.npy`` files.

A task returns a :class:`ScanPart`: statistics of *every* row it read (float64 moments of the
L2-normalised rows, norm statistics of the rows as stored, the row count) plus the rows that fall in the
audit's seeded sample (with their keys and, for shards, ``src.npy``). Parts are merged in task order by
:func:`merge_parts`, and the task boundaries do not depend on the number of worker processes, so the
result is the same whether tasks ran in one process or in many.

Tasks never raise for bad data: every problem becomes an entry of ``ScanPart.problems``
(``{"shard", "key", "reason"}``, ``key`` None for a whole-shard problem) and the caller decides whether
it is fatal. What a shard task checks is set by ``verify`` (see :data:`~.defaults.VERIFY_MODES`):

* always: the tar structure (headers, checksums, truncation), the sample count against the manifest,
  and every sample's ``emb.npy`` (shape (d,), finite, not all zeros), which the moments read anyway;
* ``check_size``: the file size against the manifest; ``sha256``: the file hash;
* ``check_all``: ``src.npy`` and ``json`` (model fingerprint) of every sample; otherwise of the sampled
  rows only.

The functions here are what worker processes run (:mod:`.workers`); they import nothing from the runner.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..shards.decode import ShardFormatError, decode_sample
from ..shards.reader import ShardView
from ..shards.schema import META_EXT, SRC_EXT
from ..stats import Moments

#: Norms at or below this are "all zeros": such a row has no direction.
ZERO_NORM = 1e-12


class Timer:
    """Accumulates wall seconds per stage name (the audit's stages, and the steps of a scan task)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = {} if seconds is None else seconds

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class NormStats:
    """Streaming statistics of row L2 norms (count, mean, M2 as in Chan et al.'s parallel variance, min, max,
    max |norm - 1|); mergeable."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")
    max_dev: float = 0.0

    @classmethod
    def of(cls, norms: np.ndarray) -> "NormStats":
        norms = np.asarray(norms, dtype=np.float64)
        if norms.size == 0:
            return cls()
        mean = float(norms.mean())
        return cls(int(norms.size), mean, float(((norms - mean) ** 2).sum()), float(norms.min()), float(norms.max()),
                   float(np.abs(norms - 1.0).max()))

    def merge(self, other: "NormStats") -> "NormStats":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        return NormStats(n, self.mean + delta * other.count / n, self.m2 + other.m2 + delta * delta * self.count
                         * other.count / n, min(self.low, other.low), max(self.high, other.high),
                         max(self.max_dev, other.max_dev))

    def as_dict(self) -> dict:
        """The audit's ``norm_*`` metrics (population std)."""
        std = (self.m2 / self.count) ** 0.5 if self.count else float("nan")
        return {"norm_mean": self.mean if self.count else float("nan"), "norm_std": std, "norm_min": self.low,
                "norm_max": self.high, "norm_max_dev": self.max_dev}


@dataclass
class ScanPart:
    """What one task read: every-row statistics, the sampled rows, the problems and per-step seconds."""

    dim: int
    count: int = 0
    moments: Moments = None  # type: ignore[assignment]
    norms: NormStats = field(default_factory=NormStats)
    emb: np.ndarray = None  # type: ignore[assignment]
    src: np.ndarray | None = None
    keys: list[str] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.moments is None:
            self.moments = Moments(self.dim)
        if self.emb is None:
            self.emb = np.zeros((0, self.dim), dtype=np.float32)

    def timed(self, step: str):
        """Add the wall seconds of a ``with`` block to ``seconds[step]`` (:class:`Timer`)."""
        return Timer(self.seconds).stage(step)

    def add_rows(self, rows: np.ndarray) -> np.ndarray:
        """Add float32 (n, d) rows as stored (finite) to the moments (as unit rows) and the norm statistics.

        Returns the indices of all-zero rows (norm <= :data:`ZERO_NORM`) *instead* of adding anything when
        there are any: such a row has no direction and the caller reports it."""
        with self.timed("moments"):
            x = rows.astype(np.float64)
            norms = np.sqrt(np.einsum("ij,ij->i", x, x))
            zero = np.flatnonzero(norms <= ZERO_NORM)
            if zero.size:
                return zero
            x /= norms[:, None]
            self.moments.update(x)
            self.norms = self.norms.merge(NormStats.of(norms))
            self.count += rows.shape[0]
        return zero

    def problem(self, shard: str | None, key: str | None, reason: str) -> "ScanPart":
        self.problems.append({"shard": shard, "key": key, "reason": reason})
        return self


# ------------------------------------------------------------------------------------------ shards
@dataclass(frozen=True)
class ShardTask:
    """One shard to scan. ``keep``: sorted positions (in the shard) of the sampled rows; ``sha256``: the
    manifest hash to check (None = do not hash); ``size``: the manifest byte size (None = do not check)."""

    path: str
    name: str
    nsamples: int
    dim: int
    keep: np.ndarray
    fingerprint: str | None = None
    size: int | None = None
    sha256: str | None = None
    check_all: bool = False


def scan_shard(task: ShardTask) -> ScanPart:
    """Scan one shard (see the module docstring); never raises for bad data."""
    part = ScanPart(task.dim)
    reason = _file_problem(task, part)
    if reason:
        return part.problem(task.name, None, reason)
    try:
        with part.timed("read"):  # the tar walk: every header, checksum and member location
            view = ShardView(task.path)
    except (ShardFormatError, OSError, ValueError) as exc:
        return part.problem(task.name, None, f"corrupt shard, cannot be read as a tar ({exc})")
    with view:
        if len(view) != task.nsamples:
            return part.problem(task.name, None, f"holds {len(view)} samples but the manifest lists {task.nsamples}")
        try:
            with part.timed("read"):
                _scan_columns(view, task, part)
        except ShardFormatError:  # some sample is bad: rescan sample by sample to find every bad one
            part = ScanPart(task.dim, seconds=part.seconds)
            with part.timed("read"):
                _scan_samples(view, task, part)
    return _exclusive_read_time(part)


def _exclusive_read_time(part: ScanPart) -> ScanPart:
    """``read`` was timed around the moments too: keep only the reading and checking."""
    if "read" in part.seconds:
        part.seconds["read"] = max(0.0, part.seconds["read"] - part.seconds.get("moments", 0.0))
    return part


def _file_problem(task: ShardTask, part: ScanPart) -> str | None:
    """Why the shard file cannot be trusted (missing, size or sha256 mismatch), or None."""
    from ..shards.writer import file_sha256

    path = Path(task.path)
    if not path.is_file():
        return "shard listed in the manifest is missing"
    size = path.stat().st_size
    if task.size is not None and size != int(task.size):
        return f"corrupt shard: {size} bytes on disk, manifest says {task.size}"
    if task.sha256:
        with part.timed("sha256"):
            if file_sha256(path) != task.sha256:
                return "corrupt shard: sha256 differs from the manifest"
    return None


def _members(view: ShardView) -> set[str]:
    first = view.raw(0) if len(view) else {}
    return {ext for ext in (SRC_EXT, META_EXT) if ext in first}


def _check_fingerprints(view: ShardView, metas: list[dict], rows, fingerprint: str | None) -> None:
    if fingerprint is None:
        return
    for i, meta in zip(range(len(metas)) if rows is None else rows, metas):
        model = meta.get("model")
        if model is not None and model != fingerprint:
            raise ShardFormatError(view.shard, view.keys[int(i)], _model_reason(model, fingerprint))


def _model_reason(model: str, fingerprint: str) -> str:
    return f"sample was encoded with CLIP model {model!r}, the manifest says {fingerprint!r}"


def _scan_columns(view: ShardView, task: ShardTask, part: ScanPart) -> None:
    """Fast path: whole columns at once; raises :class:`ShardFormatError` at the first bad sample."""
    emb = view.column("emb", dim=task.dim)
    members = _members(view)
    checked = None if task.check_all else task.keep
    src = view.column("src", rows=checked, dim=task.dim) if SRC_EXT in members else None
    if META_EXT in members:
        _check_fingerprints(view, view.column("json", rows=checked), checked, task.fingerprint)
    zero = part.add_rows(emb)
    if zero.size:
        raise ShardFormatError(view.shard, view.keys[int(zero[0])], "emb.npy is all zeros and has no direction")
    part.emb = emb[task.keep]
    part.keys = [view.keys[int(i)] for i in task.keep]
    if src is not None:
        part.src = src[task.keep] if task.check_all else src


def _scan_samples(view: ShardView, task: ShardTask, part: ScanPart) -> None:
    """Slow path for a shard with bad samples: every sample on its own; bad ones become problems."""
    keep = set(task.keep.tolist())
    good, kept, kept_src, keys = [], [], [], []
    for i in range(len(view)):
        raw = view.raw(i)
        key = raw["__key__"]
        full = task.check_all or i in keep
        fields = ["emb"] + ([f for f, ext in (("src", SRC_EXT), ("json", META_EXT)) if ext in raw] if full else [])
        try:
            sample = decode_sample(raw, shard=view.shard, key=key, fields=fields, dim=task.dim)
            model = (sample.get("json") or {}).get("model")
            if task.fingerprint is not None and model is not None and model != task.fingerprint:
                raise ShardFormatError(view.shard, key, _model_reason(model, task.fingerprint))
            if float(np.dot(sample["emb"], sample["emb"])) <= ZERO_NORM ** 2:
                raise ShardFormatError(view.shard, key, "emb.npy is all zeros and has no direction")
        except ShardFormatError as exc:
            part.problem(task.name, key, exc.reason)
            continue
        good.append(sample["emb"])
        if i in keep:
            kept.append(sample["emb"])
            kept_src.append(sample.get("src"))
            keys.append(key)
    if good:
        part.add_rows(np.stack(good))
    if kept:
        part.emb = np.stack(kept)
        part.keys = keys
        if all(s is not None for s in kept_src):
            part.src = np.stack(kept_src)


# ------------------------------------------------------------------------------------ .npy files
@dataclass(frozen=True)
class RowsTask:
    """Global rows ``[lo, hi)`` of an embedding source; ``files``: the ``.npy`` files those rows lie in (in
    order), ``offset``: the global row of the first of them; ``keep``: sorted sampled global rows."""

    files: tuple[str, ...]
    offset: int
    lo: int
    hi: int
    keep: np.ndarray


def scan_rows(task: RowsTask) -> ScanPart:
    """Scan a row range of ``.npy`` embeddings (read through :mod:`anisogen.embedding_files`, opening only the
    task's files); a NaN/Inf or all-zero row is a problem naming the file and row."""
    from ..embedding_files import EmbeddingFileError, open_embeddings

    part = ScanPart(0)
    try:
        source = open_embeddings(list(task.files))
        part = ScanPart(source.dim)
        kept, keys = [], []
        with part.timed("read"):
            for file, start, local_start, chunk in source.iter_range(task.lo - task.offset, task.hi - task.offset):
                glob_start = task.offset + local_start
                zero = part.add_rows(chunk)
                if zero.size:
                    return part.problem(None, f"{file.name}:{start + int(zero[0])}",
                                        f"{file}: row {start + int(zero[0])} is all zeros and has no direction")
                sel = task.keep[(task.keep >= glob_start) & (task.keep < glob_start + len(chunk))] - glob_start
                kept.append(chunk[sel])
                keys.extend(f"{file.name}:{start + int(i)}" for i in sel)
    except EmbeddingFileError as exc:
        return part.problem(None, None, str(exc))
    part.emb = np.concatenate(kept).astype(np.float32, copy=False) if kept else part.emb
    part.keys = keys
    return _exclusive_read_time(part)


# ------------------------------------------------------------------------------------------ merge
@dataclass
class Scan:
    """Parts merged in task order."""

    count: int
    moments: Moments
    norms: NormStats
    emb: np.ndarray
    src: np.ndarray | None
    n_src_rows: int
    keys: list[str]
    seconds: dict[str, float]


def merge_parts(parts: list[ScanPart], dim: int) -> Scan:
    """One :class:`Scan` from ``parts`` (task order). ``src`` is kept only when every sampled row has one."""
    moments, norms, count, seconds = Moments(dim), NormStats(), 0, {}
    embs, srcs, keys, n_src = [], [], [], 0
    for p in parts:
        if p.count:
            moments = moments.merge(p.moments)
            norms = norms.merge(p.norms)
            count += p.count
        for step, secs in p.seconds.items():
            seconds[step] = seconds.get(step, 0.0) + secs
        if len(p.keys):
            embs.append(p.emb)
            srcs.append(p.src)
            keys.extend(p.keys)
            n_src += len(p.keys) if p.src is not None else 0
    emb = np.concatenate(embs).astype(np.float32, copy=False) if embs else np.zeros((0, dim), np.float32)
    src = np.concatenate(srcs).astype(np.float32, copy=False) if srcs and n_src == len(keys) else None
    return Scan(count, moments, norms, emb, src, n_src, keys, seconds)
