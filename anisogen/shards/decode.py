"""Decoding shard members: the single place that knows the per-sample format rules.

Every reader (the fast mmap reader in :mod:`.reader`, ``decode_wds_sample`` for webdataset pipelines,
the audit and the trainer) goes through :func:`decode_member_embedding` / :func:`decode_sample`, and every
format violation is a :class:`ShardFormatError` naming the shard, the sample key and the reason.

Rules (format version 1, see :mod:`.schema`):

* ``emb.npy`` / ``src.npy``: ``.npy`` bytes (never unpickled) of shape ``(d,)`` with ``d >= 1``, stored as
  ``float16``, ``uint16`` (bfloat16 bit patterns) or ``float32`` (little endian, as ``np.save`` writes them);
  decoded to float32 ``(d,)``; all values finite; ``d == dim`` when a dimension is given. Any other dtype
  (float64 included) is refused. ``(n, d)`` arrays (multi-token substitutes) are reserved for a future
  format version and refused with an explicit error.
* ``txt``: strict UTF-8. ``json``: a UTF-8 JSON object.
"""

from __future__ import annotations

import ast
import json
from typing import Any, Mapping, Sequence

import numpy as np

from .schema import EMB_EXT, META_EXT, SRC_EXT, TEXT_EXT
from ..cli import UserError


class ShardFormatError(UserError):
    """A shard (or one of its samples) violates the format; ``shard``, ``key`` and ``reason`` say where and why."""

    def __init__(self, shard: str, key: str, reason: str):
        self.shard = str(shard)
        self.key = str(key)
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(f"{self.shard}: sample {self.key}: {self.reason}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.shard, self.key, self.reason))


#: Decoded field name -> member extension.
FIELD_EXT: dict[str, str] = {"emb": EMB_EXT, "src": SRC_EXT, "txt": TEXT_EXT, "json": META_EXT}
FIELDS = tuple(FIELD_EXT)

_MAGIC = b"\x93NUMPY"
#: Allowed storage dtypes (dtype.str as ``np.save`` writes them) -> how to turn them into float32.
_STORAGE = {np.dtype("<f2").str: "fp16", np.dtype("<u2").str: "bf16", np.dtype("<f4").str: "fp32"}
_MULTI = ("(n, d) multi-vector embeddings are reserved for a future format version; "
          "format version 1 stores shape (d,)")

#: exact header bytes -> (dtype, d, header length, problem or None); bounded.
_HEADER_CACHE: dict[bytes, tuple[np.dtype | None, int, int, str | None]] = {}
_HEADER_CACHE_MAX = 256


def _parse_npy_header(header: bytes, start: int) -> tuple[np.dtype | None, int, int, str | None]:
    """Slow path: parse the dict of a .npy header (``ast.literal_eval``, like numpy; never unpickles)."""
    try:
        d = ast.literal_eval(header[start:].decode("latin1"))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a format error
        return None, 0, len(header), f"unreadable @EXT@: bad .npy header ({type(exc).__name__})"
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        return None, 0, len(header), "unreadable @EXT@: .npy header is not a descr/fortran_order/shape dict"
    shape = d["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        return None, 0, len(header), f"unreadable @EXT@: bad .npy shape {shape!r}"
    try:
        dtype = np.dtype(d["descr"]) if isinstance(d["descr"], str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.str not in _STORAGE:
        shown = dtype if dtype is not None else d["descr"]
        return None, 0, len(header), (f"@EXT@ is stored as {shown}; expected float16, uint16 (bfloat16 bits) "
                                      "or float32")
    if len(shape) == 2:
        return None, 0, len(header), f"@EXT@ has shape {shape}: {_MULTI}"
    if len(shape) != 1 or shape[0] == 0:
        return None, 0, len(header), f"@EXT@ has shape {shape}, expected (d,) with d >= 1"
    return dtype, int(shape[0]), len(header), None


def npy_layout(data, *, shard: str, key: str, ext: str = EMB_EXT) -> tuple[np.dtype, int, int]:
    """``(storage dtype, d, header length)`` of ``.npy`` member bytes, validated against the format rules.

    Cached per exact header bytes, so the fast path is a slice and a dict lookup.
    """
    if data[:6] != _MAGIC or len(data) < 10:
        raise ShardFormatError(shard, key, f"unreadable {ext}: not .npy data (bad magic)")
    major = data[6]
    if major == 1:
        hlen = 10 + (data[8] | (data[9] << 8))
        start = 10
    elif major in (2, 3) and len(data) >= 12:
        hlen = 12 + int.from_bytes(data[8:12], "little")
        start = 12
    else:
        raise ShardFormatError(shard, key, f"unreadable {ext}: unsupported .npy version {major}")
    if len(data) < hlen:
        raise ShardFormatError(shard, key, f"unreadable {ext}: .npy header cut short")
    header = bytes(data[:hlen])
    hit = _HEADER_CACHE.get(header)
    if hit is None:
        hit = _parse_npy_header(header, start)
        if len(_HEADER_CACHE) < _HEADER_CACHE_MAX:
            _HEADER_CACHE[header] = hit
    dtype, d, hlen, problem = hit
    if problem is not None:
        raise ShardFormatError(shard, key, problem.replace("@EXT@", ext))
    return dtype, d, hlen


def storage_to_float32(arr: np.ndarray) -> np.ndarray:
    """float32 copy of stored values (float16 / uint16 = bf16 bits / float32), any shape."""
    if arr.dtype.kind == "u":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def decode_member_embedding(data, *, shard: str, key: str, ext: str = EMB_EXT, dim: int | None = None) -> np.ndarray:
    """Decode ``emb.npy``/``src.npy`` member bytes into a float32 ``(d,)`` array (see the module rules).

    Raises :class:`ShardFormatError` for unreadable data, a non-storage dtype, a shape other than (d,),
    a payload size that disagrees with the header, NaN/Inf, or ``d != dim``.
    """
    dtype, d, hlen = npy_layout(data, shard=shard, key=key, ext=ext)
    nbytes = d * dtype.itemsize
    if len(data) - hlen != nbytes:
        raise ShardFormatError(shard, key, f"unreadable {ext}: payload is {len(data) - hlen} bytes, the .npy header "
                                           f"says ({d},) {dtype} = {nbytes} bytes")
    if dim is not None and d != dim:
        raise ShardFormatError(shard, key, f"{ext} has shape ({d},), expected ({dim},) (dimension mismatch)")
    out = storage_to_float32(np.frombuffer(data, dtype=dtype, count=d, offset=hlen))
    if not np.isfinite(out).all():
        raise ShardFormatError(shard, key, f"{ext} contains NaN or Inf")
    return out


def decode_text(data, *, shard: str, key: str, ext: str = TEXT_EXT) -> str:
    """Strict UTF-8 text of a ``txt`` member."""
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardFormatError(shard, key, f"{ext} is not valid UTF-8 ({exc})") from None


def decode_json(data, *, shard: str, key: str, ext: str = META_EXT) -> dict:
    """The JSON object of a ``json`` member (UTF-8)."""
    if isinstance(data, dict):
        return data
    try:
        obj = json.loads(data if isinstance(data, str) else bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShardFormatError(shard, key, f"{ext} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ShardFormatError(shard, key, f"{ext} is not a JSON object (got {type(obj).__name__})")
    return obj


def missing_member(shard: str, key: str, ext: str) -> ShardFormatError:
    hint = " (generate with --keep-source)" if ext == SRC_EXT else ""
    return ShardFormatError(shard, key, f"lacks member {ext!r}{hint}")


def check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    fields = tuple(fields)
    bad = [f for f in fields if f not in FIELD_EXT]
    if bad:
        raise ValueError(f"unknown sample field(s) {bad}; choose among {list(FIELD_EXT)}")
    return fields


def decode_sample(members: Mapping[str, Any], *, shard: str, key: str, fields: Sequence[str] = ("emb",),
                  dim: int | None = None) -> dict[str, Any]:
    """Decode the requested ``fields`` (among ``emb``, ``src``, ``txt``, ``json``) of one sample.

    ``members`` maps member extensions (``schema.TEXT_EXT``, ``EMB_EXT``, ``SRC_EXT``, ``META_EXT``) to
    bytes. Returns ``{"key": key, field: value, ...}``: ``emb``/``src`` float32 (d,), ``txt`` str,
    ``json`` dict. A missing requested member raises :class:`ShardFormatError` naming it.
    """
    out: dict[str, Any] = {"key": key}
    for f in check_fields(fields):
        ext = FIELD_EXT[f]
        data = members.get(ext)
        if data is None:
            raise missing_member(shard, key, ext)
        if f == "emb" or f == "src":
            out[f] = decode_member_embedding(data, shard=shard, key=key, ext=ext, dim=dim)
        elif f == "txt":
            out[f] = decode_text(data, shard=shard, key=key, ext=ext)
        else:
            out[f] = decode_json(data, shard=shard, key=key, ext=ext)
    return out
