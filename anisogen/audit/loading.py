"""Reading the audit's inputs: generated shard folders, image embeddings and a paired evaluation set.

Every input becomes an :class:`EmbeddingSet`: float32 rows as stored (decoded from fp16/bf16/fp32, *not*
renormalised, so norm statistics can be reported), an optional row-aligned ``src`` (raw text embeddings),
the CLIP model fingerprint and the provenance of every row.

Sources:

* **shard folder** (written by ``pipelines/generate.py``, read through :mod:`anisogen.shards.reader`):
  ``manifest.json`` gives the shards, their sample counts and sha256; each shard is hashed before it is
  read. Image-embedding shard folders use the same format (``emb.npy`` holds the image embedding).
* **``.npy`` file** (N, d) of float16/float32 (or bfloat16 bits as uint16), optionally with a *sidecar*
  ``<stem>.json`` next to it (``images.npy`` -> ``images.json``) holding at least
  ``{"model": "<clip fingerprint>"}`` (``model_fingerprint`` is accepted too; see
  :func:`write_embeddings_npy`). ``pipelines/embed_images.py`` output (``img_emb.npy`` + ``img_emb.json``)
  is exactly this.
* **folder of ``.npy`` files** (e.g. clip-retrieval's ``img_emb_0.npy``, ``img_emb_1.npy``...), read in
  natural name order (``_2`` before ``_10``), each with an optional sidecar.
* **paired set**: an ``.npz`` with arrays ``image`` and ``text`` (sidecar ``<stem>.json``), or a folder
  with ``image.npy`` and ``text.npy`` (sidecars ``image.json`` / ``text.json``), row i of both being the
  same item.

Sampling: ``max_samples`` caps the rows of each source; the kept rows are a seeded uniform sample of
global row positions (positions counted over the shards in manifest order), so the same seed keeps the
same rows whatever the number of shards. ``None`` or 0 keeps every row.

Bad input raises :class:`AuditInputError` naming the file, shard or sample. With ``skip_corrupt`` a
missing, truncated or hash-mismatched shard, or an undecodable / wrong-dimension / NaN-Inf sample, is
skipped instead and recorded in ``EmbeddingSet.skipped`` (shard-level problems drop the whole shard).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import embedding_files as _ef
from ..cli import UserError
from ..embeddings import check_embeddings
from ..shards import ALIGNER_DIRNAME, decode_embedding, load_manifest
from ..shards.schema import MANIFEST_NAME
from ..stats import Moments
from .defaults import ROWS_PER_TASK, SAMPLE_HASH_FRACTION, VERIFY, VERIFY_MODES
from .scan import RowsTask, ShardTask, merge_parts, scan_rows, scan_shard
from .workers import TaskPool


class AuditInputError(UserError):
    """An audit input is missing, corrupt, inconsistent or from another model; the message names it."""


@dataclass
class EmbeddingSet:
    """Rows read from one source.

    ``emb``: float32 (n, d) as stored (not renormalised). ``src``: float32 (n, d) raw text embeddings
    row-aligned with ``emb`` (shard folders with ``src.npy`` only), else None. ``keys``: sample key (or
    ``file:row``) of each row. ``n_total``: rows available before sampling (in readable shards).
    ``skipped``: one dict per skipped shard or sample (``source``, ``shard``, ``key``, ``reason``).
    ``moments`` / ``norms``: float64 moments of the L2-normalised rows and the ``norm_*`` statistics over
    *every* readable row (not only the sample), for inputs scanned by :mod:`.scan` (None for the paired
    set). ``seconds``: CPU-side seconds per scan step summed over tasks (``read``, ``sha256``, ``moments``).
    """

    label: str
    path: str
    kind: str
    emb: np.ndarray
    src: np.ndarray | None = None
    keys: list[str] = field(default_factory=list)
    n_total: int = 0
    model_fingerprint: str | None = None
    aligner: dict | None = None
    manifest: dict | None = None
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    moments: Moments | None = None
    norms: dict | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.emb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    @property
    def aligner_dir(self) -> Path:
        """The aligner the shards were made with: the manifest's ``aligner.dir`` (relative to the folder, or
        the absolute ``--aligner-dir`` of the generate run), else ``<folder>/aligner``."""
        where = (self.aligner or {}).get("dir") or ALIGNER_DIRNAME
        return Path(self.path) / where  # an absolute ``where`` replaces the folder

    def summary(self) -> dict:
        """JSON-ready description (no arrays)."""
        out = {
            "label": self.label, "path": self.path, "kind": self.kind, "n_total": self.n_total,
            "n_sampled": self.n, "d": self.dim, "has_src": self.src is not None,
            "model_fingerprint": self.model_fingerprint, "aligner": self.aligner,
            "skipped_shards": sorted({s["shard"] for s in self.skipped if s.get("key") is None}),
            "skipped_samples": sum(1 for s in self.skipped if s.get("key") is not None),
        }
        if self.manifest is not None:
            out["manifest"] = self.manifest
        return out


def sample_positions(total: int, max_samples: int | None, seed: int) -> np.ndarray | None:
    """Sorted seeded positions to keep out of ``total`` rows, or None to keep every row."""
    if not max_samples or total <= max_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, int(max_samples), replace=False))


# ------------------------------------------------------------------------------------ shard folders
def _manifest_summary(manifest: dict) -> dict:
    return {
        "format_version": manifest.get("format_version"),
        "anisogen_version": manifest.get("anisogen_version"),
        "config_fingerprint": manifest.get("config_fingerprint"),
        "dtype": manifest.get("dtype"),
        "num_shards": len(manifest.get("shards", [])),
        "totals": {k: v for k, v in (manifest.get("totals") or {}).items() if k in ("samples", "rejects", "shards")},
    }


def _hashed_shards(n: int, verify: str, seed: int) -> set[int]:
    """Indices of the shards whose sha256 is checked: all (``full``), a seeded share (``sample``), none."""
    if verify == "full":
        return set(range(n))
    if verify == "none" or n == 0:
        return set()
    m = max(1, math.ceil(n * SAMPLE_HASH_FRACTION))
    return set(np.random.default_rng([seed, 2]).choice(n, m, replace=False).tolist())


def load_shard_folder(path: str | os.PathLike, *, label: str | None = None, max_samples: int | None = None,
                      seed: int = 0, skip_corrupt: bool = False, progress: bool = False, verify: str = VERIFY,
                      pool: TaskPool | None = None) -> EmbeddingSet:
    """Scan a generated shard folder: moments and norms of every row, and a seeded sample of rows.

    Checks, naming the folder/shard/sample in every error: a complete manifest (via
    :func:`anisogen.shards.load_manifest`) consistent with the tars on disk, and per shard what ``verify``
    asks for (:mod:`.scan`): always the tar structure, the sample count and every ``emb.npy`` (shape (d,),
    finite, not zero); sizes unless ``none``; sha256 of every shard (``full``) or of a seeded share
    (``sample``); ``src.npy`` and the ``json`` model fingerprint of every sample (``full``) or of the
    sampled ones. Shards are scanned by ``pool`` (default: in this process).
    """
    folder = Path(path)
    label = label or folder.name
    if verify not in VERIFY_MODES:
        raise AuditInputError(f"--verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    manifest = _read_manifest(folder)
    dim, fingerprint = int(manifest["dim"]), manifest.get("model_fingerprint")
    entries = manifest.get("shards", [])
    _check_manifest_consistency(folder, manifest, entries)
    starts = np.cumsum([0] + [int(e["nsamples"]) for e in entries])
    positions = sample_positions(int(starts[-1]), max_samples, seed)
    hashed = _hashed_shards(len(entries), verify, seed)
    tasks = []
    for i, e in enumerate(entries):
        lo, hi = int(starts[i]), int(starts[i + 1])
        keep = np.arange(hi - lo) if positions is None else _between(positions, lo, hi) - lo
        tasks.append(ShardTask(path=str(folder / e["name"]), name=e["name"], nsamples=int(e["nsamples"]), dim=dim,
                               keep=keep, fingerprint=fingerprint,
                               size=None if verify == "none" or "bytes" not in e else int(e["bytes"]),
                               sha256=e.get("sha256") if i in hashed else None, check_all=verify == "full"))
    skipped: list[dict] = []
    parts = []
    with _pool_or_local(pool) as run:
        for part in run.imap(scan_shard, tasks, desc=f"scan {label}", unit="shard", progress=progress,
                             work=int(starts[-1])):
            for prob in part.problems:
                _shard_problem(folder, prob, skip_corrupt, skipped)
            parts.append(part)
    scan = merge_parts(parts, dim)
    if not scan.keys:
        raise AuditInputError(f"{folder}: no readable samples ({len(skipped)} shards/samples skipped)")
    warnings = []
    if scan.src is None and scan.n_src_rows:
        warnings.append(f"{folder}: only {scan.n_src_rows} of {len(scan.keys)} sampled rows carry src.npy; "
                        "semantic-preservation metrics are skipped")
    return EmbeddingSet(
        label=label, path=str(folder), kind="shards", emb=scan.emb, src=scan.src, keys=scan.keys, n_total=scan.count,
        model_fingerprint=fingerprint, aligner=manifest.get("aligner"), manifest=_manifest_summary(manifest),
        skipped=skipped, warnings=warnings, moments=scan.moments, norms=scan.norms.as_dict(), seconds=scan.seconds,
    )


def _between(sorted_positions: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The entries of a sorted position array in ``[lo, hi)`` (a slice: O(log n) per task, not O(n))."""
    i, j = np.searchsorted(sorted_positions, [lo, hi])
    return sorted_positions[i:j]


def _read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise AuditInputError(f"{folder}: shard folder does not exist")
    try:
        return load_manifest(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AuditInputError(f"{folder / MANIFEST_NAME}: not valid JSON ({exc})") from None
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: IncompleteRunError
        raise AuditInputError(str(exc) if str(folder) in str(exc) else f"{folder}: {exc}") from None


def _shard_problem(folder: Path, prob: dict, skip_corrupt: bool, skipped: list[dict]) -> None:
    """Raise a scan problem as :class:`AuditInputError`, or record it as skipped under ``skip_corrupt``."""
    shard, key, reason = prob["shard"], prob["key"], prob["reason"]
    where = f"{folder / shard}" + (f" sample {key}" if key else "")
    if not skip_corrupt:
        raise AuditInputError(f"{where}: {reason}" + ("" if key else "; pass --skip-corrupt to skip it"))
    skipped.append({"source": str(folder), "shard": shard, "key": key, "reason": reason})


@contextmanager
def _pool_or_local(pool: TaskPool | None):
    if pool is not None:
        yield pool
    else:
        with TaskPool(1) as local:
            yield local


def _check_manifest_consistency(folder: Path, manifest: dict, entries: list[dict]) -> None:
    """The manifest's entries, its ``totals``/``num_tasks`` and the tars on disk must tell one story: an audit of
    a subset that looks like the whole would be silent data loss."""
    names = [e.get("name") for e in entries]
    if len(set(names)) != len(names):
        raise AuditInputError(
            f"{folder / MANIFEST_NAME}: lists a shard twice; regenerate the manifest (rerun generate)"
        )
    totals = manifest.get("totals", {})
    listed = {"shards": len(entries), "samples": sum(int(e.get("nsamples", 0)) for e in entries)}
    for key, value in listed.items():
        if key in totals and int(totals[key]) != value:
            raise AuditInputError(f"{folder / MANIFEST_NAME}: totals say {totals[key]} {key} but the shard entries "
                                  f"add up to {value}; the manifest is inconsistent (rerun generate to rewrite it)")
    if manifest.get("num_tasks") is not None and int(manifest["num_tasks"]) != len(entries):
        raise AuditInputError(f"{folder / MANIFEST_NAME}: a complete run of {manifest['num_tasks']} tasks lists "
                              f"{len(entries)} shards; the manifest is inconsistent (rerun generate to rewrite it)")
    extra = sorted({p.name for p in folder.glob("shard-*.tar")} - set(names))
    if extra:
        raise AuditInputError(f"{folder}: {len(extra)} shard file(s) on disk are not in {MANIFEST_NAME} (e.g. "
                              f"{', '.join(extra[:3])}): auditing only the listed ones would silently skip them; "
                              "move them away or regenerate the folder")


# ------------------------------------------------------------------------------------ .npy inputs
def sidecar_path(npy_path: str | os.PathLike) -> Path:
    """The same-stem sidecar of an embedding file, ``<stem>.json`` (where :func:`write_embeddings_npy` writes)."""
    return _ef.sidecar_path(npy_path)


def read_sidecar(npy_path: str | os.PathLike) -> dict | None:
    """The sidecar JSON of ``npy_path`` by :func:`anisogen.embedding_files.find_sidecar`'s rule (None when
    absent); it must be an object."""
    try:
        return _ef.read_sidecar(npy_path)
    except _ef.EmbeddingFileError as exc:
        raise AuditInputError(str(exc)) from None


def write_embeddings_npy(path: str | os.PathLike, embeddings: np.ndarray, *, model_fingerprint: str | None,
                         **extra: Any) -> Path:
    """Save (N, d) embeddings and their sidecar ``<stem>.json``: :func:`anisogen.embedding_files.write_embeddings`.

    This is the format :func:`load_embedding_file` checks fingerprints with.
    """
    return _ef.write_embeddings(path, embeddings, model_fingerprint=model_fingerprint, **extra)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return _ef.open_npy(path)
    except _ef.EmbeddingFileError as exc:
        raise AuditInputError(str(exc)) from None


def _validated_rows(arr, name: str, dim: int | None = None, keep: np.ndarray | None = None,
                    chunk_size: int = 65536) -> np.ndarray:
    """Check every row of ``arr`` (N, d) (shape, ``dim``, finite; not norms) and return the rows ``keep``.

    ``keep``: sorted row indices to return as float32 (None = all). Errors name ``name`` and the absolute
    row (via :func:`anisogen.embeddings.check_embeddings`); memory stays O(chunk + kept rows).
    """
    kept = []
    for start in range(0, max(arr.shape[0], 1), chunk_size):
        chunk = decode_embedding(np.asarray(arr[start : start + chunk_size]))
        try:
            chunk = check_embeddings(chunk, name=name, dim=dim, atol=np.inf, dtype=np.float32, row_offset=start,
                                     min_rows=0)
        except ValueError as exc:
            raise AuditInputError(str(exc)) from None
        if keep is None:
            kept.append(chunk)
        else:
            local = keep[(keep >= start) & (keep < start + len(chunk))] - start
            kept.append(chunk[local])
    return np.concatenate(kept) if kept else np.zeros((0, arr.shape[1]), dtype=np.float32)


def _fingerprint_of(meta: dict | None) -> str | None:
    """The CLIP fingerprint in a sidecar: key ``model`` (as written by ``pipelines/embed_images.py``) or
    ``model_fingerprint``."""
    return _ef.sidecar_fingerprint(meta)


_natural_key = _ef.natural_key  # sort key putting ``img_emb_2.npy`` before ``img_emb_10.npy``


def _open_embeddings(path: Path) -> "_ef.EmbeddingFiles":
    try:
        return _ef.open_embeddings(path)
    except _ef.EmbeddingFileError as exc:
        raise AuditInputError(str(exc)) from None


def _scan_npy(source: "_ef.EmbeddingFiles", max_samples: int | None, seed: int, pool: TaskPool | None,
              progress: bool, label: str):
    """Scan every row of an opened embedding source in row-range tasks (:func:`.scan.scan_rows`): moments and
    norms of all rows, the seeded sample kept. Any bad row is an :class:`AuditInputError` naming file and row."""
    positions = sample_positions(source.count, max_samples, seed)
    keep = np.arange(source.count) if positions is None else positions
    starts = source.starts
    tasks = []
    for lo in range(0, source.count, ROWS_PER_TASK):
        hi = min(lo + ROWS_PER_TASK, source.count)
        first = int(np.searchsorted(starts, lo, side="right")) - 1  # the files holding rows [lo, hi)
        last = int(np.searchsorted(starts, hi, side="left"))
        tasks.append(RowsTask(files=tuple(str(f) for f in source.files[first:last]), offset=int(starts[first]),
                              lo=lo, hi=hi, keep=_between(keep, lo, hi)))
    parts = []
    with _pool_or_local(pool) as run:
        for part in run.imap(scan_rows, tasks, desc=f"scan {label}", unit="task", progress=progress,
                             work=source.count):
            if part.problems:
                raise AuditInputError(part.problems[0]["reason"])
            parts.append(part)
    return merge_parts(parts, source.dim)


def _npy_set(source: "_ef.EmbeddingFiles", path: Path, kind: str, label: str, scan) -> EmbeddingSet:
    return EmbeddingSet(label=label, path=str(path), kind=kind, emb=scan.emb, keys=scan.keys, n_total=scan.count,
                        model_fingerprint=source.model_fingerprint, moments=scan.moments, norms=scan.norms.as_dict(),
                        seconds=scan.seconds)


def load_embedding_file(path: str | os.PathLike, *, label: str | None = None, max_samples: int | None = None,
                        seed: int = 0, pool: TaskPool | None = None, progress: bool = False) -> EmbeddingSet:
    """One ``.npy`` of (N, d) embeddings plus its optional sidecar (model fingerprint); every row is scanned."""
    path = Path(path)
    _load_npy(path)  # a clear error for a missing or non-.npy file
    source = _open_embeddings(path)
    set_ = _npy_set(source, path, "npy", label or path.stem,
                    _scan_npy(source, max_samples, seed, pool, progress, label or path.stem))
    if _ef.find_sidecar(path) is None:
        set_.warnings.append(f"{path}: no sidecar {sidecar_path(path).name}; its CLIP model cannot be verified")
    return set_


def load_embedding_dir(path: str | os.PathLike, *, label: str | None = None, max_samples: int | None = None,
                       seed: int = 0, pool: TaskPool | None = None, progress: bool = False) -> EmbeddingSet:
    """A folder of ``.npy`` files read as one set, in natural file-name order (clip-retrieval style)."""
    folder = Path(path)
    if not any(folder.glob("*.npy")) and not (folder / "img_emb").is_dir():
        raise AuditInputError(f"{folder}: no manifest.json and no .npy files; not an embedding folder")
    source = _open_embeddings(folder)  # same d in every file, one CLIP model
    set_ = _npy_set(source, folder, "npy-dir", label or folder.name,
                    _scan_npy(source, max_samples, seed, pool, progress, label or folder.name))
    missing = [f.name for f, fp in source.fingerprints.items() if fp is None]
    if missing:
        set_.warnings.append(f"{folder}: {len(missing)} file(s) without a fingerprint sidecar ({missing[:3]}...)")
    return set_


def load_images(path: str | os.PathLike, *, max_samples: int | None = None, seed: int = 0,
                skip_corrupt: bool = False, progress: bool = False, verify: str = VERIFY,
                pool: TaskPool | None = None) -> EmbeddingSet:
    """Image embeddings from a ``.npy`` file, a folder of ``.npy`` files or an image-embedding shard folder."""
    p = Path(path)
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        out = load_shard_folder(p, label="images", max_samples=max_samples, seed=seed, skip_corrupt=skip_corrupt,
                                progress=progress, verify=verify, pool=pool)
        out.src = None
        out.kind = "image-shards"
        return out
    if p.is_dir():
        return load_embedding_dir(p, label="images", max_samples=max_samples, seed=seed, pool=pool,
                                  progress=progress)
    if not p.exists():
        raise AuditInputError(f"{p}: image embeddings not found")
    return load_embedding_file(p, label="images", max_samples=max_samples, seed=seed, pool=pool, progress=progress)


def load_paired(path: str | os.PathLike, *, max_samples: int | None = None, seed: int = 0
                ) -> tuple[EmbeddingSet, EmbeddingSet]:
    """A paired evaluation set: ``(images, texts)`` with row i of both describing the same item."""
    p = Path(path)
    if p.is_dir():
        img_path, txt_path = p / "image.npy", p / "text.npy"
        for f in (img_path, txt_path):
            if not f.is_file():
                raise AuditInputError(f"{p}: paired folder needs image.npy and text.npy; {f.name} is missing")
        image, text = _load_npy(img_path), _load_npy(txt_path)
        prints = {"image": _fingerprint_of(read_sidecar(img_path)), "text": _fingerprint_of(read_sidecar(txt_path))}
        names = (str(img_path), str(txt_path))
    elif p.is_file() and p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as data:
                missing = {"image", "text"} - set(data.files)
                if missing:
                    raise AuditInputError(
                        f"{p}: paired .npz needs arrays 'image' and 'text'; missing {sorted(missing)}"
                    )
                image, text = data["image"], data["text"]
        except (ValueError, OSError, EOFError) as exc:
            if isinstance(exc, AuditInputError):
                raise
            raise AuditInputError(f"{p}: not a readable .npz ({exc})") from None
        meta = read_sidecar(p)
        prints = {"image": _fingerprint_of(meta), "text": _fingerprint_of(meta)}
        names = (f"{p}[image]", f"{p}[text]")
    else:
        raise AuditInputError(f"{p}: paired set must be an .npz with 'image' and 'text' or a folder with "
                              "image.npy and text.npy")
    if image.ndim != 2 or text.ndim != 2:
        raise AuditInputError(f"{p}: paired arrays must be 2-D, got image {image.shape}, text {text.shape}")
    if image.shape[0] != text.shape[0]:
        raise AuditInputError(f"{p}: paired arrays must have the same rows, got image N={image.shape[0]}, "
                              f"text N={text.shape[0]}")
    if image.shape[1] != text.shape[1]:
        raise AuditInputError(f"{p}: dimension mismatch between image d={image.shape[1]} and text d={text.shape[1]}")
    if prints["image"] != prints["text"] and None not in prints.values():
        raise AuditInputError(f"{p}: paired images and texts come from different CLIP models: {prints}")
    positions = sample_positions(image.shape[0], max_samples, seed)
    index = np.arange(image.shape[0]) if positions is None else positions
    sets = []
    for kind, arr, name in (("image", image, names[0]), ("text", text, names[1])):
        s = EmbeddingSet(label=f"paired {kind}", path=name, kind="paired",
                         emb=_validated_rows(arr, name, keep=positions),
                         keys=[f"{kind}:{i}" for i in index], n_total=int(arr.shape[0]),
                         model_fingerprint=prints[kind])
        if prints[kind] is None:
            s.warnings.append(f"{name}: no fingerprint sidecar; its CLIP model cannot be verified")
        sets.append(s)
    return sets[0], sets[1]


# ------------------------------------------------------------------------------- consistency checks
def check_consistency(sets: Sequence[EmbeddingSet]) -> tuple[int, str | None, list[str]]:
    """Refuse inputs of different dimensions or CLIP models; returns ``(d, fingerprint, warnings)``.

    Every set with a known fingerprint must share it; sets without one are accepted with a warning
    (their model cannot be verified).
    """
    dims = {s.label: s.dim for s in sets}
    if len(set(dims.values())) > 1:
        listing = ", ".join(f"{s.label} ({s.path}) d={s.dim}" for s in sets)
        raise AuditInputError(f"dimension mismatch between inputs: {listing}")
    known = {s.label: s.model_fingerprint for s in sets if s.model_fingerprint is not None}
    if len(set(known.values())) > 1:
        listing = "; ".join(f"{s.label} ({s.path}): {s.model_fingerprint!r}" for s in sets
                            if s.model_fingerprint is not None)
        raise AuditInputError(f"inputs come from different CLIP models, refusing to compare them: {listing}")
    warnings = [w for s in sets for w in s.warnings]
    return next(iter(dims.values())), next(iter(known.values()), None), warnings
