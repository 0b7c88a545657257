"""Embedding a whole (small) text corpus into one ``.npy``: paired evaluation sets, audits, probes.

The generator (:mod:`anisogen.generate`) is the tool for large corpora: it shards, resumes and aligns.
This module covers the other common need, a single array of *raw* CLIP text embeddings row-aligned with
a file of texts, e.g. the captions of a held-out paired set (``pipelines/audit.py --paired``,
``pipelines/evaluate.py``). It reads through the same :class:`~anisogen.encode.corpus.Corpus` (so bad
records are rejected with the same reasons) and encodes with the same :class:`TextEncoder`.

Output folder::

    text_emb.npy    float32 (N, d), L2-normalised, one row per accepted record, in input order
    text_ids.txt    the source id of each row (one per line)
    text_emb.json   model fingerprint, corpus description, counts, dim
    rejects.jsonl   one line per rejected record (row, id, reason, detail); absent when there are none
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .corpus import Corpus, Record, Reject
from .text import TextEncoder

EMB_FILE, IDS_FILE, META_FILE, REJECTS_FILE = "text_emb.npy", "text_ids.txt", "text_emb.json", "rejects.jsonl"


def read_texts(corpus: Corpus, limit: int | None = None) -> tuple[list[Record], list[Reject]]:
    """All records of ``corpus`` (first ``limit`` rows), split into accepted records and rejects."""
    records, rejects = [], []
    for item in corpus.records(0, limit):
        (records if isinstance(item, Record) else rejects).append(item)
    return records, rejects


def embed_text_corpus(corpus: Corpus, encoder: TextEncoder, *, limit: int | None = None, num_workers: int = 0,
                      progress: bool = False) -> tuple[np.ndarray, list[str], list[Reject]]:
    """Encode every accepted record of ``corpus``.

    Returns ``(emb, ids, rejects)``: float32 (N, d) embeddings (normalised when the encoder normalises),
    the N source ids, and the rejected records.
    """
    records, rejects = read_texts(corpus, limit)
    emb = encoder.encode([r.text for r in records], num_workers=num_workers, progress=progress)
    return emb, [r.id for r in records], rejects


def save_text_embeddings(out_dir: str | os.PathLike, emb: np.ndarray, ids: Sequence[str],
                         rejects: Sequence[Reject], *, meta: dict[str, Any]) -> Path:
    """Write the output folder described in the module docstring (each file atomically)."""
    from ..shards.writer import atomic_write_bytes, write_embedding_set

    out = write_embedding_set(out_dir, emb_file=EMB_FILE, emb=np.asarray(emb, dtype=np.float32), keys_file=IDS_FILE,
                              keys=ids, meta_file=META_FILE, meta={**meta, "rejects": len(rejects)})
    reject_path = out / REJECTS_FILE
    if rejects:
        lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects)
        atomic_write_bytes(reject_path, lines.encode("utf-8"))
    elif reject_path.exists():
        reject_path.unlink()
    return out
