"""Reading shard folders written by the generator (used by the trainer, the audit and the tests).

Two ways in:

* plain Python, no webdataset needed: :func:`iter_samples` / :func:`read_embeddings` walk the tars in
  task order with :mod:`tarfile`;
* webdataset pipelines: :func:`shard_urls` gives the URLs in manifest order and :func:`decode_wds_sample`
  turns a raw webdataset sample (``{"__key__", "txt": bytes, "emb.npy": bytes, ...}``) into decoded
  values, e.g. ``wds.WebDataset(shard_urls(d), shardshuffle=False).map(decode_wds_sample)``.

Decoded samples are dicts ``{"key": str, "text": str, "emb": float32 (d,), "src": float32 (d,) or None,
"meta": dict}``; embeddings of any storage dtype (fp16 / bf16-as-uint16 / fp32) come back as float32.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .schema import (
    EMB_EXT, FORMAT, MANIFEST_NAME, META_EXT, REJECTS_NAME, SRC_EXT, TEXT_EXT, decode_embedding, npy_load, parse_key,
)


class IncompleteRunError(RuntimeError):
    """The shard folder's manifest says the generation run has not finished."""


# ------------------------------------------------------------------------------------- manifest
def load_manifest(folder: str | os.PathLike, *, require_complete: bool = True) -> dict[str, Any]:
    """Read ``folder/manifest.json``.

    Raises ``FileNotFoundError`` when absent, ``ValueError`` when it is not an anisogen manifest, and
    :class:`IncompleteRunError` when ``require_complete`` and the run is still ``"running"`` (a crashed or
    ongoing run: rerun the generator to finish it).
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME}; not a generated shard folder (or the run never started)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if require_complete and manifest.get("status") != "complete":
        n = len(manifest.get("shards", []))
        raise IncompleteRunError(
            f"{folder}: generation is not complete ({n} of {manifest.get('num_tasks')} shards published); "
            "rerun the same generate command to finish it"
        )
    return manifest


def shard_urls(folder: str | os.PathLike, manifest: dict | None = None, *, require_complete: bool = True) -> list[str]:
    """Absolute paths of the shards listed in the manifest, in task order."""
    manifest = manifest or load_manifest(folder, require_complete=require_complete)
    root = Path(folder).resolve()
    return [str(root / entry["name"]) for entry in manifest["shards"]]


def read_rejects(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of ``rejects.jsonl`` (``row``, ``task``, ``id``, ``reason``, ``detail``)."""
    path = Path(folder) / REJECTS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------- samples
def _split_member(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    prefix = name[: len(name) - len(base)]
    if "." not in base:
        raise ValueError(f"tar member {name!r} has no extension")
    stem, ext = base.split(".", 1)
    return prefix + stem, ext


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar: ``{"__key__": key, ext: bytes, ...}``, grouped like webdataset does."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_member(member.name)
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": str(path)}
            if ext in current:
                raise ValueError(f"{path}: duplicate member {member.name!r}")
            current[ext] = data
    if current is not None:
        yield current


def decode_wds_sample(sample: dict[str, Any], *, fields: Sequence[str] | None = None) -> dict[str, Any]:
    """Decode a raw sample (bytes values, as produced by webdataset or :func:`iter_tar_samples`).

    Returns ``{"key", "text", "emb", "src", "meta"}`` (``src`` is ``None`` if absent). ``fields`` limits
    decoding to a subset of ``("text", "emb", "src", "meta")`` to save time.
    """
    want = set(fields) if fields is not None else {"text", "emb", "src", "meta"}
    key = sample["__key__"]
    out: dict[str, Any] = {"key": key}
    try:
        if "text" in want:
            out["text"] = sample[TEXT_EXT].decode("utf-8") if isinstance(sample[TEXT_EXT], bytes) else sample[TEXT_EXT]
        if "emb" in want:
            out["emb"] = decode_embedding(npy_load(sample[EMB_EXT]))
        if "src" in want:
            out["src"] = decode_embedding(npy_load(sample[SRC_EXT])) if SRC_EXT in sample else None
        if "meta" in want:
            raw = sample[META_EXT]
            out["meta"] = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    except KeyError as exc:
        raise ValueError(f"sample {key!r} ({sample.get('__url__', '?')}) lacks member {exc.args[0]!r}") from None
    return out


def iter_samples(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    decode: bool = True,
    fields: Sequence[str] | None = None,
    require_complete: bool = True,
) -> Iterator[dict[str, Any]]:
    """Samples of a shard folder (manifest order) or of an explicit list of tar paths.

    ``decode=False`` yields raw byte dicts (see :func:`iter_tar_samples`).
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        paths: Iterable = shard_urls(source, require_complete=require_complete)
    elif isinstance(source, (str, os.PathLike)):
        paths = [source]
    else:
        paths = source
    for path in paths:
        for raw in iter_tar_samples(path):
            yield decode_wds_sample(raw, fields=fields) if decode else raw


def read_embeddings(
    folder: str | os.PathLike,
    *,
    field: str = "emb",
    limit: int | None = None,
    with_keys: bool = False,
    with_text: bool = False,
) -> np.ndarray | tuple:
    """All embeddings of a shard folder as one float32 (N, d) array, in key order.

    ``field`` is ``"emb"`` (substitutes) or ``"src"`` (raw text embeddings, needs ``--keep-source``).
    With ``with_keys``/``with_text`` returns a tuple ``(array, keys[, texts])`` (or ``(array, texts)``).
    """
    if field not in ("emb", "src"):
        raise ValueError(f"field must be 'emb' or 'src', got {field!r}")
    manifest = load_manifest(folder)
    total = int(manifest["totals"]["samples"])
    n = total if limit is None else min(total, int(limit))
    dim = int(manifest["dim"])
    arr = np.empty((n, dim), dtype=np.float32)
    keys: list[str] = []
    texts: list[str] = []
    want = [field] + (["text"] if with_text else [])
    i = 0
    if n:
        for sample in iter_samples(folder, fields=want):
            vec = sample[field]
            if vec is None:
                raise ValueError(f"{folder}: sample {sample['key']} has no {field}.npy (generate with --keep-source)")
            arr[i] = vec
            if with_keys:
                keys.append(sample["key"])
            if with_text:
                texts.append(sample["text"])
            i += 1
            if i == n:
                break
    if i != n:
        raise ValueError(f"{folder}: manifest lists {n} samples but the shards hold {i}")
    if not (with_keys or with_text):
        return arr
    out: tuple = (arr,)
    if with_keys:
        out += (keys,)
    if with_text:
        out += (texts,)
    return out


def verify_folder(folder: str | os.PathLike, *, check_hash: bool = True) -> dict[str, Any]:
    """Check a complete shard folder end to end; returns ``{"shards", "samples", "keys"}`` counts.

    Verifies for every manifest entry: the tar exists, its size/sha256 match, it parses as a tar whose
    samples have all members, the sample count equals ``nsamples``, keys are unique, belong to the
    shard's task, increase, and span exactly ``[key_first, key_last]``. ``sizes.json`` must agree.
    Raises ``ValueError`` naming the first problem.
    """
    from .writer import file_sha256

    folder = Path(folder)
    manifest = load_manifest(folder)
    sizes = json.loads((folder / "sizes.json").read_text(encoding="utf-8"))
    seen: set[str] = set()
    total = 0
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        if not path.is_file():
            raise ValueError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise ValueError(f"{path}: size {path.stat().st_size} != manifest {entry['bytes']}")
        if check_hash and file_sha256(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the manifest")
        keys = []
        for raw in iter_tar_samples(path):
            decode_wds_sample(raw)
            task, _ = parse_key(raw["__key__"])
            if task != entry["task"]:
                raise ValueError(f"{path}: key {raw['__key__']} belongs to task {task}")
            keys.append(raw["__key__"])
        if len(keys) != entry["nsamples"] or sizes.get(entry["name"]) != entry["nsamples"]:
            raise ValueError(f"{path}: holds {len(keys)} samples, manifest {entry['nsamples']}, "
                             f"sizes.json {sizes.get(entry['name'])}")
        if keys != sorted(keys) or (keys and (keys[0] != entry["key_first"] or keys[-1] != entry["key_last"])):
            raise ValueError(f"{path}: keys out of order or outside [{entry['key_first']}, {entry['key_last']}]")
        dup = seen.intersection(keys)
        if dup:
            raise ValueError(f"{path}: duplicate keys {sorted(dup)[:3]}")
        seen.update(keys)
        total += len(keys)
    if total != manifest["totals"]["samples"]:
        raise ValueError(f"{folder}: shards hold {total} samples, manifest totals say {manifest['totals']['samples']}")
    return {"shards": len(manifest["shards"]), "samples": total, "keys": len(seen)}
