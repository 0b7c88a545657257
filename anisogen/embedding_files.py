"""Embedding ``.npy`` files and folders: the one place that finds, checks and reads them.

Accepted sources (:func:`list_embedding_files`), each an (N, d) array per file:

* a ``.npy`` file;
* a folder of ``.npy`` files, read in natural name order (``img_emb_2.npy`` before ``img_emb_10.npy``): the
  output folder of ``pipelines/embed_images.py`` / ``pipelines/embed_texts.py`` (``img_emb.npy`` /
  ``text_emb.npy``), clip-retrieval's ``img_emb/`` (``img_emb_0.npy, img_emb_1.npy, ...``), or a
  clip-retrieval output folder that holds such an ``img_emb/`` subfolder and no ``.npy`` of its own;
* a glob (``"embs/part-*.npy"``), also in natural order.

Storage dtypes: float16, float32, float64, and uint16 read as bfloat16 bits (the shard format's ``bf16``).
Every file of a source must be 2-D with the same d. Rows are read memory-mapped
(``np.load(mmap_mode="r", allow_pickle=False)``) chunk by chunk; every chunk is checked for NaN/Inf and
errors name the file and the row inside it.

**Sidecar rule** (:func:`find_sidecar`). The metadata JSON of an embedding file ``DIR/X.npy`` is

1. ``DIR/X.json`` (same stem) when it exists: what :func:`write_embeddings` writes, and also the meta file
   of :func:`anisogen.shards.writer.write_embedding_set` folders (``img_emb.npy`` -> ``img_emb.json``,
   ``text_emb.npy`` -> ``text_emb.json``; ``image.npy`` -> ``image.json``, ``p.npz`` -> ``p.json``);
2. otherwise the folder's meta file, ``DIR/img_emb.json`` or ``DIR/text_emb.json``, when exactly one of the
   two is there (e.g. one ``img_emb.json`` next to clip-retrieval's ``img_emb_0.npy, img_emb_1.npy ...``);
3. otherwise none (the model cannot be verified).

The CLIP model fingerprint is its ``model`` key (``model_fingerprint`` is accepted as an alias). A sidecar
that is not a JSON object raises :class:`EmbeddingFileError` naming it.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .embeddings import NORM_ATOL, check_embeddings
from .cli import UserError

#: Folder-level meta files written by ``write_embedding_set`` (``encode/images.py``, ``encode/text_corpus.py``).
FOLDER_META_FILES = ("img_emb.json", "text_emb.json")
#: Storage dtypes accepted in embedding files (uint16 = bfloat16 bits).
DTYPES = (np.float16, np.float32, np.float64, np.uint16)
DEFAULT_CHUNK = 65536


class EmbeddingFileError(UserError):
    """An embedding file, folder or sidecar is missing, unreadable, inconsistent or from another model."""


# ---------------------------------------------------------------------------------------- listing
def natural_key(path: str | os.PathLike) -> list:
    """Sort key putting ``img_emb_2.npy`` before ``img_emb_10.npy`` (digits compared as numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", os.fspath(path))]


def list_embedding_files(path: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """The ``.npy`` files of a file, folder, clip-retrieval output folder or glob, in natural order.

    ``recursive``: also ``.npy`` files in subfolders of a folder. Raises :class:`EmbeddingFileError` when
    there are none.
    """
    raw = os.fspath(path)
    p = Path(raw)
    if p.is_file():
        if p.suffix.lower() != ".npy":
            raise EmbeddingFileError(f"{p}: expected a .npy file of (N, d) embeddings")
        return [p]
    if p.is_dir():
        files = [q for q in (p.rglob("*.npy") if recursive else p.glob("*.npy")) if q.is_file()]
        if not files and (p / "img_emb").is_dir():  # clip-retrieval output folder
            files = [q for q in (p / "img_emb").glob("*.npy") if q.is_file()]
        if not files:
            raise EmbeddingFileError(f"{p}: folder holds no .npy embedding files")
        return sorted(files, key=natural_key)
    if globlib.has_magic(raw):
        files = [Path(q) for q in globlib.glob(raw, recursive=True) if os.path.isfile(q) and q.lower().endswith(".npy")]
        if not files:
            raise EmbeddingFileError(f"{raw!r} matches no .npy files")
        return sorted(files, key=natural_key)
    raise EmbeddingFileError(f"{raw}: does not exist")


# --------------------------------------------------------------------------------------- sidecars
def sidecar_path(npy_path: str | os.PathLike) -> Path:
    """The same-stem sidecar ``<stem>.json`` of an embedding file (where :func:`write_embeddings` writes)."""
    return Path(npy_path).with_suffix(".json")


def find_sidecar(npy_path: str | os.PathLike) -> Path | None:
    """The metadata JSON of an embedding file by the module's sidecar rule (see the module docstring)."""
    own = sidecar_path(npy_path)
    if own.is_file():
        return own
    folder = Path(npy_path).parent
    present = [folder / name for name in FOLDER_META_FILES if (folder / name).is_file()]
    return present[0] if len(present) == 1 else None


def read_sidecar(npy_path: str | os.PathLike) -> dict | None:
    """The sidecar JSON of ``npy_path`` (None when it has none); it must be a JSON object."""
    side = find_sidecar(npy_path)
    if side is None:
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmbeddingFileError(f"{side}: sidecar is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise EmbeddingFileError(f"{side}: sidecar must be a JSON object with a 'model' (fingerprint) key")
    return meta


def sidecar_fingerprint(meta: dict | None) -> str | None:
    """The CLIP fingerprint in a sidecar: key ``model`` or its alias ``model_fingerprint``."""
    if meta is None:
        return None
    value = meta.get("model") or meta.get("model_fingerprint")
    return str(value) if value else None


# ---------------------------------------------------------------------------------------- writing
def write_embeddings(path: str | os.PathLike, embeddings: np.ndarray, *, model_fingerprint: str | None,
                     **extra: Any) -> Path:
    """Save (N, d) embeddings to ``path`` (.npy, dtype kept) and the sidecar ``<stem>.json``.

    The sidecar holds ``model`` (the CLIP fingerprint, same key as ``img_emb.json``), ``count``, ``dim``,
    ``dtype`` and any ``extra`` keys (e.g. ``kind="image"``).
    """
    from .shards.writer import atomic_write_json

    path = Path(path)
    arr = np.asarray(embeddings)
    if arr.ndim != 2:
        raise ValueError(f"{path}: embeddings must be (N, d), got shape {arr.shape}")
    np.save(path, arr, allow_pickle=False)
    meta = {"model": model_fingerprint, "count": int(arr.shape[0]), "dim": int(arr.shape[1]),
            "dtype": str(arr.dtype), **extra}
    atomic_write_json(sidecar_path(path), meta)
    return path


# ---------------------------------------------------------------------------------------- reading
def open_npy(path: str | os.PathLike) -> np.ndarray:
    """Memory-map one ``.npy`` and check it is 2-D of an accepted dtype (see :data:`DTYPES`)."""
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise EmbeddingFileError(f"{path}: file does not exist") from None
    except (ValueError, OSError, EOFError) as exc:
        raise EmbeddingFileError(f"{path}: not a readable .npy array ({exc})") from None
    if arr.ndim != 2:
        raise EmbeddingFileError(f"{path}: expected a 2-D (N, d) array, got shape {arr.shape}")
    if arr.dtype not in DTYPES:
        raise EmbeddingFileError(f"{path}: unsupported dtype {arr.dtype} (float16/32/64 or uint16 = bfloat16 bits)")
    return arr


def _as_float(chunk: np.ndarray) -> np.ndarray:
    """Float view of stored rows: uint16 is decoded as bfloat16 bits, floats are kept as they are."""
    chunk = np.asarray(chunk)
    if chunk.dtype == np.uint16:
        from .shards.schema import decode_embedding

        return decode_embedding(chunk)
    return chunk


@dataclass
class EmbeddingFiles:
    """An opened embedding source: its files (natural order), rows per file, d and CLIP fingerprint.

    Nothing is read until a method asks for rows; each method re-opens the files memory-mapped.
    ``fingerprints`` maps each file to the fingerprint of its sidecar (None without one);
    ``model_fingerprint`` is their common value (None when no file has one).
    """

    path: str
    files: list[Path]
    counts: list[int]
    dim: int
    dtypes: list[np.dtype]
    fingerprints: dict[Path, str | None] = field(default_factory=dict)
    model_fingerprint: str | None = None
    chunk_size: int = DEFAULT_CHUNK

    @property
    def count(self) -> int:
        return int(sum(self.counts))

    @property
    def starts(self) -> np.ndarray:
        """Global row of the first row of each file, plus the total at the end."""
        return np.cumsum([0] + list(self.counts))

    def __len__(self) -> int:
        return self.count

    def _check(self, chunk: np.ndarray, file: Path, offset: int, *, dtype, normalize: bool,
               unit_norm: bool, atol: float) -> np.ndarray:
        try:
            return check_embeddings(chunk, name=str(file), dim=self.dim, normalize=normalize,
                                    atol=atol if unit_norm else np.inf, min_rows=0,
                                    dtype=dtype if dtype is not None else chunk.dtype, row_offset=offset)
        except ValueError as exc:
            raise EmbeddingFileError(str(exc)) from None

    def iter_file_chunks(self, chunk_size: int | None = None, *, dtype=None, normalize: bool = False,
                         unit_norm: bool = False, atol: float = NORM_ATOL, check: bool = True
                         ) -> Iterator[tuple[Path, int, np.ndarray]]:
        """Yield ``(file, first row in the file, rows)`` for every chunk of every file, in order.

        Rows are floats (``dtype`` or the stored float dtype; uint16 decoded to float32). ``check``: refuse
        NaN/Inf (and, with ``unit_norm``, rows whose L2 norm is off 1 by more than ``atol``) naming file
        and row; ``normalize`` L2-normalises the rows instead of checking norms.
        """
        for _, file, start, chunk in self._iter(chunk_size, dtype=dtype, normalize=normalize, unit_norm=unit_norm,
                                                atol=atol, check=check):
            yield file, start, chunk

    def _iter(self, chunk_size: int | None = None, *, dtype=None, normalize: bool = False, unit_norm: bool = False,
              atol: float = NORM_ATOL, check: bool = True, limit: int | None = None
              ) -> Iterator[tuple[int, Path, int, np.ndarray]]:
        size = int(chunk_size or self.chunk_size)
        left = None if limit is None else max(0, int(limit))
        for index, file in enumerate(self.files):
            arr = open_npy(file)
            for start in range(0, arr.shape[0], size):
                if left is not None:
                    if left <= 0:
                        return
                    stop = min(start + min(size, left), arr.shape[0])
                    left -= stop - start
                else:
                    stop = start + size
                chunk = _as_float(arr[start:stop])
                if check or normalize:
                    chunk = self._check(chunk, file, start, dtype=dtype, normalize=normalize,
                                        unit_norm=unit_norm and check, atol=atol)
                elif dtype is not None:
                    chunk = chunk.astype(dtype, copy=False)
                yield index, file, start, chunk

    def iter_chunks(self, chunk_size: int | None = None, **kwargs) -> Iterator[np.ndarray]:
        """The rows of :meth:`iter_file_chunks` without their location."""
        for _, _, chunk in self.iter_file_chunks(chunk_size, **kwargs):
            yield chunk

    def __call__(self) -> Iterator[np.ndarray]:
        """Re-iterable chunk source (stored dtype, NaN/Inf checked) for :func:`anisogen.align.fit_aligner`."""
        return self.iter_chunks()

    def locate(self, positions) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Split sorted-or-not global row ``positions`` into ``(file index, rows in the file, output slots)``."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= self.count):
            raise EmbeddingFileError(f"{self.path}: row positions must lie in [0, {self.count}), "
                                     f"got {int(pos.min())}..{int(pos.max())}")
        starts = self.starts
        which = np.searchsorted(starts, pos, side="right") - 1
        out = []
        for i in np.unique(which):
            slots = np.flatnonzero(which == i)
            out.append((int(i), pos[slots] - starts[i], slots))
        return out

    def rows(self, positions, *, dtype=np.float32, normalize: bool = False) -> np.ndarray:
        """The rows at global ``positions`` (in the given order), reading only those rows.

        The read rows are checked for NaN/Inf (errors name the file and its row).
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = np.empty((pos.size, self.dim), dtype=dtype)
        for i, local, slots in self.locate(pos):
            arr = open_npy(self.files[i])
            order = np.argsort(local, kind="stable")
            got = _as_float(arr[local[order]])  # fancy indexing on the memory map reads only these rows
            bad = ~np.isfinite(got).all(axis=1)
            if bad.any():
                row = int(local[order][np.flatnonzero(bad)[0]])
                raise EmbeddingFileError(f"{self.files[i]}: row {row} contains NaN or Inf")
            got = got.astype(dtype, copy=False)
            if normalize:
                got = self._check(got, self.files[i], 0, dtype=dtype, normalize=True, unit_norm=False, atol=np.inf)
            out[slots[order]] = got
        return out

    def load(self, *, keep=None, limit: int | None = None, dtype=np.float32, normalize: bool = False,
             unit_norm: bool = False, atol: float = NORM_ATOL) -> np.ndarray:
        """Read and check every row (``limit``: only the first ``limit`` rows) and return them as ``dtype``.

        ``keep``: sorted global row positions to return (every row is still checked); None = all rows.
        Memory stays O(chunk + returned rows).
        """
        keep = None if keep is None else np.asarray(keep, dtype=np.int64)
        starts = self.starts
        parts = []
        for index, _, start, chunk in self._iter(dtype=dtype, normalize=normalize, unit_norm=unit_norm, atol=atol,
                                                 limit=limit):
            lo = int(starts[index]) + start
            if keep is None:
                parts.append(chunk)
            else:
                sel = keep[(keep >= lo) & (keep < lo + len(chunk))] - lo
                parts.append(chunk[sel])
        if not parts:
            return np.zeros((0, self.dim), dtype=dtype)
        return np.concatenate(parts).astype(dtype, copy=False)

    def iter_range(self, lo: int, hi: int, *, chunk_size: int | None = None, dtype=np.float32
                   ) -> Iterator[tuple[Path, int, int, np.ndarray]]:
        """Yield ``(file, first row in the file, first global row, rows)`` for global rows ``[lo, hi)`` in
        chunks that never cross a file, reading only those rows; rows are NaN/Inf-checked (errors name the
        file and row)."""
        size = int(chunk_size or self.chunk_size)
        starts = self.starts
        for index, file in enumerate(self.files):
            f_lo, f_hi = max(lo, int(starts[index])), min(hi, int(starts[index + 1]))
            if f_lo >= f_hi:
                continue
            arr = open_npy(file)
            base = int(starts[index])
            for start in range(f_lo - base, f_hi - base, size):
                stop = min(start + size, f_hi - base)
                chunk = self._check(_as_float(arr[start:stop]), file, start, dtype=dtype, normalize=False,
                                    unit_norm=False, atol=np.inf)
                yield file, start, base + start, chunk

    def head(self, n: int, *, dtype=np.float64) -> np.ndarray:
        """The first ``n`` rows (checked for NaN/Inf)."""
        return self.load(limit=n, dtype=dtype)


def open_embeddings(path: str | os.PathLike | Sequence[str | os.PathLike], *, model_fingerprint: str | None = None,
                    recursive: bool = False, chunk_size: int = DEFAULT_CHUNK) -> EmbeddingFiles:
    """Open an embedding file / folder / glob (or a list of them, read in the given order).

    Checks, without reading rows: every file is a 2-D array of an accepted dtype with the same d; every
    sidecar is valid (see the module's sidecar rule) and all known fingerprints agree. With
    ``model_fingerprint``, a file whose sidecar records another model is refused (files without a
    sidecar are accepted). Raises :class:`EmbeddingFileError` naming the file.
    """
    sources = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[Path] = []
    for src in sources:
        files.extend(list_embedding_files(src, recursive=recursive))
    label = ", ".join(os.fspath(s) for s in sources)
    counts, dtypes, dim = [], [], None
    for f in files:
        arr = open_npy(f)
        if dim is None:
            dim = int(arr.shape[1])
        elif arr.shape[1] != dim:
            raise EmbeddingFileError(f"{f}: dimension mismatch, expected d={dim} (as {files[0]}), got d={arr.shape[1]}")
        counts.append(int(arr.shape[0]))
        dtypes.append(arr.dtype)
    fingerprints = {f: sidecar_fingerprint(read_sidecar(f)) for f in files}
    known = {fp for fp in fingerprints.values() if fp is not None}
    if len(known) > 1:
        listing = {str(f): fp for f, fp in fingerprints.items() if fp is not None}
        raise EmbeddingFileError(f"{label}: files come from different CLIP models: {listing}")
    if model_fingerprint is not None:
        for f, fp in fingerprints.items():
            if fp is not None and fp != model_fingerprint:
                raise EmbeddingFileError(f"{f}: embeddings were computed with {fp!r} (sidecar {find_sidecar(f)}), "
                                         f"not {model_fingerprint!r}")
    return EmbeddingFiles(path=label, files=files, counts=counts, dim=int(dim), dtypes=dtypes,
                          fingerprints=fingerprints, model_fingerprint=next(iter(known), None), chunk_size=chunk_size)


# ------------------------------------------------------------------------------- fit inputs
class EmbeddingInput:
    """One side (text or image) of an aligner fit: a list of parts, each an embedding file or a shard folder.

    ``paths``: ``.npy`` files, folders / globs of them (see :func:`list_embedding_files`) or generated shard
    folders (``manifest.json``; the ``shard_field`` of every sample is read: ``src`` = raw text embeddings,
    needs ``generate --keep-source``). Calling the object yields (n, d) chunks of all parts in order, so it
    is a re-iterable source for :func:`anisogen.align.fit_aligner`. ``parts`` lists ``(label, kind, path)``;
    ``fingerprints`` the model fingerprints recorded with the inputs (sidecars by the module's rule,
    ``manifest.json``). Errors are :class:`EmbeddingFileError` naming the file (and row).
    """

    def __init__(self, side: str, paths: Sequence[str | os.PathLike], *, shard_field: str = "src",
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        self.side, self.shard_field, self.chunk_size = side, shard_field, chunk_size
        self.parts: list[tuple[str, str, Path]] = []
        self.fingerprints: set[str] = set()
        for raw in paths:
            path = Path(raw)
            if path.is_dir() and (path / "manifest.json").is_file():
                from .shards.reader import load_manifest

                manifest = load_manifest(path)
                if manifest.get("model_fingerprint"):
                    self.fingerprints.add(str(manifest["model_fingerprint"]))
                self.parts.append((f"{path} ({shard_field}.npy of the shards)", "shards", path))
                continue
            if path.is_file() and path.suffix.lower() != ".npy":
                raise EmbeddingFileError(f"{path}: expected a .npy file, a folder of .npy files or a shard folder")
            if path.is_dir() and not any(path.glob("*.npy")) and not (path / "img_emb").is_dir():
                raise EmbeddingFileError(f"{path}: folder holds no .npy files and no manifest.json")
            if not path.exists() and not globlib.has_magic(os.fspath(raw)):
                raise EmbeddingFileError(f"{side} input {os.fspath(raw)!r} does not exist")
            source = open_embeddings(raw, chunk_size=chunk_size)
            if source.model_fingerprint:
                self.fingerprints.add(source.model_fingerprint)
            self.parts.extend((str(f), "npy", f) for f in source.files)

    def part_chunks(self, kind: str, path: Path) -> Iterator[np.ndarray]:
        """The stored rows of one part in chunks (not checked; see :meth:`validate`)."""
        if kind == "npy":
            arr = open_npy(path)
            for start in range(0, arr.shape[0], self.chunk_size):
                yield _as_float(arr[start : start + self.chunk_size])
            return
        from .shards.reader import iter_samples

        rows = []
        for sample in iter_samples(path, fields=[self.shard_field]):
            vec = sample[self.shard_field]
            if vec is None:
                raise EmbeddingFileError(f"{path}: sample {sample['key']} has no {self.shard_field}.npy "
                                         "(generate with --keep-source to read raw text embeddings)")
            rows.append(vec)
            if len(rows) == self.chunk_size:
                yield np.stack(rows)
                rows = []
        if rows:
            yield np.stack(rows)

    def __call__(self) -> Iterator[np.ndarray]:
        for _, kind, path in self.parts:
            yield from self.part_chunks(kind, path)

    def validate(self, *, normalize: bool, dim: int | None, normalize_hint: str = "pass normalize=True"
                 ) -> tuple[int, int]:
        """Check every row of every part: finite, d, unit norm unless ``normalize``; returns (rows, d).

        Raises :class:`EmbeddingFileError` naming the file and the row; ``normalize_hint`` replaces
        "pass normalize=True" in the norm error (e.g. ``"pass --normalize"`` for a CLI).
        """
        total = 0
        for label, kind, path in self.parts:
            seen = 0
            for chunk in self.part_chunks(kind, path):
                if dim is None:
                    dim = int(np.asarray(chunk).shape[1]) if np.asarray(chunk).ndim == 2 else None
                try:
                    check_embeddings(chunk, name=label, dim=dim, normalize=normalize, row_offset=seen, min_rows=0)
                except ValueError as exc:
                    msg = str(exc).replace("pass normalize=True", normalize_hint)
                    if "dimension mismatch" in msg:
                        msg += f" (all {self.side} and image/text inputs must share one d)"
                    raise EmbeddingFileError(msg) from None
                seen += len(chunk)
            if seen == 0:
                raise EmbeddingFileError(f"{label}: no rows")
            total += seen
        if dim is None:
            raise EmbeddingFileError(f"{self.side} inputs: no rows")
        return total, int(dim)

    def head(self, n: int) -> np.ndarray:
        """The first ``n`` rows (float64) across parts."""
        out, have = [], 0
        for chunk in self():
            out.append(np.asarray(chunk[: n - have], dtype=np.float64))
            have += len(out[-1])
            if have >= n:
                break
        return np.concatenate(out)
