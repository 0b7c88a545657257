"""Writing shard folders: atomic shard publish, per-shard completion records, manifest assembly.

Publishing protocol for task ``i`` (crash-safe at every step, see docs/GENERATE.md "Resume"):

1. the tar is written to ``shard-{i:06d}.tar.<pid>-<rand>.tmp`` (sha256 computed while writing), fsynced;
2. renamed to ``shard-{i:06d}.tar`` (atomic on POSIX) and the directory is fsynced;
3. ``records/shard-{i:06d}.json`` (entry + rejects + stage timings) is written the same way.

Two writers share this protocol: :func:`write_task_shard` (the generator's path: columns of one task,
formatted in numpy chunks, ~6-8 µs per caption sample on one core) and :func:`write_shard` (any
``sample_members`` dicts through :class:`UstarWriter`); both write the same bytes for the same samples.

A shard counts as published only when its record exists *and* the tar's size and sha256 match it
(:func:`check_published`). ``manifest.json``, ``sizes.json`` and ``rejects.jsonl`` are derived from the
records (:func:`assemble`), always written to a temp name and renamed, ``manifest.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .. import __version__
from .schema import (
    EMB_DTYPES, EMB_EXT, FORMAT, FORMAT_VERSION, MANIFEST_NAME, META_EXT, RECORDS_DIRNAME, REJECTS_NAME, SHARD_GLOB,
    SIZES_NAME, SRC_EXT, TAR_MODE, TAR_MTIME, TAR_USER, TEMP_SUFFIX, TEXT_EXT, canonical_json, make_key, npy_bytes,
    npy_header, shard_name, shard_task,
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
_END_BLOCKS = 2  # two zero blocks end a tar archive


def _octal(n: int, digits: int) -> bytes:
    return b"%0*o\0" % (digits - 1, n)


def _field(text: bytes, length: int) -> bytes:
    return text[:length] + b"\0" * (length - min(len(text), length))


def _tar_trailer(offset: int) -> bytes:
    """End-of-archive blocks plus the zero padding to a whole 10240-byte record, for an archive whose
    members end at ``offset``."""
    end = _END_BLOCKS * _BLOCK
    return b"\0" * (end + (-(offset + end) % _RECORD))


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

    def unsummed_header(self, raw_name: bytes, size: int) -> bytes:
        """The 512-byte header of a member, checksum field still 8 spaces (as the checksum is summed)."""
        if len(raw_name) > 100:
            raise ValueError(f"tar member name {raw_name!r} is longer than 100 bytes")
        return _field(raw_name, 100) + self._head + _octal(size, 12) + self._tail

    def add(self, name: str, data: bytes) -> None:
        header = self.unsummed_header(name.encode("ascii"), len(data))
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
        end = _tar_trailer(self.offset)
        self.offset += len(end)
        self._parts.append(end)
        self._flush()


# ------------------------------------------------------------------------ columnar task shards
#: Characters that ``json.dumps(..., ensure_ascii=False)`` escapes inside a string.
_JSON_ESCAPED = re.compile(r'[\x00-\x1f"\\]')
_TF = ("false", "true")
_SHIFTS11 = np.arange(10, -1, -1, dtype=np.int64) * 3  # octal digits of a 12-byte size field
_SHIFTS6 = np.arange(5, -1, -1, dtype=np.int64) * 3  # octal digits of the checksum
_POW10 = 10 ** np.arange(18, -1, -1, dtype=np.int64)
_WIDE_KEYS = 10 ** np.arange(6, 19, dtype=np.int64)  # a row >= 10**k needs k + 1 key digits
#: A text/json member of more blocks than this is copied on its own rather than through a padded array.
_WIDE_BLOCKS = 8


def _octal_digits(values: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """ASCII octal digits (m, len(shifts)) uint8 of non-negative ints ``values`` (m,)."""
    return (((values[:, None] >> shifts) & 7) + 48).astype(np.uint8)


def _int_column(values: Any, name: str, n: int, shard: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{shard}: {name} has shape {arr.shape}, expected ({n},)")
    if n and arr.dtype.kind not in "iu":
        raise ValueError(f"{shard}: {name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class _Member:
    """One member kind of every sample: its extension, header templates and payload source."""

    def __init__(self, ext: str, *, array: np.ndarray | None = None, size: int | None = None):
        self.ext = ext
        self.array = array  # (n, d) storage-dtype array of an npy member (fixed size); None: text/json
        self.size = size
        self.nblocks = None if size is None else -(-size // _BLOCK)
        self.npy_head: np.ndarray | None = None
        self.templates: dict[int, tuple[np.ndarray, int]] = {}  # key width -> (header template, base sum)


class TaskShardFormatter:
    """The tar bytes of one task's shard, built from columns in chunks of whole samples.

    Yields exactly what :class:`UstarWriter` writes for the same samples (``sample_members`` dicts),
    but formats a chunk of samples with a handful of numpy operations over one reused buffer: header
    templates per member kind (only the key digits, the size field and the checksum vary; the checksum
    is the template's byte sum plus the digits' sums), npy members as the cached npy header + the rows
    of the (n, d) array, text and json members through NUL-padded fixed-width byte arrays. When every
    sample of a chunk spans the same blocks (captions and json under 512 bytes) the chunk is one
    (m, bytes per sample) array written with strided copies; otherwise members are scattered block-wise.
    Columns must already be validated (see :func:`write_task_shard`).
    """

    #: Use the strided layout for chunks whose samples all span the same blocks (tests switch it off).
    uniform_fast_path = True

    def __init__(self, task: int, rows_in_task: np.ndarray, texts: Sequence[str], emb: np.ndarray,
                 ids: Sequence[Any], rows: list[int], n_tokens: list[int], truncated: list[bool], model: Any,
                 aligner: Any, src: np.ndarray | None = None, *, chunk: int = 1024):
        self.task = int(task)
        self.rit = rows_in_task
        self.texts, self.ids, self.rows, self.n_tokens, self.truncated = texts, ids, rows, n_tokens, truncated
        self.n = len(rows_in_task)
        self.chunk = max(1, int(chunk))
        self.prefix = f"s{self.task:06d}-".encode("ascii")
        self._tw = UstarWriter(None)
        # '{"aligner":A,"id":"<id>","model":M,"n_tokens":N,"row":R,"truncated":T}' (sorted keys)
        self.json_pre = '{"aligner":' + canonical_json(aligner) + ',"id":'
        self.json_mid = ',"model":' + canonical_json(model) + ',"n_tokens":'
        members = {TEXT_EXT: _Member(TEXT_EXT), META_EXT: _Member(META_EXT)}
        for ext, arr in ((EMB_EXT, emb), (SRC_EXT, src)):
            if arr is not None:
                head = np.frombuffer(npy_header(arr.dtype, arr.shape[1:]), np.uint8)
                row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
                members[ext] = _Member(ext, array=arr, size=len(head) + row_bytes)
                members[ext].npy_head = head
        # member order inside a sample = sorted extension names, exactly like UstarWriter.write
        self.members = [members[ext] for ext in sorted(members)]
        self._buf = np.empty(0, np.uint8)
        self._pad: dict[str, np.ndarray] = {}
        self.offset = 0

    # -------------------------------------------------------------------------- headers
    def _template(self, member: _Member, width: int) -> tuple[np.ndarray, int]:
        t = member.templates.get(width)
        if t is None:
            name = self.prefix + b"\0" * width + b"." + member.ext.encode("ascii")
            raw = self._tw.unsummed_header(name, member.size or 0)
            # the base sum counts the template with its 8-space checksum field but without the key digits
            # and (variable sizes) without the size digits; the chunk adds those per sample
            base = sum(raw) - (0 if member.size is not None else sum(raw[124:135]))
            tmpl = np.frombuffer(raw, np.uint8).copy()
            tmpl[148:156] = np.frombuffer(b"000000\0 ", np.uint8)  # digits overwritten per sample
            t = member.templates[width] = (tmpl, base)
        return t

    def _fill_headers(self, target: np.ndarray, member: _Member, width: int, digits: np.ndarray,
                      keysum: np.ndarray, size_digits: np.ndarray | None, size_sum: np.ndarray | None) -> None:
        """Write complete headers of ``member`` into ``target`` (m', 512), which may be a strided view."""
        tmpl, base = self._template(member, width)
        lp = len(self.prefix)
        target[:] = tmpl
        target[:, lp:lp + width] = digits
        chk = base + keysum
        if size_digits is not None:
            target[:, 124:135] = size_digits
            chk = chk + size_sum
        target[:, 148:154] = _octal_digits(chk, _SHIFTS6)

    def _headers(self, blocks: np.ndarray, member: _Member, h: np.ndarray, groups, sizes: np.ndarray | None):
        """Write the headers of ``member`` at block indices ``h``; ``groups``: [(width, sel, digits, keysum)]."""
        sd = ss = None
        if sizes is not None:
            sd = _octal_digits(sizes, _SHIFTS11)
            ss = sd.sum(axis=1, dtype=np.int64)
        for width, sel, digits, keysum in groups:
            hh = h if sel is None else h[sel]
            hdr = np.empty((len(hh), _BLOCK), np.uint8)
            if sd is not None and sel is not None:
                self._fill_headers(hdr, member, width, digits, keysum, sd[sel], ss[sel])
            else:
                self._fill_headers(hdr, member, width, digits, keysum, sd, ss)
            blocks[hh] = hdr

    # -------------------------------------------------------------------------- payloads
    def _fixed(self, blocks: np.ndarray, member: _Member, h: np.ndarray, lo: int, hi: int) -> None:
        m, nb = hi - lo, member.nblocks
        pad = self._pad.get(member.ext)
        if pad is None or len(pad) < m:
            pad = np.zeros((max(m, self.chunk), nb * _BLOCK), np.uint8)
            pad[:, : len(member.npy_head)] = member.npy_head
            self._pad[member.ext] = pad
        hl = len(member.npy_head)
        pad[:m, hl:member.size] = member.array[lo:hi].reshape(m, -1).view(np.uint8)
        blocks[(h + 1)[:, None] + np.arange(nb)] = pad[:m].reshape(m, nb, _BLOCK)

    def _variable(self, blocks: np.ndarray, items: list[bytes], sizes: np.ndarray, nb: np.ndarray,
                  h: np.ndarray) -> None:
        wide = np.flatnonzero(nb > _WIDE_BLOCKS)
        if len(wide):
            items = list(items)
            flat = blocks.reshape(-1)
            for i in wide.tolist():
                start = (int(h[i]) + 1) * _BLOCK
                end = start + int(nb[i]) * _BLOCK
                flat[start:start + int(sizes[i])] = np.frombuffer(items[i], np.uint8)
                flat[start + int(sizes[i]):end] = 0
                items[i] = b""
            nb = np.where(nb > _WIDE_BLOCKS, 0, nb)
        width = int(nb.max()) if len(nb) else 0
        if width == 0:
            return
        # NUL-padded fixed-width copy of every payload (numpy "S" arrays keep embedded NULs)
        padded = np.array(items, dtype=f"S{width * _BLOCK}").view(np.uint8).reshape(len(items), width, _BLOCK)
        for b in range(width):
            sel = nb > b
            if sel.all():
                blocks[h + 1 + b] = padded[:, b]
            else:
                blocks[h[sel] + 1 + b] = padded[sel, b]

    def _json_items(self, lo: int, hi: int) -> list[bytes]:
        ids = self.ids[lo:hi]
        pre, mid, tf = self.json_pre, self.json_mid, _TF
        cols = zip(ids, self.n_tokens[lo:hi], self.rows[lo:hi], self.truncated[lo:hi])
        try:
            plain = _JSON_ESCAPED.search("".join(ids)) is None
        except TypeError:  # a non-str id
            plain = False
        if plain:  # str ids without characters json escapes: the id goes in verbatim
            pre, mid = pre + '"', '"' + mid
            out = [f'{pre}{i}{mid}{a},"row":{b},"truncated":{tf[c]}}}' for i, a, b, c in cols]
        else:
            out = [f'{pre}{canonical_json(i)}{mid}{a},"row":{b},"truncated":{tf[c]}}}' for i, a, b, c in cols]
        return [s.encode("utf-8") for s in out]

    # -------------------------------------------------------------------------- chunks
    def _key_groups(self, r: np.ndarray):
        """[(width, selection or None, key digits (m', width) uint8, key byte sums (m',))] of rows ``r``."""
        widths = 6 + np.searchsorted(_WIDE_KEYS, r, side="right")  # digits of make_key's {row:06d}
        uniform = len(r) == 0 or bool((widths == widths[0]).all())
        groups = []
        for width in np.unique(widths).tolist():
            sel = None if uniform else widths == width
            rr = r if sel is None else r[sel]
            digits = ((rr[:, None] // _POW10[-width:]) % 10 + 48).astype(np.uint8)
            groups.append((width, sel, digits, digits.sum(axis=1, dtype=np.int64)))  # the prefix is in the template
        return groups

    def format_chunk(self, lo: int, hi: int) -> memoryview:
        """The bytes of samples ``lo:hi`` (a view of a reused buffer, valid until the next call)."""
        m = hi - lo
        r = self.rit[lo:hi]
        payload: dict[str, list[bytes]] = {
            TEXT_EXT: [t.encode("utf-8") for t in self.texts[lo:hi]],
            META_EXT: self._json_items(lo, hi),
        }
        sizes, nbs = {}, {}
        per_sample = np.zeros(m, np.int64)
        for mem in self.members:
            if mem.size is None:
                items = payload[mem.ext]
                sz = np.fromiter(map(len, items), np.int64, count=m)
                sizes[mem.ext], nbs[mem.ext] = sz, (sz + (_BLOCK - 1)) // _BLOCK
                per_sample += 1 + nbs[mem.ext]
            else:
                per_sample += 1 + mem.nblocks
        groups = self._key_groups(r)
        if self.uniform_fast_path and len(groups) == 1 and groups[0][1] is None and all(
                int(nb[0]) <= _WIDE_BLOCKS and (nb == nb[0]).all() for nb in nbs.values()):
            view = self._format_uniform(lo, hi, int(per_sample[0]), groups[0], payload, sizes, nbs)
            self.offset += len(view)
            return view
        ends = np.cumsum(per_sample)
        total = int(ends[-1]) if m else 0
        blocks = self._buffer(total * _BLOCK).reshape(total, _BLOCK)
        h = ends - per_sample  # header block of each sample's first member
        for mem in self.members:
            if mem.size is None:
                self._headers(blocks, mem, h, groups, sizes[mem.ext])
                self._variable(blocks, payload[mem.ext], sizes[mem.ext], nbs[mem.ext], h)
                h = h + 1 + nbs[mem.ext]
            else:
                self._headers(blocks, mem, h, groups, None)
                self._fixed(blocks, mem, h, lo, hi)
                h = h + 1 + mem.nblocks
        self.offset += total * _BLOCK
        return memoryview(self._buf)[: total * _BLOCK]

    def _buffer(self, nbytes: int) -> np.ndarray:
        if len(self._buf) < nbytes:
            self._buf = np.empty(max(nbytes, int(len(self._buf) * 1.25)), np.uint8)
        return self._buf[:nbytes]

    def _format_uniform(self, lo: int, hi: int, per_sample: int, group, payload, sizes, nbs) -> memoryview:
        """Common case: every sample of the chunk spans the same blocks (e.g. all texts and json <= 512
        bytes) and has the same key width, so the chunk is an (m, per_sample * 512) array and every
        member a fixed column range of it: plain strided copies, no gathers or scatters."""
        m = hi - lo
        rows = self._buffer(m * per_sample * _BLOCK).reshape(m, per_sample * _BLOCK)
        width, _, digits, keysum = group
        off = 0
        for mem in self.members:
            data = off + _BLOCK
            if mem.size is None:
                sd = _octal_digits(sizes[mem.ext], _SHIFTS11)
                self._fill_headers(rows[:, off:data], mem, width, digits, keysum, sd, sd.sum(axis=1, dtype=np.int64))
                nb = int(nbs[mem.ext][0])
                if nb:  # NUL-padded fixed-width copy of every payload (numpy "S" arrays keep embedded NULs)
                    padded = np.array(payload[mem.ext], dtype=f"S{nb * _BLOCK}")
                    rows[:, data:data + nb * _BLOCK] = padded.view(np.uint8).reshape(m, nb * _BLOCK)
            else:
                self._fill_headers(rows[:, off:data], mem, width, digits, keysum, None, None)
                nb, hl = mem.nblocks, len(mem.npy_head)
                rows[:, data:data + hl] = mem.npy_head
                rows[:, data + hl:data + mem.size] = mem.array[lo:hi].reshape(m, -1).view(np.uint8)
                rows[:, data + mem.size:data + nb * _BLOCK] = 0
            off = data + nb * _BLOCK
        return memoryview(self._buf)[: rows.size]

    def chunks(self):
        """``(bytes view, samples in it)`` for all samples, then ``(trailer, 0)`` (end blocks + padding)."""
        for lo in range(0, self.n, self.chunk):
            hi = min(lo + self.chunk, self.n)
            yield self.format_chunk(lo, hi), hi - lo
        trailer = _tar_trailer(self.offset)
        self.offset += len(trailer)
        yield memoryview(trailer), 0


def _publish_tar(out_dir: str | os.PathLike, task: int, fill: Callable[[Any, str], tuple[int, Any, Any]],
                 on_event: Callable[[str], None] | None) -> dict[str, Any]:
    """The atomic publish protocol shared by the shard writers: ``fill(hashing_file, shard_name)`` writes
    the tar and returns ``(nsamples, key_first, key_last)``; then fsync, ``before_rename`` event, rename,
    directory fsync. On any exception the temp file is removed and nothing is published."""
    out_dir = Path(out_dir)
    final = out_dir / shard_name(task)
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingWriter(raw)
            n, first, last = fill(hashing, final.name)
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


# ------------------------------------------------------------------------------------ shard files
def write_shard(out_dir: str | os.PathLike, task: int, samples: Iterable[Mapping[str, Any]],
                on_event: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the samples of ``task`` to ``shard-{task:06d}.tar`` atomically.

    ``samples`` are dicts from :func:`anisogen.shards.schema.sample_members` (values are bytes), in
    key order. Returns the shard entry ``{"name", "task", "nsamples", "sha256", "bytes", "key_first",
    "key_last"}``. A crash at any point leaves at most a ``*.tmp`` file, never a partial ``.tar``.
    :func:`write_task_shard` writes the same bytes from columns, ~5x faster.
    """

    def fill(f, name: str):
        n = 0
        first = last = None
        tw = UstarWriter(f)
        for sample in samples:
            key = sample["__key__"]
            if last is not None and key <= last:
                raise ValueError(f"{name}: sample keys must increase, got {key!r} after {last!r}")
            tw.write(dict(sample))
            first = key if first is None else first
            last = key
            n += 1
            if on_event is not None:
                on_event("sample")
        tw.close()
        return n, first, last

    return _publish_tar(out_dir, task, fill, on_event)


def _check_task_columns(task: int, rows_in_task, texts, emb, ids, rows, n_tokens, truncated, src):
    """Validate and normalise the columns of :func:`write_task_shard`; raises ``ValueError`` naming the shard."""
    name = shard_name(task)
    emb = np.asarray(emb)
    n = len(texts)
    lengths = {"rows_in_task": len(rows_in_task), "texts": n, "emb": len(emb), "ids": len(ids), "rows": len(rows),
               "n_tokens": len(n_tokens), "truncated": len(truncated)}
    if src is not None:
        src = np.asarray(src)
        lengths["src"] = len(src)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{name}: column lengths differ: {lengths}")
    storage = tuple(EMB_DTYPES.values())
    for label, arr in (("emb", emb), ("src", src)):
        if arr is None:
            continue
        if arr.ndim != 2:
            raise ValueError(f"{name}: {label} must be a 2-D (n, d) array, got shape {arr.shape}")
        if arr.dtype not in storage:
            raise ValueError(f"{name}: {label} dtype {arr.dtype} is not a storage dtype (float16, uint16 bf16 bits, "
                             "float32; see encode_embedding)")
    emb = np.ascontiguousarray(emb)
    src = None if src is None else np.ascontiguousarray(src)
    rit = _int_column(rows_in_task, "rows_in_task", n, name)
    rows = _int_column(rows, "rows", n, name).tolist()
    n_tokens = _int_column(n_tokens, "n_tokens", n, name).tolist()
    truncated = np.asarray(truncated).astype(bool).tolist()
    if n:
        if int(rit.min()) < 0:
            raise ValueError(f"{name}: rows_in_task must be >= 0, got {int(rit.min())}")
        # keys compare as strings; for rows < 10**6 (fixed width) that is numeric order
        if int(rit.max()) < 10**6:
            bad = np.flatnonzero(np.diff(rit) <= 0)
            bad = int(bad[0]) + 1 if len(bad) else None
        else:
            keys = [make_key(task, r) for r in rit.tolist()]
            bad = next((i for i in range(1, n) if keys[i] <= keys[i - 1]), None)
        if bad is not None:
            raise ValueError(f"{name}: sample keys must increase, got {make_key(task, int(rit[bad]))!r} after "
                             f"{make_key(task, int(rit[bad - 1]))!r}")
    return rit, list(texts), emb, list(ids), rows, n_tokens, truncated, src


def write_task_shard(out_dir: str | os.PathLike, task: int, *, rows_in_task: Sequence[int] | np.ndarray,
                     texts: Sequence[str], emb: np.ndarray, ids: Sequence[str], rows: Sequence[int] | np.ndarray,
                     n_tokens: Sequence[int] | np.ndarray, truncated: Sequence[bool] | np.ndarray, model: str,
                     aligner: str, src: np.ndarray | None = None, on_event: Callable[[str], None] | None = None,
                     chunk: int = 1024) -> dict[str, Any]:
    """Write the shard of ``task`` from columns, atomically: the fast path of the generator.

    Sample ``i`` is ``sample_members(make_key(task, rows_in_task[i]), texts[i], emb[i], meta_i, src[i])``
    with ``meta_i = {"id": ids[i], "row": rows[i], "n_tokens": n_tokens[i], "truncated": truncated[i],
    "model": model, "aligner": aligner}``, and the file is byte for byte what
    ``write_shard(out_dir, task, those samples)`` writes, with the same publish protocol (temp file,
    sha256 while writing, fsync, rename, directory fsync) and the same ``on_event`` calls: ``"sample"``
    once per sample (after the chunk holding it is written), then ``"before_rename"``.

    ``rows_in_task``, ``rows``, ``n_tokens``: integers (``rows_in_task`` strictly increasing, >= 0);
    ``truncated``: bools; ``emb``/``src``: (n, d) arrays already in storage dtype (float16, uint16 bf16
    bits or float32, see :func:`~anisogen.shards.schema.encode_embedding`); ``model``, ``aligner``: the
    same for every sample. Column lengths must agree. Bad columns raise ``ValueError`` naming the shard
    before any file is created. Samples are formatted ``chunk`` at a time. Returns the shard entry like
    :func:`write_shard`.
    """
    cols = _check_task_columns(task, rows_in_task, texts, emb, ids, rows, n_tokens, truncated, src)
    rit, texts, emb, ids, rows, n_tokens, truncated, src = cols
    fmt = TaskShardFormatter(task, rit, texts, emb, ids, rows, n_tokens, truncated, model, aligner, src, chunk=chunk)

    def fill(f, name: str):
        for data, k in fmt.chunks():
            f.write(data)
            if on_event is not None:
                for _ in range(k):
                    on_event("sample")
        n = fmt.n
        return n, (make_key(task, int(rit[0])) if n else None), (make_key(task, int(rit[-1])) if n else None)

    return _publish_tar(out_dir, task, fill, on_event)


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
