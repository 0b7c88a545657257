"""Writing shard folders: atomic shard publish, per-shard completion records, manifest assembly.

Publishing protocol for task ``i`` (crash-safe at every step, see docs/GENERATE.md "Resume"):

1. the tar is written to ``shard-{i:06d}.tar.<pid>-<rand>.tmp`` (sha256 computed while writing), fsynced;
2. renamed to ``shard-{i:06d}.tar`` (atomic on POSIX) and the directory is fsynced;
3. ``records/shard-{i:06d}.json`` (entry + rejects + stage timings) is written the same way.

A shard counts as published only when its record exists *and* the tar's size and sha256 match it
(:func:`check_published`). ``manifest.json``, ``sizes.json`` and ``rejects.jsonl`` are derived from the
records (:func:`assemble`), always written to a temp name and renamed, ``manifest.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .. import __version__
from .schema import (
    FORMAT, FORMAT_VERSION, MANIFEST_NAME, RECORDS_DIRNAME, REJECTS_NAME, SHARD_GLOB, SIZES_NAME, TAR_MODE,
    TAR_MTIME, TAR_USER, TEMP_SUFFIX, canonical_json, npy_bytes, shard_name, shard_task,
)

#: Stage names of the per-shard timing split, in pipeline order.
STAGES = ("read", "tokenize", "encode", "align", "write")


# ----------------------------------------------------------------------------- atomic file helpers
def temp_path(path: str | os.PathLike) -> Path:
    """A unique temp name next to ``path`` (``<path>.<pid>-<rand>.tmp``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via temp file + fsync + rename; returns ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """Atomically write ``obj`` as JSON (sorted keys, UTF-8)."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def write_embedding_set(out_dir: str | os.PathLike, *, emb_file: str, emb: np.ndarray, keys_file: str,
                        keys: Sequence[str], meta_file: str, meta: dict[str, Any]) -> Path:
    """Write one (N, d) embedding array with a key per row, each file atomically, into ``out_dir``:

    ``emb_file`` (``.npy`` of ``emb`` as given), ``keys_file`` (one key per line; newlines inside a key
    become spaces) and ``meta_file`` (JSON: ``meta`` plus ``count`` = N and ``dim`` = d).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / emb_file, npy_bytes(emb))
    atomic_write_bytes(out / keys_file, "".join(str(k).replace("\n", " ") + "\n" for k in keys).encode("utf-8"))
    atomic_write_json(out / meta_file, {**meta, "count": int(emb.shape[0]), "dim": int(emb.shape[1])})
    return out


def file_sha256(path: str | os.PathLike, *, bufsize: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter:
    """Minimal binary file wrapper that hashes and counts every byte written (for tarfile streams)."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self.nbytes


# ------------------------------------------------------------------------------------ tar writing
_BLOCK = 512
_RECORD = 20 * _BLOCK


def _octal(n: int, digits: int) -> bytes:
    return b"%0*o\0" % (digits - 1, n)


def _field(text: bytes, length: int) -> bytes:
    return text[:length] + b"\0" * (length - min(len(text), length))


class UstarWriter:
    """Minimal streaming writer of ustar archives for webdataset samples.

    Produces exactly the bytes of ``webdataset.TarWriter(f, encoder=False, mtime=0, user=..., group=...,
    mode=...)`` (Python ``tarfile`` in ``"w|"`` USTAR mode: same headers, member order, end-of-archive
    blocks and 10240-byte record padding; tested), at a fraction of the cost: only the member name, size
    and checksum vary, the rest of each 512-byte header is precomputed. Member names must be ASCII and
    at most 100 bytes (sample keys are ``s000000-000000``).
    """

    def __init__(self, fileobj, *, user: str = TAR_USER, group: str = TAR_USER, mode: int = TAR_MODE,
                 mtime: int = TAR_MTIME):
        self.f = fileobj
        self.offset = 0
        self._parts: list[bytes] = []
        self._pending = 0
        head = _octal(mode & 0o7777, 8) + _octal(0, 8) + _octal(0, 8)  # mode, uid, gid
        tail = (_octal(int(mtime), 12) + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000"
                + _field(user.encode(), 32) + _field(group.encode(), 32) + b"\0" * 16 + b"\0" * 155)  # no dev numbers
        self._head, self._tail = head, tail + b"\0" * (_BLOCK - 100 - len(head) - 12 - len(tail))

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("ascii")
        if len(raw) > 100:
            raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
        size = _octal(len(data), 12)
        header = _field(raw, 100) + self._head + size + self._tail
        chk = sum(header)  # the checksum field holds 8 spaces while summing, as the format requires
        header = header[:148] + b"%06o\0 " % chk + header[156:]
        pad = -len(data) % _BLOCK
        self._parts += (header, data, b"\0" * pad)
        self._pending += _BLOCK + len(data) + pad
        self.offset += _BLOCK + len(data) + pad
        if self._pending >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self._parts:
            self.f.write(b"".join(self._parts))
            self._parts, self._pending = [], 0

    def write(self, sample: Mapping[str, Any]) -> None:
        """Write one sample dict (``__key__`` + extension -> bytes), members in sorted extension order."""
        key = sample["__key__"]
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            value = sample[ext]
            if isinstance(value, str):
                value = value.encode("utf-8")
            self.add(f"{key}.{ext}", bytes(value))

    def close(self) -> None:
        end = b"\0" * (2 * _BLOCK)
        self.offset += len(end)
        rem = self.offset % _RECORD
        if rem:
            end += b"\0" * (_RECORD - rem)
            self.offset += _RECORD - rem
        self._parts.append(end)
        self._flush()


# ------------------------------------------------------------------------------------ shard files
def write_shard(out_dir: str | os.PathLike, task: int, samples: Iterable[Mapping[str, Any]],
                on_event: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the samples of ``task`` to ``shard-{task:06d}.tar`` atomically.

    ``samples`` are dicts from :func:`anisogen.shards.schema.sample_members` (values are bytes), in
    key order. Returns the shard entry ``{"name", "task", "nsamples", "sha256", "bytes", "key_first",
    "key_last"}``. A crash at any point leaves at most a ``*.tmp`` file, never a partial ``.tar``.
    """
    out_dir = Path(out_dir)
    final = out_dir / shard_name(task)
    tmp = temp_path(final)
    n = 0
    first = last = None
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingWriter(raw)
            tw = UstarWriter(hashing)
            for sample in samples:
                key = sample["__key__"]
                if last is not None and key <= last:
                    raise ValueError(f"{final.name}: sample keys must increase, got {key!r} after {last!r}")
                tw.write(dict(sample))
                first = key if first is None else first
                last = key
                n += 1
                if on_event is not None:
                    on_event("sample")
            tw.close()
            raw.flush()
            os.fsync(raw.fileno())
        if on_event is not None:
            on_event("before_rename")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_dir)
    return {
        "name": final.name, "task": int(task), "nsamples": n, "sha256": hashing.sha.hexdigest(),
        "bytes": hashing.nbytes, "key_first": first, "key_last": last,
    }


def record_path(out_dir: str | os.PathLike, task: int) -> Path:
    """``records/shard-{task:06d}.json``."""
    return Path(out_dir) / RECORDS_DIRNAME / (shard_name(task)[: -len(".tar")] + ".json")


def write_record(out_dir: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Atomically write a completion record (the shard entry plus ``rows``, ``rejects`` list, ``stats``).

    Must be called only after :func:`write_shard` returned: the record is the commit point.
    """
    path = record_path(out_dir, int(record["task"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, dict(record), indent=None)


def read_record(out_dir: str | os.PathLike, task: int) -> dict[str, Any] | None:
    """The completion record of ``task``, or ``None`` if absent or unreadable."""
    path = record_path(out_dir, task)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def check_published(out_dir: str | os.PathLike, task: int, *, verify: str = "sha256",
                    remove_invalid: bool = True) -> dict[str, Any] | None:
    """Return the record of ``task`` if its shard is published and intact, else ``None``.

    ``verify``: ``"sha256"`` (hash the tar), ``"size"`` (byte count only) or ``"none"`` (record and file
    exist). With ``remove_invalid``, a record whose tar is missing or differs is deleted together with
    the tar, so the task will be redone.
    """
    if verify not in ("sha256", "size", "none"):
        raise ValueError(f"verify must be 'sha256', 'size' or 'none', got {verify!r}")
    out_dir = Path(out_dir)
    record = read_record(out_dir, task)
    tar = out_dir / shard_name(task)
    if record is None:
        return None
    ok = tar.is_file()
    if ok and verify in ("sha256", "size"):
        ok = tar.stat().st_size == record.get("bytes")
    if ok and verify == "sha256":
        ok = file_sha256(tar) == record.get("sha256")
    if ok:
        return record
    if remove_invalid:
        record_path(out_dir, task).unlink(missing_ok=True)
        tar.unlink(missing_ok=True)
    return None


def remove_temps(out_dir: str | os.PathLike, task: int | None = None) -> list[Path]:
    """Delete stray ``*.tmp`` files (all of them, or only those of ``task``'s shard and record)."""
    out_dir = Path(out_dir)
    removed = []
    if task is None:
        candidates = list(out_dir.glob(f"*{TEMP_SUFFIX}")) + list((out_dir / RECORDS_DIRNAME).glob(f"*{TEMP_SUFFIX}"))
    else:
        stem = shard_name(task)[: -len(".tar")]
        candidates = list(out_dir.glob(f"{stem}.tar.*{TEMP_SUFFIX}")) + list(
            (out_dir / RECORDS_DIRNAME).glob(f"{stem}.json.*{TEMP_SUFFIX}"))
    for p in candidates:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def list_records(out_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """All readable completion records, ``task -> record`` (not verified against the tars)."""
    out = {}
    rdir = Path(out_dir) / RECORDS_DIRNAME
    if not rdir.is_dir():
        return out
    for p in sorted(rdir.glob("shard-*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        out[int(rec["task"])] = rec
    return out


def existing_shard_tasks(out_dir: str | os.PathLike) -> list[int]:
    """Task indices of every ``shard-*.tar`` present (published or orphaned)."""
    tasks = []
    for p in Path(out_dir).glob(SHARD_GLOB):
        try:
            tasks.append(shard_task(p.name))
        except ValueError:
            continue
    return sorted(tasks)


# ------------------------------------------------------------------------------ manifest assembly
def shard_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest entry of a record (the full rejects list is left to rejects.jsonl)."""
    entry = {k: v for k, v in record.items() if k != "reject_list"}
    return entry


def totals(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate counts and summed stage seconds over shard records."""
    out: dict[str, Any] = {"shards": 0, "samples": 0, "rejects": 0, "reject_reasons": {}, "input_rows": 0,
                           "truncated": 0, "tokens": 0, "bytes": 0, "seconds": {s: 0.0 for s in STAGES}}
    for rec in records:
        out["shards"] += 1
        out["samples"] += int(rec["nsamples"])
        out["rejects"] += int(rec.get("rejects", 0))
        out["bytes"] += int(rec.get("bytes", 0))
        rows = rec.get("rows") or [0, 0]
        out["input_rows"] += int(rows[1]) - int(rows[0])
        for reason, n in rec.get("reject_reasons", {}).items():
            out["reject_reasons"][reason] = out["reject_reasons"].get(reason, 0) + int(n)
        stats = rec.get("stats", {})
        out["truncated"] += int(stats.get("truncated", 0))
        out["tokens"] += int(stats.get("tokens", 0))
        for s in STAGES:
            out["seconds"][s] += float(stats.get(f"{s}_s", 0.0))
    out["seconds"] = {s: round(v, 6) for s, v in out["seconds"].items()}
    return out


def assemble(out_dir: str | os.PathLike, header: Mapping[str, Any], records: Mapping[int, Mapping[str, Any]],
             *, complete: bool) -> dict[str, Any]:
    """Write ``rejects.jsonl``, ``sizes.json`` and then ``manifest.json`` from ``records``.

    ``header`` holds the run-level keys (config, config_fingerprint, model_fingerprint, aligner, dim,
    dtype, samples_per_shard, num_tasks). Everything is sorted by task, so the derived files are
    identical whatever order the shards were published in. Returns the manifest dict.
    """
    out_dir = Path(out_dir)
    ordered = [records[t] for t in sorted(records)]
    lines = []
    for rec in ordered:
        for rej in rec.get("reject_list", []):
            lines.append(canonical_json(rej))
    atomic_write_bytes(out_dir / REJECTS_NAME, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    atomic_write_json(out_dir / SIZES_NAME, {rec["name"]: int(rec["nsamples"]) for rec in ordered})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "anisogen_version": __version__,
        **dict(header),
        "status": "complete" if complete else "running",
        "shards": [shard_entry(rec) for rec in ordered],
        "totals": totals(ordered),
    }
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest
