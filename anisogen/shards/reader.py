"""Reading shard folders written by the generator (used by the trainer, the audit and the tests).

Three ways in:

* the fast reader: :func:`read_shard` (columns: keys + one float32 (n, d) array + optional txt/json/src
  lists) and :func:`iter_shard` (one dict per sample) walk the ustar headers of a memory-mapped tar
  themselves, check every header checksum, truncation, member completeness and every requested member
  through :func:`~anisogen.shards.decode.decode_sample`, and raise
  :class:`~anisogen.shards.decode.ShardFormatError` naming the shard and the sample key;
* plain Python, no webdataset needed: :func:`iter_samples` / :func:`read_embeddings` walk a folder's tars
  in task order with the fast reader (:func:`iter_tar_samples` is the :mod:`tarfile` reference reader);
* webdataset pipelines: :func:`shard_urls` gives the URLs in manifest order and :func:`decode_wds_sample`
  turns a raw webdataset sample (``{"__key__", "txt": bytes, "emb.npy": bytes, ...}``) into decoded
  values, e.g. ``wds.WebDataset(shard_urls(d), shardshuffle=False).map(decode_wds_sample)``.

Decoded samples are dicts ``{"key": str, "text": str, "emb": float32 (d,), "src": float32 (d,) or None,
"meta": dict}``; embeddings of any storage dtype (fp16 / bf16-as-uint16 / fp32) come back as float32.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .decode import (
    FIELD_EXT, ShardFormatError, check_fields, decode_json, decode_member_embedding, decode_sample, decode_text,
    missing_member, npy_layout, storage_to_float32,
)
from .schema import FORMAT, MANIFEST_NAME, REJECTS_NAME, SRC_EXT, parse_key
from ..cli import UserError


class IncompleteRunError(UserError, RuntimeError):
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
        raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME}; not a generated shard folder "
                                "(or the run never started)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); the shard folder's manifest is damaged "
                         "(regenerate the folder: generate.py with --overwrite)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        manifest = manifest if isinstance(manifest, dict) else {}
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
    decoding to a subset of ``("text", "emb", "src", "meta")`` to save time. Decoding goes through
    :func:`~anisogen.shards.decode.decode_sample`; bad members raise
    :class:`~anisogen.shards.decode.ShardFormatError` (a ``ValueError``) naming ``__url__`` and the key.
    """
    want = set(fields) if fields is not None else {"text", "emb", "src", "meta"}
    key = sample["__key__"]
    names = [name for name, field in (("emb", "emb"), ("text", "txt"), ("meta", "json")) if name in want]
    fieldnames = [{"emb": "emb", "text": "txt", "meta": "json"}[n] for n in names]
    has_src = "src" in want and sample.get(SRC_EXT) is not None
    if has_src:
        fieldnames.append("src")
    got = decode_sample(sample, shard=str(sample.get("__url__", "?")), key=key, fields=fieldnames)
    out: dict[str, Any] = {"key": key}
    if "text" in want:
        out["text"] = got["txt"]
    if "emb" in want:
        out["emb"] = got["emb"]
    if "src" in want:
        out["src"] = got["src"] if has_src else None
    if "meta" in want:
        out["meta"] = got["json"]
    return out


# ------------------------------------------------------------------------------- the fast reader
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (ord("0"), 0)
_POSIX_MAGIC = b"ustar\0"
_UNSUPPORTED = {ord("x"): "pax extended header", ord("g"): "pax global header", ord("L"): "GNU long name",
                ord("K"): "GNU long link name"}


def _member_name(hdr: bytes) -> bytes:
    name = hdr[:100]
    i = name.find(b"\0")
    if i >= 0:
        name = name[:i]
    if hdr[257:263] == _POSIX_MAGIC and hdr[345]:  # POSIX ustar: the prefix field (GNU tars use 345: otherwise)
        prefix = hdr[345:500]
        i = prefix.find(b"\0")
        if i >= 0:
            prefix = prefix[:i]
        name = prefix + b"/" + name
    return name


def _key_of_header(hdr: bytes) -> str:
    """Best-effort sample key of a (possibly damaged) header, for error messages."""
    name = _member_name(hdr).decode("utf-8", "replace")
    base = name.rsplit("/", 1)[-1]
    return (name[: len(name) - len(base)] + base.split(".", 1)[0]) or "?"


_OCT11 = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_LANES = np.uint64(0x00FF00FF00FF00FF)


def _next_blocks(blocks: np.ndarray) -> np.ndarray:
    """For every 512-byte block read as a tar header: the index of the block after its payload, from the
    standard size field (11 octal digits + NUL/space); -2 where the field is not standard (parsed by
    Python if the header chain reaches it), -1 for zero-name blocks."""
    f = blocks[:, 124:136]
    digits = f[:, :11].astype(np.int64) - 48
    std = ((digits >= 0) & (digits <= 7)).all(axis=1) & ((f[:, 11] == 0) | (f[:, 11] == 32))
    size = digits @ _OCT11
    nxt = np.arange(1, len(blocks) + 1, dtype=np.int64) + (size + _BLOCK - 1) // _BLOCK
    nxt[~std] = -2
    nxt[blocks[:, 0] == 0] = -1
    return nxt


def _size_field(hdr: bytes, shard: str, off: int) -> int:
    field = hdr[124:136]
    i = field.find(b"\0")
    if i >= 0:
        field = field[:i]
    try:
        return int(field.strip() or b"0", 8)
    except ValueError:
        raise ShardFormatError(shard, _key_of_header(hdr), f"tar header at byte {off} has a bad size "
                                                           f"field {hdr[124:136]!r}") from None


def _walk_tar(mm, shard: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of a tar held in ``mm`` (bytes-like): ``[(key, {ext: (payload offset, size)}), ...]``.

    Groups consecutive members by key like webdataset, skips non-regular members (directories, links),
    and raises :class:`ShardFormatError` for truncation (a header or payload past the end of the file, or
    no end-of-archive block), a bad size field, unsupported pax/GNU headers, a member without an
    extension or with a non-UTF-8 name, a duplicate member, and a header checksum mismatch.

    How: the size field of *every* 512-byte block is parsed at once with numpy (as if it were a header),
    which gives each would-be header its successor; following that chain from block 0 is a cheap Python
    loop; names, type flags and checksums of the headers on the chain are then read vectorised.
    """
    n = len(mm)
    nfull = n // _BLOCK
    u8 = np.frombuffer(mm, dtype=np.uint8)
    try:
        blocks = u8[: nfull * _BLOCK].reshape(nfull, _BLOCK)
        nxt = _next_blocks(blocks).tolist()
        chain: list[int] = []
        b = 0
        append = chain.append
        while True:
            if b >= nfull:
                last = _key_of_header(bytes(blocks[chain[-1]])) if chain else "(none: first header)"
                off = b * _BLOCK
                if off < n:
                    hdr = bytes(mm[off:n])
                    key = _key_of_header(hdr) if len(hdr) >= 100 and hdr[0] else f"after {last}"
                    raise ShardFormatError(shard, key, f"truncated tar: header at byte {off} is cut "
                                                       f"({n - off} of {_BLOCK} bytes)")
                raise ShardFormatError(shard, last, "truncated tar: the file ends without an end-of-archive block")
            c = nxt[b]
            if c < 0:
                off = b * _BLOCK
                hdr = bytes(mm[off:off + _BLOCK])
                if c == -1:
                    if hdr == _ZERO_BLOCK:
                        break
                    last = _key_of_header(bytes(blocks[chain[-1]])) if chain else "(none: first header)"
                    raise ShardFormatError(shard, f"after {last}", f"tar header at byte {off} has an empty name")
                size = _size_field(hdr, shard, off)
                c = b + 1 + (size + _BLOCK - 1) // _BLOCK
            append(b)
            if c > nfull:
                hdr = bytes(blocks[b])
                size = _size_field(hdr, shard, b * _BLOCK)
                need = (b + 1) * _BLOCK + size
                raise ShardFormatError(shard, _key_of_header(hdr), f"truncated tar: member "
                                       f"{_member_name(hdr).decode('utf-8', 'replace')!r} needs bytes up to "
                                       f"{max(need, c * _BLOCK)}, the file has {n}")
            b = c
        if not chain:
            return []
        hb = np.asarray(chain, dtype=np.int64)
        heads = blocks[hb]
        _check_header_sums(heads, hb, shard)
        types = heads[:, 156]
        regular = (types == 48) | (types == 0)
        if not regular.all():
            for t, label in _UNSUPPORTED.items():
                if (types == t).any():
                    j = int(np.argmax(types == t))
                    raise ShardFormatError(shard, _key_of_header(bytes(heads[j])),
                                           f"unsupported tar member type: {label}")
            hb, heads = hb[regular], heads[regular]
        sizes = ((heads[:, 124:135].astype(np.int64) - 48) @ _OCT11).tolist()
        std = (((heads[:, 124:135] >= 48) & (heads[:, 124:135] <= 55)).all(axis=1)
               & ((heads[:, 135] == 0) | (heads[:, 135] == 32)))
        if not std.all():
            for j in np.flatnonzero(~std).tolist():
                sizes[j] = _size_field(bytes(heads[j]), shard, int(hb[j]) * _BLOCK)
        raw_names = np.ascontiguousarray(heads[:, :100]).view("S100").ravel().tolist()
        prefixed = (heads[:, 345] != 0) & (heads[:, 257:263] == np.frombuffer(_POSIX_MAGIC, np.uint8)).all(axis=1)
        if prefixed.any():
            for j in np.flatnonzero(prefixed).tolist():
                raw_names[j] = _member_name(bytes(heads[j]))
        try:
            joined = b"\n".join(raw_names).decode("utf-8")
            names = joined.split("\n")
        except UnicodeDecodeError:
            for j, raw in enumerate(raw_names):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ShardFormatError(shard, _key_of_header(bytes(heads[j])),
                                           f"tar member name {raw!r} is not UTF-8") from None
            raise
        if len(names) != len(raw_names) or "\0" in joined:  # a newline or a NUL inside a name: one by one
            names = [r.split(b"\0", 1)[0].decode("utf-8") for r in raw_names]
            joined = "\n".join(names)
        datas = ((hb + 1) * _BLOCK).tolist()
        del heads, blocks
    finally:
        del u8
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the loop below allocates only acyclic tuples/dicts; collections would just rescan them
    try:
        return _group(names, joined, datas, sizes, shard)
    finally:
        if gc_was_enabled:
            gc.enable()


def _group(names: list[str], joined: str, datas: list[int], sizes: list[int], shard: str):
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    cur_key = None
    cur: dict[str, tuple[int, int]] = {}
    if "/" in joined:  # directories in names: the key keeps them, the extension starts at the basename's dot
        parts = []
        for name in names:
            slash = name.rfind("/") + 1
            key, dot, ext = name[slash:].partition(".")
            parts.append((name[:slash] + key, dot, ext))
    else:
        parts = [name.partition(".") for name in names]
    for (key, dot, ext), data, size in zip(parts, datas, sizes):
        if not dot:
            raise ShardFormatError(shard, key, f"tar member {key!r} has no extension")
        if key != cur_key:
            cur = {ext: (data, size)}
            samples.append((key, cur))
            cur_key = key
        elif ext in cur:
            raise ShardFormatError(shard, key, f"duplicate member {key + '.' + ext!r}")
        else:
            cur[ext] = (data, size)
    return samples


def _check_header_sums(heads: np.ndarray, hb: np.ndarray, shard: str) -> None:
    """Every header's checksum field equals the unsigned byte sum of the header with the field as spaces.

    Vectorised over all headers; the field is parsed as octal digits followed by NUL/space terminators
    (what tar writers produce), other spellings (leading spaces) are parsed one by one like tarfile does.
    """
    f8 = heads[:, 148:156]
    expect = heads.sum(axis=1, dtype=np.uint32).astype(np.int64) - f8.sum(axis=1, dtype=np.int64) + 8 * 32
    d = f8.astype(np.int32) - 48
    active = np.logical_and.accumulate((d >= 0) & (d <= 7), axis=1)
    ok = (active | (f8 == 0) | (f8 == 32)).all(axis=1) & active[:, 0]
    stored = np.zeros(len(f8), dtype=np.int64)
    for j in range(8):
        stored = np.where(active[:, j], stored * 8 + d[:, j], stored)
    bad = (stored != expect) | ~ok
    for j in np.flatnonzero(bad).tolist():
        field = bytes(f8[j])
        cut = field.split(b"\0", 1)[0].strip()
        good = False
        if not ok[j] and cut:
            try:
                good = int(cut, 8) == int(expect[j])
            except ValueError:
                pass
        if good:
            continue
        hdr = bytes(heads[j])
        raise ShardFormatError(shard, _key_of_header(hdr), f"tar header at byte {int(hb[j]) * _BLOCK} has a bad "
                               f"checksum (field {field!r}, computed {int(expect[j]):o})")


def _open_map(path) -> tuple[Any, Any]:
    f = open(path, "rb")
    try:
        if os.fstat(f.fileno()).st_size == 0:
            raise ShardFormatError(str(path), "(none)", "empty file, not a tar (truncated shard?)")
        return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        f.close()
        raise


def _close_map(f, mm) -> None:
    try:
        mm.close()
    except BufferError:  # a numpy view is still alive somewhere: the mapping closes when it is freed
        pass
    f.close()


def iter_shard(path: str | os.PathLike, *, fields: Sequence[str] = ("emb",), dim: int | None = None
               ) -> Iterator[dict[str, Any]]:
    """Decoded samples of one tar: ``{"key", field: value, ...}`` for ``fields`` among ``emb``, ``src``
    (float32 (d,)), ``txt`` (str) and ``json`` (dict).

    The whole tar structure (headers, checksums, truncation) is validated before the first sample is
    yielded; each sample's requested members are then decoded by
    :func:`~anisogen.shards.decode.decode_sample` (``dim``: required embedding dimension).
    """
    fields = check_fields(fields)
    exts = [FIELD_EXT[x] for x in fields]
    with ShardView(path) as view:
        for i, key in enumerate(view.keys):
            yield decode_sample(view.raw(i, exts), shard=view.shard, key=key, fields=fields, dim=dim)


def iter_raw_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar through the fast reader: ``{"__key__", "__url__", ext: bytes, ...}`` (the same
    dicts as :func:`iter_tar_samples`, after the structure checks of :func:`iter_shard`)."""
    with ShardView(path) as view:
        for i in range(len(view)):
            yield view.raw(i)


def shard_members(path: str | os.PathLike) -> list[tuple[str, str, int, int]]:
    """``[(key, extension, payload offset, size), ...]`` of one tar's regular members, in tar order, after the
    structure checks of :func:`iter_shard` (the one ustar walker of the package; payloads are not decoded).

    For indexes and key counts (the trainer's). Raises :class:`ShardFormatError` for an empty, truncated or
    malformed tar (not a tar at all, bad checksum, pax/GNU headers, a member without an extension, a
    duplicate member), ``OSError`` when the file cannot be opened. A valid tar without members gives ``[]``.
    """
    with ShardView(path) as view:
        return view.members()


@dataclass
class ShardColumns:
    """Columns of one shard from :func:`read_shard`; fields that were not requested are ``None``."""

    shard: str
    keys: list[str]
    emb: np.ndarray | None = None
    src: np.ndarray | None = None
    txt: list[str] | None = None
    json: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.keys)


def _gather_embeddings(mm, u8: np.ndarray, shard: str, keys: list[str], locs: list[tuple[int, int]], ext: str,
                       dim: int | None) -> np.ndarray:
    """float32 (n, d) rows of the ``ext`` members at ``locs``: one vectorised copy when every member has
    the first member's exact .npy header, else member by member."""
    n = len(locs)
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    o0, s0 = locs[0]
    dtype, d, hlen = npy_layout(mm[o0:o0 + s0], shard=shard, key=keys[0], ext=ext)
    offs = np.fromiter((o for o, _ in locs), dtype=np.int64, count=n)
    sizes = np.fromiter((s for _, s in locs), dtype=np.int64, count=n)
    nbytes = d * dtype.itemsize
    same = bool((sizes == hlen + nbytes).all())
    if same and n > 1:
        ref = u8[o0:o0 + hlen]
        if hlen <= _BLOCK and not (offs % _BLOCK).any():  # payloads start on blocks: take rows of a block view
            blocks = u8[: len(u8) // _BLOCK * _BLOCK].reshape(-1, _BLOCK)
            same = bool((blocks[offs[1:] // _BLOCK, :hlen] == ref).all())
            del blocks
        else:
            same = bool((u8[offs[1:, None] + np.arange(hlen)] == ref).all())
    if not same:
        return np.stack([decode_member_embedding(mm[o:o + s], shard=shard, key=k, ext=ext, dim=dim)
                         for k, (o, s) in zip(keys, locs)])
    if dim is not None and d != dim:
        raise ShardFormatError(shard, keys[0], f"{ext} has shape ({d},), expected ({dim},) (dimension mismatch)")
    step = np.diff(offs)
    if n == 1 or (step == step[0]).all():
        stride = int(step[0]) if n > 1 else nbytes
        stored = np.ndarray((n, d), dtype=dtype, buffer=mm, offset=int(o0 + hlen), strides=(stride, dtype.itemsize))
    else:
        stored = u8[(offs + hlen)[:, None] + np.arange(nbytes)].view(dtype)
    out = storage_to_float32(stored)
    del stored
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        j = int(np.argmin(finite))
        raise ShardFormatError(shard, keys[j], f"{ext} contains NaN or Inf")
    return out


class ShardView:
    """One open shard whose tar structure has been checked (headers, checksums, truncation, duplicate
    members); columns are decoded on demand, for every sample or only for some rows.

    ``with ShardView(path) as view: view.keys, len(view), view.column("emb", dim=512), view.column("json",
    rows=[3, 7])``. Opening raises :class:`ShardFormatError` for a structural problem (the shard as a
    whole is unusable); :meth:`column` raises it for a sample whose member is missing or malformed.
    """

    def __init__(self, path: str | os.PathLike):
        self.shard = str(path)
        self._f, self._mm = _open_map(path)
        try:
            self._samples = _walk_tar(self._mm, self.shard)
        except BaseException:
            _close_map(self._f, self._mm)
            raise
        self.keys = [k for k, _ in self._samples]

    def __len__(self) -> int:
        return len(self._samples)

    def __enter__(self) -> "ShardView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._mm is not None:
            _close_map(self._f, self._mm)
            self._mm = None

    def column(self, field: str, *, rows: Sequence[int] | np.ndarray | None = None, dim: int | None = None):
        """``field`` (``emb``/``src``: float32 (n, d); ``txt``: list of str; ``json``: list of dict) of the
        samples at ``rows`` (sorted positions in the shard; None = every sample), validated as in
        :func:`~anisogen.shards.decode.decode_sample`."""
        (field,) = check_fields((field,))
        mm, shard, ext = self._mm, self.shard, FIELD_EXT[field]
        picked = self._samples if rows is None else [self._samples[int(i)] for i in rows]
        keys = [k for k, _ in picked]
        locs = [m.get(ext) for _, m in picked]
        if None in locs:
            raise missing_member(shard, keys[locs.index(None)], ext)
        if field in ("emb", "src"):
            u8 = np.frombuffer(mm, dtype=np.uint8)
            try:
                return _gather_embeddings(mm, u8, shard, keys, locs, ext, dim)
            finally:
                del u8
        if field == "txt":
            try:
                return [mm[o:o + s].decode("utf-8") for o, s in locs]
            except UnicodeDecodeError:  # name the sample
                return [decode_text(mm[o:o + s], shard=shard, key=k) for k, (o, s) in zip(keys, locs)]
        try:
            loads = json.loads
            objs = [loads(mm[o:o + s].decode("utf-8")) for o, s in locs]
            if not all(type(x) is dict for x in objs):
                raise ValueError
        except ValueError:  # JSONDecodeError and UnicodeDecodeError too: name the sample
            objs = [decode_json(mm[o:o + s], shard=shard, key=k) for k, (o, s) in zip(keys, locs)]
        return objs

    def members(self) -> list[tuple[str, str, int, int]]:
        """``[(key, extension, payload offset, size), ...]`` of every member, in tar order."""
        return [(key, ext, off, size) for key, members in self._samples for ext, (off, size) in members.items()]

    def raw(self, i: int, exts: Sequence[str] | None = None) -> dict[str, Any]:
        """Sample ``i`` as raw member bytes ``{"__key__", "__url__", ext: bytes, ...}`` (only the members in
        ``exts`` when given)."""
        key, members = self._samples[int(i)]
        out: dict[str, Any] = {"__key__": key, "__url__": self.shard}
        mm = self._mm
        for ext in members if exts is None else exts:
            loc = members.get(ext)
            if loc is not None:
                out[ext] = mm[loc[0]:loc[0] + loc[1]]
        return out


def read_shard(path: str | os.PathLike, *, fields: Sequence[str] = ("emb",), dim: int | None = None) -> ShardColumns:
    """Columns of one tar (see :class:`ShardColumns`) with the validation of :func:`iter_shard`.

    ``emb``/``src`` come back as one float32 (n, d) array each, gathered with one vectorised copy from the
    memory map when all members share one .npy header (the generator's layout); ``txt``/``json`` as lists.
    """
    fields = check_fields(fields)
    with ShardView(path) as view:
        cols = ShardColumns(shard=view.shard, keys=view.keys)
        for field in fields:
            setattr(cols, field, view.column(field, dim=dim))
        return cols


def _paths(source, require_complete: bool) -> Iterable:
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return shard_urls(source, require_complete=require_complete)
    if isinstance(source, (str, os.PathLike)):
        return [source]
    return source


def iter_samples(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    decode: bool = True,
    fields: Sequence[str] | None = None,
    require_complete: bool = True,
) -> Iterator[dict[str, Any]]:
    """Samples of a shard folder (manifest order) or of an explicit list of tar paths, read with the fast
    reader (validated like :func:`iter_shard`) and decoded by :func:`decode_wds_sample`.

    ``decode=False`` yields raw byte dicts (see :func:`iter_tar_samples`).
    """
    for path in _paths(source, require_complete):
        for raw in iter_raw_samples(path):
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
    parts: list[np.ndarray] = []
    keys: list[str] = []
    texts: list[str] = []
    want = (field,) + (("txt",) if with_text else ())
    i = 0
    if n:
        for path in shard_urls(folder, manifest):
            cols = read_shard(path, fields=want, dim=dim)
            take = min(len(cols), n - i)
            parts.append(getattr(cols, field)[:take])
            if with_keys:
                keys.extend(cols.keys[:take])
            if with_text:
                texts.extend(cols.txt[:take])
            i += take
            if i == n:
                break
    arr = np.concatenate(parts) if parts else np.empty((0, dim), dtype=np.float32)
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
        for raw in iter_raw_samples(path):
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
