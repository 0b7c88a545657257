"""Stage 2: the embedding store, JSONL conversation records, and the record source of the stream."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
from webdataset.utils import pytorch_worker_info

from ..templates import IMAGE_MARKER, TemplateError, normalize_conversation
from .common import RejectLog, SampleError, decode_embedding
from .shard_stream import shard_samples


class EmbeddingStore:
    """Embeddings addressable by shard key (loaded from shards into one array) or by ``.npy`` row.

    ``get(ref)`` returns float32 (n, d) before normalisation, or raises :class:`SampleError`.
    """

    def __init__(self, npy_path: str | None = None, shard_urls: Sequence[str] | None = None, on_error: str = "skip"):
        self.npy_path = npy_path
        self._npy = None
        self._keys: dict[str, int] = {}
        self._table: np.ndarray | None = None
        if npy_path is not None:
            arr = np.load(npy_path, mmap_mode="r", allow_pickle=False)
            if arr.ndim not in (2, 3):
                raise ValueError(f"{npy_path}: embeddings must have shape (N, d) or (N, n, d), got {arr.shape}")
            self.npy_shape = arr.shape
        if shard_urls:
            self._load_shards(shard_urls, RejectLog(on_error))

    def _load_shards(self, shard_urls: Sequence[str], log: RejectLog) -> None:
        rows, keys = [], {}
        for sample in shard_samples(({"url": u} for u in shard_urls), log):
            key = sample["__key__"]
            if "emb.npy" not in sample:
                log.reject(sample["__url__"], key, "missing field 'emb.npy'")
                continue
            try:
                emb = decode_embedding(sample["emb.npy"], name=f"{key} in {sample['__url__']}")
            except SampleError as exc:
                log.reject(sample["__url__"], key, str(exc))
                continue
            if key in keys:
                raise ValueError(f"duplicate shard key {key!r} in {sample['__url__']}")
            keys[key] = len(rows)
            rows.append(emb)
        if rows:
            shapes = {r.shape for r in rows}
            if len(shapes) > 1:
                raise ValueError(f"embeddings in {shard_urls[0]}... have different shapes: {sorted(shapes)}")
            self._table = np.stack(rows)
        self._keys = keys
        self.shard_rejects = log.total

    def _npy_array(self):
        if self._npy is None:
            self._npy = np.load(self.npy_path, mmap_mode="r", allow_pickle=False)
        return self._npy

    @property
    def shape(self) -> tuple[int, int]:
        """(n, d) of one stored embedding."""
        if self._table is not None:
            return int(self._table.shape[1]), int(self._table.shape[2])
        if self.npy_path is not None:
            s = self.npy_shape
            return (1, int(s[1])) if len(s) == 2 else (int(s[1]), int(s[2]))
        raise ValueError("the embedding store is empty")

    def resolve(self, ref) -> tuple[str, Any]:
        """Normalise an image reference to ("key", str) or ("index", int); raise SampleError if malformed."""
        if isinstance(ref, dict):
            if "shard_key" in ref:
                ref = str(ref["shard_key"])
            elif "npy_index" in ref:
                ref = ref["npy_index"]
            else:
                raise SampleError(f"image reference {ref!r} needs 'shard_key' or 'npy_index'")
        if isinstance(ref, bool):
            raise SampleError(f"image reference {ref!r} is not a key or index")
        if isinstance(ref, int):
            return "index", ref
        if isinstance(ref, str):
            return "key", ref
        raise SampleError(f"image reference {ref!r} is not a key or index")

    def check(self, ref) -> None:
        """Raise :class:`SampleError` if ``ref`` does not resolve to a stored embedding."""
        kind, val = self.resolve(ref)
        if kind == "key":
            if self._table is None and not self._keys:
                raise SampleError(f"embedding key {val!r}: no --emb-shards given to look shard keys up in")
            if val not in self._keys:
                raise SampleError(f"missing embedding key {val!r} (not in the embedding shards)")
        else:
            if self.npy_path is None:
                raise SampleError(f"embedding index {val}: no --emb-npy given to look indices up in")
            if not 0 <= val < self.npy_shape[0]:
                raise SampleError(f"embedding index {val} out of range for {self.npy_path} with {self.npy_shape[0]} rows")

    def get(self, ref) -> np.ndarray:
        self.check(ref)
        kind, val = self.resolve(ref)
        if kind == "key":
            return np.asarray(self._table[self._keys[val]], dtype=np.float32)
        return decode_embedding(np.array(self._npy_array()[val]), name=f"row {val}")


def parse_conversation_record(rec, store: EmbeddingStore | None) -> dict:
    """One JSONL object -> ``{"conversation", "image"}``; raises SampleError/TemplateError with the reason.

    ``image`` absent or null and no ``<image>`` marker: a text-only conversation (``"image": None``).
    An ``image`` reference without a marker gets one in front of the first user message (LLaVA
    convention). A marker without an ``image`` reference is an error.
    """
    if not isinstance(rec, dict):
        raise SampleError("a record must be a JSON object")
    conv = normalize_conversation(rec.get("conversations", rec.get("messages")))
    ref = rec.get("image")
    has_marker = any(IMAGE_MARKER in m["content"] for m in conv)
    if ref is None:
        if has_marker:
            raise SampleError(f"the conversation has an {IMAGE_MARKER} marker but the record has no 'image' "
                              "(the embedding reference)")
        return {"conversation": conv, "image": None}
    if not has_marker:
        first_user = next((i for i, m in enumerate(conv) if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError("conversation has no user message")
        conv[first_user] = {"role": "user", "content": IMAGE_MARKER + "\n" + conv[first_user]["content"]}
    if store is None:
        raise SampleError(f"image reference {ref!r}: no embedding store (--emb-npy / --emb-shards) given")
    store.check(ref)
    return {"conversation": conv, "image": ref}


def load_conversation_records(path: str, store: EmbeddingStore | None, log: RejectLog) -> list[dict]:
    """Read stage-2 JSONL; validate each line (JSON, conversation shape, embedding reference).

    Returns ``[{"key", "source", "conversation", "image"}]`` (``image`` None: text-only); bad lines are
    rejected through ``log`` (named ``path:line``), so ``on_error="fail"`` stops at the first one.
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            src = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                log.reject(src, f"line{lineno}", f"invalid JSON: {exc}")
                continue
            key = str(rec.get("id", f"line{lineno}")) if isinstance(rec, dict) else f"line{lineno}"
            try:
                out.append({"key": key, "source": src, **parse_conversation_record(rec, store)})
            except (SampleError, TemplateError) as exc:
                log.reject(src, key, str(exc))
    return out


class RecordSource:
    """Pipeline source: an infinite stream of records, seeded permutations split into disjoint
    (rank, worker) slots."""

    def __init__(self, records: list[dict], seed: int, epoch: int):
        self.records, self.seed, self.epoch = records, seed, epoch

    def __call__(self):
        rank, world, worker, nworkers = pytorch_worker_info()
        slot, nslots = rank * nworkers + worker, world * nworkers
        n_pass = 0
        while True:
            perm = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, n_pass, 31]).permutation(len(self.records))
            mine = perm[slot::nslots] if len(self.records) >= nslots else perm
            for i in mine:
                yield self.records[int(i)]
            n_pass += 1
