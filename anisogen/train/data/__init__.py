"""Training data: shard streams (stage 1), JSONL conversations (stage 2), collation, rejects.

Modules: :mod:`.common` (errors, seeds, embedding decoding and normalisation, the reject log),
:mod:`.shard_stream` (stage 1: shard listing, sizes, provenance, the raw sample stream),
:mod:`.store` (stage 2: embedding store, conversation records), :mod:`.examples` (records ->
examples -> batches) and :mod:`.pipeline` (training stream, evaluation pass, loader). Every public
name is re-exported here, so ``from anisogen.train.data import X`` is the import to use.

Samples of generator shards are read through :func:`shard_samples` / :func:`decode_embedding`, so
the trainer can switch to the shared ``anisogen.shards.reader`` in one place; the only other tar
access is ``shard_stream.tar_members`` (member offsets: counting keys, the stage-2 store's index), which
walks the tar headers with ``anisogen.shards.reader.shard_members``.

Stage 1 samples (shards, schema of ``anisogen.shards``): ``__key__``, ``txt`` (caption, UTF-8),
``emb.npy`` ((d,) or (n, d); float16/float32, or uint16 holding bfloat16 bits), optional ``json``.

Stage 2 records (JSONL, one object per line)::

    {"id": "q1", "image": "<shard key>" | <npy row> | {"shard_key": "..."} | {"npy_index": 3},
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is it?"},
                       {"from": "gpt", "value": "Red."}]}

``conversations`` may also use ``{"role", "content"}``. If no message holds ``<image>``, it is put
in front of the first user message (LLaVA convention). A record without ``image`` (or with
``"image": null``) and without an ``<image>`` marker is a *text-only* conversation: it is trained
with a zero embedding, no placeholder tokens and ``has_image=False``. A marker without an ``image``
reference is rejected.

Batches (:class:`Collator`): ``input_ids``, ``labels``, ``attention_mask`` (B, T) int64, ``emb``
(B, n, d) float32, ``has_image`` (B,) bool (all True in stage 1), ``keys``, ``references``,
``n_truncated``, ``n_rejected``.

Streams:

* training, stage 1 with ``stage1_sampling="exact"`` (:mod:`.exact`): a seeded exact pass -- every
  planned sample once per data epoch, equal full batches per rank (the remainder of the epoch's
  order is dropped and counted), a resume starts at a batch cursor without replaying the stream.
* training (default, ``"resampled"``): ``ResampledShards`` (or a seeded permutation of records) -> shuffle -> examples -> full
  batches, cut with ``with_epoch(num_worker_batches)``, so every rank yields exactly the same number
  of batches per data epoch (no end-of-epoch DDP hang). Seeds depend on (seed, data epoch, rank,
  worker) only, so a stream is reproducible and a resumed run can skip to its position.
* evaluation: one exact pass, shards (or records) split across ranks, partial last batch kept.

Bad records never pass silently: with ``on_error="skip"`` they are counted (the count rides on the
next batch, ``batch["n_rejected"]``) and written once per worker to ``rejects/*.jsonl``; with
``on_error="fail"`` a :class:`SampleError` naming the record and shard is raised.
"""

from .common import ON_ERROR_CHOICES, EmbeddingTransform, RejectLog, SampleError, decode_embedding, make_seed
from .examples import Collator, ExampleBuilder, image_rows
from .exact import SAMPLING_CHOICES, ExactPlan, exact_pipeline
from .pipeline import StreamSpec, epoch_batches, eval_batches, make_loader, train_pipeline
from .shard_stream import (
    TRAIN_FIELDS, list_shards, probe_embedding_shape, read_provenance, read_sizes, sample_to_record, shard_samples,
    shard_sizes,
)
from .store import EmbeddingStore, load_conversation_records, parse_conversation_record

__all__ = [
    "ON_ERROR_CHOICES", "SAMPLING_CHOICES", "TRAIN_FIELDS", "ExactPlan", "exact_pipeline", "shard_sizes", "Collator", "EmbeddingStore", "EmbeddingTransform", "ExampleBuilder",
    "RejectLog", "SampleError", "StreamSpec", "decode_embedding", "epoch_batches", "eval_batches", "image_rows",
    "list_shards", "load_conversation_records", "make_loader", "make_seed", "parse_conversation_record",
    "probe_embedding_shape", "read_provenance", "read_sizes", "sample_to_record", "shard_samples", "train_pipeline",
]
