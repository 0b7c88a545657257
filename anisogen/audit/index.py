"""Neighbour search for the audit: exact or IVF FAISS indexes on CPU or GPU, with measured recall.

The audit's kNN graphs (mixing over X ∪ Z, Omega_k within Y and within Z) all go through
:func:`knn_graph`, which builds one index over the base rows and queries it through
:func:`anisogen.geometry.knn_search` (so self-exclusion behaves exactly as in the geometry metrics).

Index kinds (``kind``):

* ``flat``: exact inner product: on CPU :class:`TorchFlatIP` (chunked BLAS ``matmul`` + ``topk`` in float32,
  faster than ``faiss.IndexFlatIP`` there, see :func:`build_flat`); on a GPU ``GpuIndexFlatIP`` with
  faiss-gpu, or :class:`TorchFlatIP` when only torch sees the GPU.
* ``ivf``: ``faiss.IndexIVFFlat`` with an inner-product coarse quantiser trained by spherical k-means
  (10 iterations) on a seeded sample of 40 rows per list. ``nlist`` defaults to ``4 * sqrt(N)``;
  ``nprobe`` starts at ``nlist / 64`` and is doubled until recall@k against exact search on a seeded
  query sample reaches ``recall_target`` (default 0.95), or ``nprobe = nlist`` (exhaustive). The
  measured recall is returned.
* ``auto``: ``flat`` on a GPU or when queries x base rows is at most ``FLAT_MAX_PAIRS`` (50k x 50k),
  ``ivf`` otherwise.

Inputs are (N, d) unit rows (inner product = cosine); every search runs in float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from ..geometry import drop_self, knn_search
from .defaults import DEVICES, KINDS, RECALL_SAMPLE, RECALL_TARGET  # noqa: F401  (re-exported)

#: ``auto`` switches to IVF above this many query x base similarities (CPU only): 50k x 50k.
FLAT_MAX_PAIRS = 50_000 * 50_000
#: k-means training: points per inverted list (FAISS wants >= 39) and iterations. Measured on 60k x 512
#: synthetic rows: 40/10 builds 2.7x faster than 64/20 at the same recall for a given nprobe.
IVF_TRAIN_PER_LIST = 40
IVF_TRAIN_ITERS = 10
#: Exact search on CPU: ``torch`` (TorchFlatIP) or ``faiss`` (IndexFlatIP); see :func:`build_flat`.
CPU_FLAT_BACKEND = "torch"



def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU raises."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        raise ValueError("device 'cuda' requested but no CUDA GPU is visible to torch")
    return device


def faiss_has_gpu() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_kind(n_base: int, kind: str = "auto", device: str = "cpu", n_queries: int | None = None) -> str:
    """Resolve ``auto`` to ``flat`` or ``ivf`` for ``n_queries`` (default ``n_base``) queries into ``n_base`` rows."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    n_queries = n_base if n_queries is None else n_queries
    return "flat" if device == "cuda" or n_queries * n_base <= FLAT_MAX_PAIRS else "ivf"


def default_nlist(n_base: int) -> int:
    """``4 sqrt(N)`` inverted lists, capped so each list gets >= 39 training points (FAISS's minimum)."""
    return int(max(1, min(round(4 * math.sqrt(n_base)), n_base // 39)))


class TorchFlatIP:
    """Exact inner-product search with torch on any device (GPU path when faiss has no GPU support).

    Holds the base (N, d) as float32 on ``device``; ``search(x (Q, d), k)`` returns float32 scores and
    int64 ids (Q, k) as NumPy arrays, best first, computing ``x @ base.T`` in blocks of at most
    ``block_elements`` similarities and keeping the top k with ``torch.topk``.
    """

    def __init__(self, base: np.ndarray, device: str = "cpu", block_elements: int = 1 << 26) -> None:
        self.device = torch.device(device)
        self.base = torch.as_tensor(np.ascontiguousarray(base, dtype=np.float32), device=self.device)
        self.ntotal, self.d = self.base.shape
        self.block_elements = block_elements

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = max(1, self.block_elements // max(self.ntotal, 1))
        scores = np.empty((len(x), k), dtype=np.float32)
        ids = np.empty((len(x), k), dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(x), rows):
                q = torch.as_tensor(np.ascontiguousarray(x[start : start + rows], dtype=np.float32), device=self.device)
                top = torch.topk(q @ self.base.T, k, dim=1, largest=True, sorted=True)
                scores[start : start + len(q)] = top.values.cpu().numpy()
                ids[start : start + len(q)] = top.indices.cpu().numpy()
        return scores, ids


@dataclass
class KnnResult:
    """A kNN graph and how it was computed.

    ``neighbours``: int64 (Q, k) row ids into the base, best first. ``info``: JSON-ready description
    (kind, backend, device, n_base, n_queries, k, nlist, nprobe, recall, recall_sample, seconds).
    """

    neighbours: np.ndarray
    info: dict = field(default_factory=dict)


def build_flat(base32: np.ndarray, device: str, backend: str = CPU_FLAT_BACKEND):
    """An exact inner-product index over ``base32`` on ``device``; returns (index, backend name).

    On CPU ``backend`` picks :class:`TorchFlatIP` (``"torch"``, the default: BLAS ``matmul`` + ``topk``,
    measured 3.5x faster than ``faiss.IndexFlatIP`` at k = 20 on the project's 2-core machine, see
    docs/BENCHMARKS.md) or ``faiss.IndexFlatIP`` (``"faiss"``); both are exact.
    """
    if device == "cuda":
        if faiss_has_gpu():
            cpu = faiss.IndexFlatIP(base32.shape[1])
            cpu.add(base32)
            return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu), "faiss-gpu"
        return TorchFlatIP(base32, device="cuda"), "torch"
    if backend == "torch":
        return TorchFlatIP(base32, device="cpu"), "torch-cpu"
    if backend != "faiss":
        raise ValueError(f"CPU flat backend must be 'torch' or 'faiss', got {backend!r}")
    index = faiss.IndexFlatIP(base32.shape[1])
    index.add(base32)
    return index, "faiss-cpu"


def build_ivf(base32: np.ndarray, *, nlist: int, seed: int, device: str):
    """A trained ``IndexIVFFlat`` (inner product, spherical k-means) holding ``base32``."""
    n, d = base32.shape
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.cp.spherical = True
    index.cp.niter = IVF_TRAIN_ITERS
    n_train = min(n, IVF_TRAIN_PER_LIST * nlist)
    train = base32 if n_train == n else base32[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
    index.train(train)
    index.add(base32)
    if device == "cuda" and faiss_has_gpu():
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index), "faiss-gpu"
    return index, "faiss-cpu"


def _set_nprobe(index, nprobe: int) -> None:
    if hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    else:  # GPU IVF indexes take it through the parameter space
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx_i ∩ exact_i| / k for two (Q, k) id arrays (ids may repeat only as -1)."""
    k = exact.shape[1]
    hits = [np.intersect1d(a[a >= 0], e).size for a, e in zip(approx, exact)]
    return float(np.sum(hits) / (k * len(exact)))


def knn_graph(base: np.ndarray, queries: np.ndarray | None = None, *, k: int, kind: str = "auto",
              device: str = "auto", nlist: int | None = None, nprobe: int | None = None,
              recall_target: float = RECALL_TARGET, recall_sample: int = RECALL_SAMPLE, seed: int = 0,
              query_rows: np.ndarray | None = None) -> KnnResult:
    """kNN of ``queries`` (Q, d) in ``base`` (N, d), or of ``base`` in itself excluding self when ``queries`` is None.

    With ``queries`` None, ``query_rows`` (sorted int array) restricts the self-query to those rows of the
    base (their neighbours are still searched among all N rows); the result then has one row per entry.

    Args:
        kind: ``auto`` / ``flat`` / ``ivf`` (see module docstring). device: ``auto`` / ``cpu`` / ``cuda``.
        nlist, nprobe: IVF settings; ``nprobe`` given = fixed (no calibration), None = calibrated.
        recall_target: recall@k the calibration aims at. recall_sample: queries used to measure it.
        seed: seeds the IVF training sample, k-means and the recall query sample.

    Returns a :class:`KnnResult`. For ``ivf`` its ``info["recall"]`` is recall@k of the final search
    against exact search on ``recall_sample`` seeded queries; for ``flat`` the recall is 1.0 by
    construction. Rows for which an IVF search returned fewer than k hits (empty lists) are redone
    exactly and counted in ``info["exact_fallback_rows"]``.
    """
    start_time = time.perf_counter()
    device = resolve_device(device)
    base32 = np.ascontiguousarray(base, dtype=np.float32)
    n_base = base32.shape[0]
    self_query = queries is None
    if query_rows is not None and not self_query:
        raise ValueError("query_rows selects rows of the base; it cannot be combined with queries")
    if self_query:
        rows_all = np.arange(n_base) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
        queries32 = base32[rows_all] if query_rows is not None else base32
    else:
        queries32 = np.ascontiguousarray(queries, dtype=np.float32)
    resolved = choose_kind(n_base, kind, device, n_queries=queries32.shape[0])
    info = {"kind": resolved, "requested_kind": kind, "device": device, "n_base": n_base,
            "n_queries": int(queries32.shape[0]), "k": int(k), "self_query": self_query}

    def search(index, rows: np.ndarray | None = None) -> np.ndarray:
        """All queries (rows None) or the queries at positions ``rows`` of ``queries32``."""
        if rows is None:
            if self_query:
                return knn_search(base32, k=k, index=index, query_rows=None if query_rows is None else rows_all)
            return knn_search(base32, queries32, k=k, index=index)
        fetch = k + 1 if self_query else k
        _, ids = index.search(queries32[rows], fetch)
        return drop_self(ids, rows_all[rows], k) if self_query else ids

    if resolved == "flat":
        index, backend = build_flat(base32, device)
        neighbours = search(index)
        info.update(backend=backend, recall=1.0, recall_sample=0, nlist=None, nprobe=None)
        info["seconds"] = time.perf_counter() - start_time
        return KnnResult(neighbours, info)

    nlist = int(nlist) if nlist else default_nlist(n_base)
    if not 1 <= nlist <= n_base:
        raise ValueError(f"nlist={nlist} must be between 1 and the number of base rows ({n_base})")
    index, backend = build_ivf(base32, nlist=nlist, seed=seed, device=device)
    built = time.perf_counter()
    n_sample = min(int(recall_sample), queries32.shape[0])
    sample = np.sort(np.random.default_rng(seed + 1).choice(queries32.shape[0], n_sample, replace=False))
    exact_index, _ = build_flat(base32, device)
    exact = search(exact_index, sample)
    del exact_index
    calibrated = nprobe is None
    probe = max(1, nlist // 64) if calibrated else int(nprobe)
    if not 1 <= probe <= nlist:
        raise ValueError(f"nprobe={probe} must be between 1 and nlist={nlist}")
    trials = []
    while True:
        _set_nprobe(index, probe)
        recall = recall_at_k(search(index, sample), exact)
        trials.append({"nprobe": probe, "recall": recall})
        if not calibrated or recall >= recall_target or probe >= nlist:
            break
        probe = min(2 * probe, nlist)
    neighbours = search(index)
    missing = np.flatnonzero((neighbours < 0).any(axis=1))
    if missing.size:  # an IVF probe found fewer than k rows: redo those rows exactly
        fallback, _ = build_flat(base32, device)
        neighbours[missing] = search(fallback, missing)
    final_recall = recall_at_k(neighbours[sample], exact)
    info.update(backend=backend, nlist=nlist, nprobe=probe, recall=final_recall, recall_sample=n_sample,
                recall_target=recall_target if calibrated else None, nprobe_trials=trials,
                exact_fallback_rows=int(missing.size), build_seconds=built - start_time)
    info["seconds"] = time.perf_counter() - start_time
    return KnnResult(neighbours, info)
