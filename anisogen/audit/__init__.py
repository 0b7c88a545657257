"""Geometry audit of generated shards: do the substitutes sit in the image distribution and keep their meaning?

Modules: :mod:`.loading` (shard folders, image / paired embeddings, fingerprint checks), :mod:`.index`
(FAISS flat / IVF / GPU and torch kNN with measured recall), :mod:`.metrics` (metric dicts built from
:mod:`anisogen.geometry`), :mod:`.plots` (PNG figures), :mod:`.html` (the self-contained report page),
:mod:`.gates` (``--fail-if`` rules) and :mod:`.runner` (:func:`run_audit`, used by ``pipelines/audit.py``).
"""

from importlib import import_module

_EXPORTS = {
    "AuditConfig": ".runner", "run_audit": ".runner", "METRIC_NAMES": ".defaults",
    "AuditInputError": ".loading", "EmbeddingSet": ".loading", "load_images": ".loading", "load_paired": ".loading",
    "load_shard_folder": ".loading", "write_embeddings_npy": ".loading",
    "knn_graph": ".index", "KnnResult": ".index", "TorchFlatIP": ".index",
    "unpaired_metrics": ".metrics", "semantic_metrics": ".metrics", "paired_metrics": ".metrics",
    "cosine_js": ".metrics",
    "Gate": ".gates", "GateError": ".gates", "parse_gate": ".gates", "evaluate_gates": ".gates",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # names load on first use: ``audit.py --help`` does not import torch or FAISS
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
