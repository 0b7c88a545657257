"""Parts every data stage shares: errors, seeds, embedding decoding/normalisation, the reject log."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from webdataset.utils import pytorch_worker_info

from ...shards import schema as shard_schema

ON_ERROR_CHOICES = ("skip", "fail")


class SampleError(ValueError):
    """A record that cannot be used; the message names the record, its source and the reason."""


def make_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (independent of PYTHONHASHSEED and of the process)."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------------
# Embedding decoding and normalisation


def decode_embedding(raw, *, name: str) -> np.ndarray:
    """Decode an embedding into float32 (n, d) with the shard schema's rules; never unpickles.

    ``emb.npy`` member bytes go through :func:`anisogen.shards.decode.decode_member_embedding` (the one
    shard decoder: float16 / float32 / uint16 = bfloat16 bits, shape (d,) only — (n, d) members are
    reserved for a future format version — finite) and come back as (1, d). Arrays (rows of user
    ``.npy`` files, export inputs) may be (d,) or (n, d) with the same dtype rules.

    Raises :class:`SampleError` (naming ``name``) for unreadable data, wrong dtype/rank or NaN/Inf.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        from ...shards.decode import ShardFormatError, decode_member_embedding

        try:
            vec = decode_member_embedding(raw, shard=name, key="?")
        except ShardFormatError as exc:
            raise SampleError(f"{name}: {exc.reason}") from None
        return vec[None, :]
    arr = np.asarray(raw)
    try:
        arr = shard_schema.decode_embedding(arr)
    except ValueError as exc:
        raise SampleError(f"{name}: {exc}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise SampleError(f"{name}: embedding must have shape (d,) or (n, d), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise SampleError(f"{name}: embedding contains NaN or Inf")
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass
class EmbeddingTransform:
    """The embedding normalisation contract, identical at train, eval and inference time.

    ``l2_normalize``: rows are divided by their L2 norm. ``noise_std``: training only (CapDec-style),
    add N(0, noise_std^2) per coordinate, then re-normalise if ``l2_normalize``. Stored in checkpoint
    and export configs (:meth:`describe`).
    """

    l2_normalize: bool = True
    noise_std: float = 0.0

    def __call__(self, emb: np.ndarray, *, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
        x = np.asarray(emb, dtype=np.float32)
        if self.l2_normalize:
            x = _unit(x)
        if train and self.noise_std > 0:
            if rng is None:
                raise ValueError("noise_std > 0 needs an rng at training time")
            x = x + rng.standard_normal(x.shape).astype(np.float32) * np.float32(self.noise_std)
            if self.l2_normalize:
                x = _unit(x)
        return x

    def apply_torch(self, emb: torch.Tensor) -> torch.Tensor:
        """Eval-time transform for tensors (inference on user-supplied embeddings)."""
        x = emb.float()
        if self.l2_normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
        return x

    def describe(self) -> dict:
        return {"l2_normalize": bool(self.l2_normalize), "noise_std": float(self.noise_std)}

    @classmethod
    def from_description(cls, d: dict) -> "EmbeddingTransform":
        return cls(l2_normalize=bool(d.get("l2_normalize", True)), noise_std=float(d.get("noise_std", 0.0)))


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(n <= 1e-12):
        raise SampleError("embedding has zero norm and cannot be L2-normalised")
    return x / n


# --------------------------------------------------------------------------------------------------
# Rejects


class RejectLog:
    """Counts rejected records and writes each (source, key) once to a JSONL file.

    Lives inside the data pipeline (one copy per worker process); ``take()`` returns and resets the
    count since the last call, so the collator can attach it to the next batch.
    """

    def __init__(self, on_error: str = "skip", rejects_dir: str | None = None, tag: str = "train"):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.on_error = on_error
        self.rejects_dir = rejects_dir
        self.tag = tag
        self.pending = 0
        self.total = 0
        self.bad_shards: set[str] = set()
        self._seen: set[tuple[str, str]] = set()

    def reject(self, source: str, key: str, reason: str) -> None:
        """Record a bad record; raises :class:`SampleError` when ``on_error == "fail"``."""
        if self.on_error == "fail":
            raise SampleError(f"record {key!r} in {source}: {reason}")
        self.pending += 1
        self.total += 1
        if (source, key) in self._seen:
            return
        self._seen.add((source, key))
        if self.rejects_dir:
            rank, _, worker, _ = pytorch_worker_info()
            os.makedirs(self.rejects_dir, exist_ok=True)
            path = os.path.join(self.rejects_dir, f"{self.tag}-rank{rank}-worker{worker}.jsonl")
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"source": source, "key": key, "reason": reason}) + "\n")

    def shard_handler(self, exn: Exception) -> bool:
        """webdataset exception handler: a corrupt/unreadable shard is rejected (and never re-read
        by this worker) or, with ``on_error="fail"``, raised."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
        url = url or getattr(exn, "filename", None) or "<unknown shard>"
        if isinstance(exn, FileNotFoundError):
            reason = f"missing shard file {url}"
        else:
            detail = exn.strerror if isinstance(exn, OSError) and exn.strerror else (exn.args[0] if exn.args else "")
            reason = f"corrupt or unreadable shard {url}: {type(exn).__name__}: {detail}"
        if self.on_error == "fail":
            raise SampleError(reason) from exn
        if url not in self.bad_shards:
            self.bad_shards.add(url)
            self.reject(url, "*", reason)
        return True

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n
