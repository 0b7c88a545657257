"""WebDataset shard folders: format (:mod:`.schema`), member decoding (:mod:`.decode`), atomic writing
(:mod:`.writer`), reading (:mod:`.reader`).

Readers most code needs::

    from anisogen.shards import load_manifest, iter_samples, read_embeddings, shard_urls, decode_wds_sample
    from anisogen.shards import read_shard, iter_shard, ShardView, decode_sample, ShardFormatError  # the fast reader

Writers live in :mod:`.writer`: ``write_task_shard`` (columns of one task -> one shard, the fast path)
and ``write_shard`` (``schema.sample_members`` dicts), both atomic and byte-identical for the same samples.
"""

from .decode import ShardFormatError, decode_member_embedding, decode_sample
from .reader import (
    IncompleteRunError, ShardColumns, decode_wds_sample, iter_raw_samples, iter_samples, iter_shard, iter_tar_samples,
    load_manifest, read_embeddings, read_rejects, read_shard, shard_urls, verify_folder, ShardView,
)
from .schema import (
    ALIGNER_DIRNAME, EMB_DTYPES, MANIFEST_NAME, REJECTS_NAME, SIZES_NAME, decode_embedding, encode_embedding,
    make_key, parse_key, shard_name, shard_task,
)

__all__ = [
    "load_manifest", "iter_samples", "iter_tar_samples", "read_embeddings", "read_rejects", "shard_urls",
    "decode_wds_sample", "verify_folder", "IncompleteRunError", "decode_embedding", "encode_embedding",
    "make_key", "parse_key", "shard_name", "shard_task", "EMB_DTYPES", "MANIFEST_NAME", "SIZES_NAME",
    "REJECTS_NAME", "ALIGNER_DIRNAME", "ShardFormatError", "decode_member_embedding", "decode_sample",
    "iter_shard", "read_shard", "ShardColumns", "iter_raw_samples", "ShardView",
]
