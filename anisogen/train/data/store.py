"""Stage 2: the embedding store, JSONL conversation records, and the record source of the stream."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
from webdataset.utils import pytorch_worker_info

from ..templates import IMAGE_MARKER, TemplateError, check_training_conversation, normalize_conversation
from .common import RejectLog, SampleError, decode_embedding
from .shard_stream import tar_members


class EmbeddingStore:
    """Embeddings addressable by shard key (``--emb-shards``) or by ``.npy`` row (``--emb-npy``).

    Nothing is held in RAM beyond an index: the ``.npy`` is memory-mapped (``mmap_mode="r"``), and the
    shards are scanned once into ``{key: (tar, data offset, size)}`` (every embedding is decoded once
    then to reject bad ones and check that all shapes agree, and dropped); ``get`` reads and decodes
    one ``emb.npy`` member from its tar on demand. A pickled store (DataLoader workers) carries only
    the index and reopens the files.

    ``get(ref)`` returns float32 (n, d) before normalisation, or raises :class:`SampleError`.
    """

    def __init__(self, npy_path: str | None = None, shard_urls: Sequence[str] | None = None, on_error: str = "skip"):
        self.npy_path = npy_path
        self._npy = None
        self._keys: dict[str, tuple[int, int, int]] = {}
        self._urls: list[str] = []
        self._emb_shape: tuple[int, int] | None = None
        self._files: dict = {}
        self.shard_rejects = 0
        if npy_path is not None:
            arr = np.load(npy_path, mmap_mode="r", allow_pickle=False)
            if arr.ndim not in (2, 3):
                raise ValueError(f"{npy_path}: embeddings must have shape (N, d) or (N, n, d), got {arr.shape}")
            self.npy_shape = arr.shape
        if shard_urls:
            self._index_shards(shard_urls, RejectLog(on_error))

    def _index_shards(self, shard_urls: Sequence[str], log: RejectLog) -> None:
        shapes: set = set()
        for url in shard_urls:
            try:
                members = tar_members(url)
            except SampleError as exc:
                if log.on_error == "fail":
                    raise
                log.reject(url, "*", str(exc))
                continue
            u = len(self._urls)
            self._urls.append(url)
            by_key: dict[str, tuple[int, int] | None] = {}
            for key, ext, offset, size in members:
                by_key.setdefault(key, None)
                if ext == "emb.npy":
                    by_key[key] = (offset, size)
            with open(url, "rb") as f:
                for key, loc in by_key.items():
                    if loc is None:
                        log.reject(url, key, "missing field 'emb.npy'")
                        continue
                    f.seek(loc[0])
                    try:
                        emb = decode_embedding(f.read(loc[1]), name=f"{key} in {url}")
                    except SampleError as exc:
                        log.reject(url, key, str(exc))
                        continue
                    if key in self._keys:
                        raise ValueError(f"duplicate shard key {key!r} in {url}")
                    self._keys[key] = (u, loc[0], loc[1])
                    shapes.add(emb.shape)
        if len(shapes) > 1:
            raise ValueError(f"embeddings in {shard_urls[0]}... have different shapes: {sorted(shapes)}")
        if shapes:
            n, d = next(iter(shapes))
            self._emb_shape = (int(n), int(d))
        self.shard_rejects = log.total

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_npy"] = {}, None
        return state

    def _read_member(self, key: str) -> np.ndarray:
        u, offset, size = self._keys[key]
        url = self._urls[u]
        f = self._files.get(u)
        if f is None:
            f = self._files[u] = open(url, "rb")
        f.seek(offset)
        raw = f.read(size)
        if len(raw) != size:
            raise SampleError(f"embedding {key!r} in {url}: the shard changed or was truncated since it was indexed")
        return decode_embedding(raw, name=f"{key} in {url}")

    def _npy_array(self):
        if self._npy is None:
            self._npy = np.load(self.npy_path, mmap_mode="r", allow_pickle=False)
        return self._npy

    @property
    def shape(self) -> tuple[int, int]:
        """(n, d) of one stored embedding."""
        if self._emb_shape is not None:
            return self._emb_shape
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
            if not self._urls:
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
            return self._read_member(val)
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
        check_training_conversation(conv, text_only=True)
        return {"conversation": conv, "image": None}
    if not has_marker:
        first_user = next((i for i, m in enumerate(conv) if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError("conversation has no user message")
        conv[first_user] = {"role": "user", "content": IMAGE_MARKER + "\n" + conv[first_user]["content"]}
    check_training_conversation(conv, text_only=False)
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
    with open(path, "rb") as f:  # bytes: one bad byte rejects its line, not the file
        for lineno, raw in enumerate(f, 1):
            src = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                log.reject(src, f"line{lineno}", f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at byte {exc.start}")
                continue
            if not line.strip():
                continue
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
