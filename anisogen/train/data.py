"""Training data: shard streams (stage 1), JSONL conversations (stage 2), collation, rejects.

All reading of generator shards goes through :func:`shard_samples` / :func:`decode_embedding`, so the
trainer can switch to the shared ``anisogen.shards.reader`` in one place.

Stage 1 samples (shards, schema of ``anisogen.shards``): ``__key__``, ``txt`` (caption, UTF-8),
``emb.npy`` ((d,) or (n, d); float16/float32, or uint16 holding bfloat16 bits), optional ``json``.

Stage 2 records (JSONL, one object per line)::

    {"id": "q1", "image": "<shard key>" | <npy row> | {"shard_key": "..."} | {"npy_index": 3},
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is it?"},
                       {"from": "gpt", "value": "Red."}]}

``conversations`` may also use ``{"role", "content"}``. If no message holds ``<image>``, it is put
in front of the first user message (LLaVA convention).

Streams:

* training: ``ResampledShards`` (or a seeded permutation of records) -> shuffle -> examples -> full
  batches, cut with ``with_epoch(num_worker_batches)``, so every rank yields exactly the same number
  of batches per data epoch (no end-of-epoch DDP hang). Seeds depend on (seed, data epoch, rank,
  worker) only, so a stream is reproducible and a resumed run can skip to its position.
* evaluation: one exact pass, shards (or records) split across ranks, partial last batch kept.

Bad records never pass silently: with ``on_error="skip"`` they are counted (the count rides on the
next batch, ``batch["n_rejected"]``) and written once per worker to ``rejects/*.jsonl``; with
``on_error="fail"`` a :class:`SampleError` naming the record and shard is raised.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from ..shards import schema as shard_schema
from ..shards.reader import load_manifest, shard_urls
from .templates import IGNORE_INDEX, IMAGE_MARKER, TemplateError, caption_conversation, normalize_conversation

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
    """Decode ``emb.npy`` bytes (or an array) into float32 (n, d) with the shard schema's rules
    (float16/float32, uint16 = bfloat16 bits; never unpickles).

    Raises :class:`SampleError` (naming ``name``) for unreadable data, wrong rank or NaN/Inf.
    """
    if isinstance(raw, (bytes, bytearray)):
        try:
            arr = shard_schema.npy_load(bytes(raw))
        except Exception as exc:  # numpy raises ValueError/OSError/EOFError depending on the damage
            raise SampleError(f"{name}: unreadable .npy embedding ({type(exc).__name__}: {exc})") from None
    else:
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
# Shards: listing, sizes, provenance, raw sample stream


def list_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Resolve shard folders / files / globs / brace patterns to a sorted list of ``.tar`` paths.

    A generator folder (``manifest.json`` of format ``anisogen-shards``) yields the shards its manifest
    lists, and refuses an unfinished run (``IncompleteRunError``); any other folder yields its
    ``shard-*.tar`` files (or any ``*.tar``). Raises ``FileNotFoundError`` naming the spec when nothing
    is found.
    """
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out += list_shards(s)
        return out
    spec = str(spec)
    p = Path(spec)
    if p.is_dir() and _is_generator_folder(p):
        found = shard_urls(p, load_manifest(p, require_complete=True))
    elif p.is_dir():
        found = sorted(glob.glob(str(p / "shard-*.tar"))) or sorted(glob.glob(str(p / "*.tar")))
    elif p.is_file():
        found = [str(p)]
    else:
        import braceexpand

        found = sorted({f for pat in braceexpand.braceexpand(spec) for f in glob.glob(pat)})
    if not found:
        raise FileNotFoundError(f"no shards found for {spec!r} (expected a folder with shard-*.tar, a .tar, or a glob)")
    return found


def _is_generator_folder(folder: Path) -> bool:
    mj = folder / shard_schema.MANIFEST_NAME
    if not mj.is_file():
        return False
    try:
        return json.loads(mj.read_text()).get("format") == shard_schema.FORMAT
    except json.JSONDecodeError as exc:
        raise ValueError(f"{mj}: invalid JSON ({exc})") from None


def read_sizes(urls: Sequence[str]) -> int:
    """Total number of samples in ``urls``, from ``sizes.json`` next to the shards (open_clip
    convention), else ``manifest.json``, else by counting keys in the tars."""
    total = 0
    cache: dict[Path, dict] = {}
    for url in urls:
        folder = Path(url).parent
        if folder not in cache:
            sizes = {}
            sj = folder / "sizes.json"
            if sj.is_file():
                sizes = json.loads(sj.read_text())
            else:
                mj = folder / "manifest.json"
                if mj.is_file():
                    man = json.loads(mj.read_text())
                    for entry in man.get("shards", []):
                        if isinstance(entry, dict) and "name" in entry and "nsamples" in entry:
                            sizes[entry["name"]] = entry["nsamples"]
            cache[folder] = sizes
        n = cache[folder].get(Path(url).name)
        if n is None:
            n = _count_tar_samples(url)
        total += int(n)
    return total


def _count_tar_samples(url: str) -> int:
    import tarfile

    keys = set()
    try:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if m.isreg():
                    keys.add(Path(m.name).name.split(".", 1)[0])
    except (tarfile.TarError, OSError):
        return 0
    return len(keys)


def read_provenance(shard_folder: str | os.PathLike) -> dict:
    """CLIP model fingerprint and aligner of a shard folder (``None`` when not recorded).

    Looks in ``manifest.json`` (top level or its ``config``), then ``aligner/config.json``.
    """
    folder = Path(shard_folder)
    if folder.is_file():
        folder = folder.parent
    prov: dict[str, Any] = {"clip_fingerprint": None, "aligner": None}
    mj = folder / "manifest.json"
    if mj.is_file():
        try:
            man = json.loads(mj.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{mj}: invalid JSON ({exc})") from None
        for scope in (man, man.get("config", {}) if isinstance(man.get("config"), dict) else {}):
            for k in ("clip_fingerprint", "model_fingerprint", "fingerprint"):
                if prov["clip_fingerprint"] is None and isinstance(scope.get(k), str):
                    prov["clip_fingerprint"] = scope[k]
            al = scope.get("aligner")
            if prov["aligner"] is None and al is not None:
                prov["aligner"] = al if isinstance(al, (str, dict)) else str(al)
    ac = folder / "aligner" / "config.json"
    if prov["aligner"] is None and ac.is_file():
        cfg = json.loads(ac.read_text())
        prov["aligner"] = {"name": cfg.get("name"), "params": cfg.get("params")}
        if prov["clip_fingerprint"] is None and isinstance(cfg.get("model_fingerprint"), str):
            prov["clip_fingerprint"] = cfg["model_fingerprint"]
    return prov


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
        url = url or "<unknown shard>"
        if self.on_error == "fail":
            raise SampleError(f"corrupt or unreadable shard {url}: {exn.args[0] if exn.args else exn!r}") from exn
        if url not in self.bad_shards:
            self.bad_shards.add(url)
            self.reject(url, "*", f"corrupt or unreadable shard: {type(exn).__name__}: {exn.args[0] if exn.args else ''}")
        return True

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


#: Sample fields the trainer reads; other members (json, src.npy) are not extracted.
TRAIN_FIELDS = ("txt", "emb.npy")


def shard_samples(urls_stream: Iterable[dict], log: RejectLog, fields: Sequence[str] | None = TRAIN_FIELDS) -> Iterator[dict]:
    """Raw samples (dicts of bytes keyed by extension, plus ``__key__``/``__url__``) from a stream of
    ``{"url": path}`` dicts; only ``fields`` are extracted (None: all). Shards the log has marked bad
    are skipped. The one place that opens tars."""

    def not_bad(src):
        for item in src:
            if item["url"] in log.bad_shards:
                continue
            yield item

    select = None
    if fields is not None:
        suffixes = tuple("." + f for f in fields)

        def select(fname: str) -> bool:
            return fname.endswith(suffixes)

    yield from wds.tarfile_to_samples(handler=log.shard_handler, select_files=select)(not_bad(urls_stream))


class _GuardAllBad:
    """Pipeline stage: fail (instead of spinning forever) once every shard is known to be corrupt."""

    def __init__(self, n_urls: int, log: RejectLog):
        self.n_urls, self.log = n_urls, log

    def __call__(self, src):
        for item in src:
            if len(self.log.bad_shards) >= self.n_urls:
                raise SampleError(f"all {self.n_urls} shards are corrupt or unreadable (see the rejects file)")
            yield item


class _ShardSamples:
    """Pipeline stage wrapping :func:`shard_samples` (a class, so pipelines pickle under spawn)."""

    def __init__(self, log: RejectLog):
        self.log = log

    def __call__(self, src):
        return shard_samples(src, self.log)


def sample_to_record(sample: dict, *, prompt: str = "") -> dict:
    """Stage-1 raw shard sample -> ``{"key", "source", "conversation", "emb"}`` (emb still raw bytes).

    Raises :class:`SampleError` with the reason only (callers add the record name)."""
    key = sample.get("__key__", "?")
    src = sample.get("__url__", "?")
    if "emb.npy" not in sample:
        raise SampleError("missing field 'emb.npy'")
    if "txt" not in sample:
        raise SampleError("missing field 'txt'")
    try:
        text = sample["txt"].decode("utf-8") if isinstance(sample["txt"], (bytes, bytearray)) else str(sample["txt"])
    except UnicodeDecodeError:
        raise SampleError("'txt' is not valid UTF-8") from None
    if not text.strip():
        raise SampleError("empty caption")
    return {"key": key, "source": src, "conversation": caption_conversation(text, prompt), "emb": sample["emb.npy"]}


def probe_embedding_shape(urls: Sequence[str]) -> tuple[int, int]:
    """(n, d) of the first decodable ``emb.npy`` in ``urls`` (raises if none can be read)."""
    log = RejectLog("skip")
    for sample in shard_samples(({"url": u} for u in urls), log):
        if "emb.npy" in sample:
            try:
                arr = decode_embedding(sample["emb.npy"], name=f"{sample['__key__']} in {sample['__url__']}")
            except SampleError:
                continue
            return int(arr.shape[0]), int(arr.shape[1])
    raise SampleError(f"no readable emb.npy found in {len(urls)} shard(s) starting with {urls[0]}")


# --------------------------------------------------------------------------------------------------
# Stage 2: embedding store and conversation records


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
            log = RejectLog(on_error)
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


def load_conversation_records(path: str, store: EmbeddingStore, log: RejectLog) -> list[dict]:
    """Read stage-2 JSONL; validate each line (JSON, conversation shape, embedding reference).

    Returns ``[{"key", "source", "conversation", "image"}]``; bad lines are rejected through ``log``
    (named ``path:line``), so ``on_error="fail"`` stops at the first one.
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
                if not isinstance(rec, dict):
                    raise SampleError("a record must be a JSON object")
                if "image" not in rec:
                    raise SampleError("missing field 'image' (the embedding reference)")
                conv = normalize_conversation(rec.get("conversations", rec.get("messages")))
                if not any(IMAGE_MARKER in m["content"] for m in conv):
                    first_user = next((i for i, m in enumerate(conv) if m["role"] == "user"), None)
                    if first_user is None:
                        raise SampleError("conversation has no user message")
                    conv[first_user] = {"role": "user", "content": IMAGE_MARKER + "\n" + conv[first_user]["content"]}
                store.check(rec["image"])
            except (SampleError, TemplateError) as exc:
                log.reject(src, key, str(exc))
                continue
            out.append({"key": key, "source": src, "conversation": conv, "image": rec["image"]})
    return out


# --------------------------------------------------------------------------------------------------
# Examples and batches


@dataclass
class ExampleBuilder:
    """Turns records into training examples: normalised embedding + template ids/labels.

    ``num_image_tokens`` placeholders are inserted per sample; embeddings must be (vectors, d_in).
    """

    tokenizer: Any
    template: Any
    transform: EmbeddingTransform
    image_token_id: int
    num_image_tokens: int
    d_in: int
    vectors_per_sample: int = 1
    max_length: int = 512

    def build(self, rec: dict, emb: np.ndarray, *, train: bool, rng: np.random.Generator | None) -> dict:
        """Example dict for ``rec``; raises :class:`SampleError` with the reason (no record name)."""
        if emb.shape != (self.vectors_per_sample, self.d_in):
            raise SampleError(
                f"embedding shape {tuple(emb.shape)} does not match the projector input "
                f"({self.vectors_per_sample}, {self.d_in})"
            )
        try:
            x = self.transform(emb, train=train, rng=rng)
            enc = self.template.encode(
                rec["conversation"], self.tokenizer, image_token_id=self.image_token_id,
                num_image_tokens=self.num_image_tokens, max_length=self.max_length,
            )
        except TemplateError as exc:
            raise SampleError(str(exc)) from None
        return {"key": rec["key"], "input_ids": enc.input_ids, "labels": enc.labels, "emb": x,
                "truncated": enc.truncated, "reference": _last_answer(rec["conversation"])}


def _last_answer(conv: list[dict]) -> str:
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    return answers[-1] if answers else ""


class Collator:
    """Pads a list of examples into a batch; masks come from lengths (safe when pad == EOS).

    Batch: ``input_ids`` (B, T) int64, ``labels`` (B, T) int64 (-100 on padding), ``attention_mask``
    (B, T) int64, ``emb`` (B, n, d) float32 (None when the examples carry none), ``keys``, ``references``, ``n_truncated`` and
    ``n_rejected`` (records skipped by this worker since its previous batch).
    """

    def __init__(self, pad_id: int, log: RejectLog | None = None, padding_side: str = "right"):
        self.pad_id = int(pad_id)
        self.log = log
        self.padding_side = padding_side

    def __call__(self, examples: list[dict]) -> dict:
        T = max(len(e["input_ids"]) for e in examples)
        B = len(examples)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            sl = slice(0, n) if self.padding_side == "right" else slice(T - n, T)
            ids[i, sl] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[i, sl] = torch.tensor(e["labels"], dtype=torch.long)
            mask[i, sl] = 1
        emb = None
        if all("emb" in e for e in examples):
            emb = torch.from_numpy(np.stack([e["emb"] for e in examples]).astype(np.float32))
        return {
            "input_ids": ids, "labels": labels, "attention_mask": mask, "emb": emb,
            "keys": [e["key"] for e in examples], "references": [e["reference"] for e in examples],
            "n_truncated": sum(bool(e["truncated"]) for e in examples),
            "n_rejected": self.log.take() if self.log is not None else 0,
        }


# --------------------------------------------------------------------------------------------------
# Pipelines


@dataclass
class StreamSpec:
    """Where stage-1/2 data comes from. Exactly one of ``shards`` / ``records`` is set."""

    shards: list[str] | None = None
    records: list[dict] | None = None
    store: EmbeddingStore | None = None
    prompt: str = ""  # user instruction for caption conversations (chat templates)
    num_samples: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_shards(cls, spec, prompt: str = "") -> "StreamSpec":
        urls = list_shards(spec)
        return cls(shards=urls, prompt=prompt, num_samples=read_sizes(urls))

    @classmethod
    def from_jsonl(cls, path: str, store: EmbeddingStore, log: RejectLog) -> "StreamSpec":
        records = load_conversation_records(path, store, log)
        if not records:
            raise SampleError(f"{path}: no usable conversation records")
        return cls(records=records, store=store, num_samples=len(records))


def epoch_batches(num_samples: int, batch_size: int, world_size: int, num_workers: int) -> tuple[int, int]:
    """open_clip epoch accounting: (batches per rank per data epoch, batches per worker).

    ``num_batches = ceil(N / (bs * world))`` rounded up to a multiple of the worker count.
    """
    if num_samples <= 0:
        raise ValueError("the training set is empty")
    w = max(1, num_workers)
    nb = math.ceil(num_samples / (batch_size * world_size))
    per_worker = math.ceil(nb / w)
    return per_worker * w, per_worker


class _Examples:
    """Pipeline stage: records -> examples; bad records go to the reject log. The noise RNG is seeded
    by (seed, data epoch, rank, worker)."""

    def __init__(self, spec: StreamSpec, builder: ExampleBuilder, log: RejectLog, *, train: bool, seed: int, epoch: int):
        self.spec, self.builder, self.log = spec, builder, log
        self.train, self.seed, self.epoch = train, seed, epoch

    def __call__(self, src):
        rank, _, worker, _ = pytorch_worker_info()
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, rank, worker, 17])
        for item in src:
            try:
                if self.spec.shards is not None:
                    rec = sample_to_record(item, prompt=self.spec.prompt)
                    emb = decode_embedding(rec["emb"], name="emb.npy")
                else:
                    rec = item
                    emb = self.spec.store.get(rec["image"])
                yield self.builder.build(rec, emb, train=self.train, rng=rng)
            except SampleError as exc:
                self.log.reject(item.get("__url__", item.get("source", "?")), item.get("__key__", item.get("key", "?")),
                                str(exc))


class _WorkerShuffle:
    """Pipeline stage: webdataset's buffer shuffle with an RNG seeded by (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src):
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(make_seed(self.seed, self.epoch, rank, worker, 29))
        yield from wds.shuffle(self.bufsize, min(self.bufsize, 100), rng=rng)(src)


class _RecordSource:
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


def _reseeded_shards(urls: Sequence[str], seed: int):
    """webdataset ``ResampledShards`` seeded by (seed, rank, worker) only."""
    return wds.ResampledShards(list(urls), seed=seed, deterministic=True)


def train_pipeline(
    spec: StreamSpec, builder: ExampleBuilder, *, batch_size: int, num_worker_batches: int, seed: int,
    epoch: int, shuffle_buffer: int = 1000, on_error: str = "skip", rejects_dir: str | None = None,
) -> wds.DataPipeline:
    """The infinite, resampled training stream of one data epoch, cut to ``num_worker_batches`` per worker."""
    log = RejectLog(on_error, rejects_dir, tag="train")
    collate = Collator(builder.tokenizer.pad_token_id, log)
    ep_seed = make_seed(seed, epoch)
    if spec.shards is not None:
        stages = [
            _reseeded_shards(spec.shards, ep_seed),
            _GuardAllBad(len(spec.shards), log),
            _ShardSamples(log),
            _WorkerShuffle(shuffle_buffer, seed, epoch),
        ]
    else:
        stages = [_RecordSource(spec.records, seed, epoch)]
    stages += [
        _Examples(spec, builder, log, train=True, seed=seed, epoch=epoch),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ]
    return wds.DataPipeline(*stages).with_epoch(num_worker_batches)


def eval_batches(
    spec: StreamSpec, builder: ExampleBuilder, *, batch_size: int, rank: int = 0, world_size: int = 1,
    on_error: str = "skip", rejects_dir: str | None = None, max_batches: int | None = None,
    padding_side: str = "right",
) -> Iterator[dict]:
    """One exact pass (in the main process): shards split across ranks when there are enough, else
    samples taken round-robin; records split round-robin. The last batch may be partial."""
    log = RejectLog(on_error, rejects_dir, tag="eval")
    collate = Collator(builder.tokenizer.pad_token_id, log, padding_side=padding_side)
    if spec.shards is not None:
        urls = spec.shards
        by_shard = len(urls) >= world_size
        mine = urls[rank::world_size] if by_shard else urls
        samples: Iterable = shard_samples(({"url": u} for u in mine), log)
        if not by_shard:
            samples = (s for i, s in enumerate(samples) if i % world_size == rank)
    else:
        samples = spec.records[rank::world_size]
    examples = _Examples(spec, builder, log, train=False, seed=0, epoch=0)(iter(samples))
    buf: list[dict] = []
    produced = 0
    for ex in examples:
        buf.append(ex)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
            produced += 1
            if max_batches is not None and produced >= max_batches:
                return
    if buf:
        yield collate(buf)


def make_loader(pipeline: wds.DataPipeline, num_workers: int, *, seed: int = 0, pin_memory: bool = False):
    """``WebLoader`` over a batched pipeline (``batch_size=None``: batching happens in the workers).

    The loader gets its own ``torch.Generator`` so that creating it does not consume the global torch
    RNG (which would make a resumed run's dropout masks differ from an uninterrupted run's).
    """
    gen = torch.Generator()
    gen.manual_seed(seed)
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None, generator=gen)
