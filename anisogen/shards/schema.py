"""The on-disk format of a generated shard folder (format version 1).

A shard folder holds::

    shard-000000.tar ...   WebDataset shards, task i -> shard-{i:06d}.tar (one tar per task, gap-free)
    manifest.json          run description + one entry per published shard (see below)
    sizes.json             {"shard-000000.tar": nsamples, ...}  (open_clip's ``get_dataset_size`` convention)
    rejects.jsonl          one JSON object per rejected input record: {"row", "id", "task", "reason"}
    aligner/               the aligner artifact used (config.json + tensors.safetensors)
    records/               per-shard completion records (shard-XXXXXX.json), written after each tar is
                           renamed into place; the manifest is assembled from them

Each sample in a tar has these members (tar member names are ``{key}.{ext}``, written in sorted
extension order with ``mtime=0``, ``uname=gname=anisogen``, mode 0444, so tars are byte-reproducible):

``__key__``  ``s{task:06d}-{row:06d}``: the task index and the record's position inside the task
             (0-based, counting rejected records too). No dots, so webdataset splits names correctly.
``txt``      the source text, UTF-8.
``emb.npy``  the substitute image embedding, shape (d,), unit L2 norm before storage rounding, all values
             finite. Stored as ``float16`` (``fp16``, default), ``float32`` (``fp32``) or bfloat16 bits in a
             ``uint16`` array (``bf16``; numpy has no bfloat16), little endian, ``.npy`` format as
             ``np.save`` writes it; no other dtype (float64 included) is valid. **Shape is (d,) only**:
             (n, d) arrays (several substitute vectors per sample) are reserved for a future format
             version and every reader refuses them with an explicit error.
``src.npy``  optional (``--keep-source``): the raw L2-normalised CLIP text embedding, same dtype and shape rules.
``json``     ``{"id", "row", "n_tokens", "truncated", "model", "aligner"}``: source id (``--id-field`` value,
             else the row number as a string), global 0-based input row, token count including SOT/EOT
             (after truncation), whether the text was truncated to the context length, the CLIP model
             fingerprint and the aligner name.

Decoding: :mod:`anisogen.shards.decode` is the one decoder of these members
(:func:`~anisogen.shards.decode.decode_member_embedding` -> float32 (d,),
:func:`~anisogen.shards.decode.decode_sample` for ``txt`` (strict UTF-8) / ``json`` (an object) / ``emb`` /
``src``); every violation is a :class:`~anisogen.shards.decode.ShardFormatError` (a ``ValueError``) whose
message is ``"{shard}: sample {key}: {reason}"``. All readers (:mod:`.reader`, ``decode_wds_sample`` for
webdataset, the audit, the trainer) use it. :func:`decode_embedding` below converts in-memory arrays (any
shape; also float64, for user ``.npy`` files), not shard members.

``manifest.json`` keys: ``format``, ``format_version``, ``anisogen_version``, ``status`` (``"running"`` or
``"complete"``), ``config`` (the resolved generation config) and ``config_fingerprint`` (sha256 of its
canonical JSON), ``model_fingerprint``, ``aligner`` (``{"name", "fingerprint"}``), ``dim``, ``dtype``,
``samples_per_shard``, ``num_tasks`` (``null`` while unknown for streaming corpora), ``shards`` (list of
shard entries sorted by task: ``name``, ``task``, ``nsamples``, ``sha256``, ``bytes``, ``key_first``,
``key_last``, ``rows`` = [first, last+1) input rows, ``rejects``, ``reject_reasons``, ``stats``) and
``totals``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any, Mapping

import numpy as np

FORMAT = "anisogen-shards"
FORMAT_VERSION = 1

SHARD_TEMPLATE = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
REJECTS_NAME = "rejects.jsonl"
ALIGNER_DIRNAME = "aligner"
RECORDS_DIRNAME = "records"
#: Suffix of in-progress files; anything ending with it is never a published artifact.
TEMP_SUFFIX = ".tmp"

#: Extensions of a sample's members (webdataset keys).
TEXT_EXT = "txt"
EMB_EXT = "emb.npy"
SRC_EXT = "src.npy"
META_EXT = "json"

#: Storage dtypes of ``emb.npy``/``src.npy``: name -> numpy dtype in the file.
EMB_DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype(np.float16),
    "bf16": np.dtype(np.uint16),  # bfloat16 bit patterns
    "fp32": np.dtype(np.float32),
}

#: Keys of the per-sample ``json`` member.
META_KEYS = ("id", "row", "n_tokens", "truncated", "model", "aligner")

TAR_USER = "anisogen"
TAR_MODE = 0o444
TAR_MTIME = 0

_KEY_RE = re.compile(r"^s(\d{6,})-(\d{6,})$")
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")


# --------------------------------------------------------------------------------- names and keys
def shard_name(task: int) -> str:
    """File name of the shard produced by task ``task``: ``shard-{task:06d}.tar``."""
    if task < 0:
        raise ValueError(f"task index must be >= 0, got {task}")
    return SHARD_TEMPLATE.format(task)


def shard_task(name: str) -> int:
    """Inverse of :func:`shard_name` (accepts a bare name or a path ending in it)."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    m = _SHARD_RE.match(base)
    if not m:
        raise ValueError(f"{name!r} is not a shard name of the form shard-XXXXXX.tar")
    return int(m.group(1))


def make_key(task: int, row_in_task: int) -> str:
    """Sample key ``s{task:06d}-{row_in_task:06d}`` (no dots; sorts in input order for < 10^6 rows/task)."""
    if task < 0 or row_in_task < 0:
        raise ValueError(f"task and row must be >= 0, got task={task}, row={row_in_task}")
    return f"s{task:06d}-{row_in_task:06d}"


def parse_key(key: str) -> tuple[int, int]:
    """``(task, row_in_task)`` of a key made by :func:`make_key`; ``ValueError`` otherwise."""
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError(f"{key!r} is not an anisogen sample key (expected s<task>-<row>)")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------------------ embedding storage
def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``x``, rounding to nearest even (like torch)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns stored as uint16."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_embedding(x: np.ndarray, dtype: str = "fp16") -> np.ndarray:
    """Cast float32 embeddings (any shape) to the storage dtype ``fp16`` | ``bf16`` | ``fp32``."""
    if dtype not in EMB_DTYPES:
        raise ValueError(f"unknown embedding dtype {dtype!r}; choose one of {sorted(EMB_DTYPES)}")
    x = np.asarray(x, dtype=np.float32)
    if dtype == "fp16":
        return x.astype(np.float16)
    if dtype == "bf16":
        return float32_to_bf16_bits(x)
    return np.ascontiguousarray(x)


def decode_embedding(arr: np.ndarray) -> np.ndarray:
    """float32 view of an in-memory embedding array: float16/float32/float64 are cast, uint16 is read as
    bfloat16 bits. Shard members go through :func:`anisogen.shards.decode.decode_member_embedding`, which
    is stricter (storage dtypes only, shape (d,), finite)."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint16:
        return bf16_bits_to_float32(arr)
    if arr.dtype in (np.float16, np.float32, np.float64):
        return arr.astype(np.float32)
    raise ValueError(f"cannot decode an embedding stored as {arr.dtype} (expected float16, uint16=bf16 or float32)")


def dtype_name(arr: np.ndarray) -> str:
    """Storage dtype name (``fp16``/``bf16``/``fp32``) of an array read from ``emb.npy``."""
    for name, dt in EMB_DTYPES.items():
        if np.asarray(arr).dtype == dt:
            return name
    raise ValueError(f"dtype {np.asarray(arr).dtype} is not an anisogen storage dtype")


# ------------------------------------------------------------------------------- member encoding
_NPY_HEADERS: dict[tuple, bytes] = {}


def npy_header(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header (magic, version 1.0, dict, padding) that ``np.save`` writes for an array of
    ``dtype`` and ``shape`` in C order; the array's raw bytes follow it. Cached per (dtype, shape).
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    key = (dtype.str, shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        probe = np.zeros(shape, dtype=dtype)
        buf = io.BytesIO()
        np.save(buf, probe, allow_pickle=False)
        data = buf.getvalue()
        header = data[: len(data) - probe.nbytes]
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[key] = header
    return header


def npy_bytes(arr: np.ndarray) -> bytes:
    """Deterministic ``.npy`` bytes of ``arr`` (numpy format 1.0, C order); exactly what ``np.save`` writes.

    The header depends only on dtype and shape and is cached (building it is ~10x the cost of the data).
    """
    arr = np.ascontiguousarray(arr)
    return npy_header(arr.dtype, arr.shape) + arr.tobytes()


def npy_load(data: bytes) -> np.ndarray:
    """Parse any ``.npy`` bytes with numpy (never unpickles); readers of shard members use
    :func:`anisogen.shards.decode.decode_member_embedding` instead."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys and no ASCII escaping: the canonical text used for hashes and members."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(obj: Any) -> str:
    """sha256 hex of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def sample_members(
    key: str,
    text: str,
    emb: np.ndarray,
    meta: Mapping[str, Any],
    src: np.ndarray | None = None,
) -> dict[str, Any]:
    """The webdataset sample dict (all values bytes) for one record.

    ``emb``/``src`` must already be in storage dtype (see :func:`encode_embedding`), shape (d,).
    ``meta`` must hold exactly :data:`META_KEYS`.
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot")
    missing = set(META_KEYS) - set(meta)
    extra = set(meta) - set(META_KEYS)
    if missing or extra:
        raise ValueError(f"sample {key}: json metadata keys mismatch (missing {sorted(missing)}, "
                         f"extra {sorted(extra)})")
    sample: dict[str, Any] = {
        "__key__": key,
        TEXT_EXT: text.encode("utf-8"),
        EMB_EXT: npy_bytes(emb),
        META_EXT: canonical_json(dict(meta)).encode("utf-8"),
    }
    if src is not None:
        sample[SRC_EXT] = npy_bytes(src)
    return sample
