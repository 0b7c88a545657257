"""Geometry audit of generated shards: do the substitutes sit in the image distribution and keep their meaning?

Modules: :mod:`.loading` (shard folders, image / paired embeddings, fingerprint checks), :mod:`.index`
(FAISS flat / IVF / GPU and torch kNN with measured recall), :mod:`.metrics` (metric dicts built from
:mod:`anisogen.geometry`), :mod:`.plots` (PNG figures), :mod:`.html` (the self-contained report page),
:mod:`.gates` (``--fail-if`` rules) and :mod:`.runner` (:func:`run_audit`, used by ``pipelines/audit.py``).
"""

from .gates import Gate, GateError, evaluate_gates, parse_gate
from .index import KnnResult, TorchFlatIP, knn_graph
from .loading import (
    AuditInputError, EmbeddingSet, load_images, load_paired, load_shard_folder, write_embeddings_npy,
)
from .metrics import cosine_js, paired_metrics, semantic_metrics, unpaired_metrics
from .runner import METRIC_NAMES, AuditConfig, run_audit

__all__ = [
    "AuditConfig", "run_audit", "METRIC_NAMES", "AuditInputError", "EmbeddingSet", "load_images", "load_paired",
    "load_shard_folder", "write_embeddings_npy", "knn_graph", "KnnResult", "TorchFlatIP", "unpaired_metrics",
    "semantic_metrics", "paired_metrics", "cosine_js", "Gate", "GateError", "parse_gate", "evaluate_gates",
]
