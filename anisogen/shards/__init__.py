"""WebDataset shard folders: format (:mod:`.schema`), atomic writing (:mod:`.writer`), reading (:mod:`.reader`).

Readers most code needs::

    from anisogen.shards import load_manifest, iter_samples, read_embeddings, shard_urls, decode_wds_sample

Writers live in :mod:`.writer`: ``write_task_shard`` (columns of one task -> one shard, the fast path)
and ``write_shard`` (``schema.sample_members`` dicts), both atomic and byte-identical for the same samples.
"""

from .reader import (
    IncompleteRunError, decode_wds_sample, iter_samples, iter_tar_samples, load_manifest, read_embeddings,
    read_rejects, shard_urls, verify_folder,
)
from .schema import (
    ALIGNER_DIRNAME, EMB_DTYPES, MANIFEST_NAME, REJECTS_NAME, SIZES_NAME, decode_embedding, encode_embedding,
    make_key, parse_key, shard_name, shard_task,
)

__all__ = [
    "load_manifest", "iter_samples", "iter_tar_samples", "read_embeddings", "read_rejects", "shard_urls",
    "decode_wds_sample", "verify_folder", "IncompleteRunError", "decode_embedding", "encode_embedding",
    "make_key", "parse_key", "shard_name", "shard_task", "EMB_DTYPES", "MANIFEST_NAME", "SIZES_NAME",
    "REJECTS_NAME", "ALIGNER_DIRNAME",
]
