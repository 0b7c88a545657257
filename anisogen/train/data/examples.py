"""Records -> examples (embedding + template ids/labels) -> padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from webdataset.utils import pytorch_worker_info

from ..templates import IGNORE_INDEX, TemplateError
from .common import EmbeddingTransform, RejectLog, SampleError, decode_embedding
from .shard_stream import sample_to_record

#: Per-row tensors of a collated batch (dimension 0 is the batch).
ROW_TENSORS = ("input_ids", "labels", "attention_mask", "emb", "has_image")


@dataclass
class ExampleBuilder:
    """Turns records into training examples: normalised embedding + template ids/labels.

    ``num_image_tokens`` placeholders are inserted per sample; embeddings must be (vectors, d_in).
    A record without an embedding (``emb=None``, a text-only conversation) gets a zero embedding of
    that shape, no placeholders, and ``has_image=False``.
    """

    tokenizer: Any
    template: Any
    transform: EmbeddingTransform
    image_token_id: int
    num_image_tokens: int
    d_in: int
    vectors_per_sample: int = 1
    max_length: int = 512

    def build(self, rec: dict, emb: np.ndarray | None, *, train: bool, rng: np.random.Generator | None) -> dict:
        """Example dict for ``rec``; raises :class:`SampleError` with the reason (no record name)."""
        shape = (self.vectors_per_sample, self.d_in)
        text_only = emb is None
        if not text_only and emb.shape != shape:
            raise SampleError(f"embedding shape {tuple(emb.shape)} does not match the projector input {shape}")
        try:
            x = np.zeros(shape, np.float32) if text_only else self.transform(emb, train=train, rng=rng)
            enc = self.template.encode(
                rec["conversation"], self.tokenizer, image_token_id=self.image_token_id,
                num_image_tokens=self.num_image_tokens, max_length=self.max_length,
                **({"allow_text_only": True} if text_only else {}),
            )
        except TemplateError as exc:
            raise SampleError(str(exc)) from None
        return {"key": rec["key"], "input_ids": enc.input_ids, "labels": enc.labels, "emb": x,
                "has_image": not text_only, "truncated": enc.truncated, "reference": _last_answer(rec["conversation"])}


def _last_answer(conv: list[dict]) -> str:
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    return answers[-1] if answers else ""


class Collator:
    """Pads a list of examples into a batch; masks come from lengths (safe when pad == EOS).

    Batch: ``input_ids`` (B, T) int64, ``labels`` (B, T) int64 (-100 on padding), ``attention_mask``
    (B, T) int64, ``emb`` (B, n, d) float32 (None when the examples carry none), ``has_image`` (B,)
    bool (examples without the field count as having an image), ``keys``, ``references``,
    ``n_truncated`` and ``n_rejected`` (records skipped by this worker since its previous batch).
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
            "has_image": torch.tensor([bool(e.get("has_image", True)) for e in examples], dtype=torch.bool),
            "keys": [e["key"] for e in examples], "references": [e["reference"] for e in examples],
            "n_truncated": sum(bool(e["truncated"]) for e in examples),
            "n_rejected": self.log.take() if self.log is not None else 0,
        }


def image_rows(batch: dict) -> dict | None:
    """The rows of a collated batch that carry an image (e.g. for calibration, which needs an embedding
    per row); the batch itself when all do, None when none does. Counters are kept as they are."""
    keep = batch.get("has_image")
    if keep is None or bool(keep.all()):
        return batch
    if not bool(keep.any()):
        return None
    idx = torch.nonzero(keep).flatten().tolist()
    out = dict(batch)
    for k in ROW_TENSORS:
        if torch.is_tensor(out.get(k)):
            out[k] = out[k][keep.to(out[k].device)]
    for k in ("keys", "references"):
        if k in out:
            out[k] = [out[k][i] for i in idx]
    return out


class Examples:
    """Pipeline stage: records (or raw shard samples) -> examples; bad records go to the reject log.
    The noise RNG is seeded by (seed, data epoch, rank, worker)."""

    def __init__(self, spec, builder: ExampleBuilder, log: RejectLog, *, train: bool, seed: int, epoch: int):
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
                    emb = None if rec.get("image") is None else self.spec.store.get(rec["image"])
                yield self.builder.build(rec, emb, train=self.train, rng=rng)
            except SampleError as exc:
                self.log.reject(item.get("__url__", item.get("source", "?")), item.get("__key__", item.get("key", "?")),
                                str(exc))
