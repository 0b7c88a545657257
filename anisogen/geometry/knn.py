"""Nearest-neighbour search for the diagnostics: FAISS exact inner-product search.

On L2-normalised rows, inner product = cosine similarity, so :func:`knn_search` returns cosine kNN.
"""

from __future__ import annotations

import faiss
import numpy as np


def drop_self(idx: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own index from (Q, k+1) search results, giving (Q, k) int64.

    ``own`` (Q,) holds each query's row number in the base. Where the row is among its results it is
    removed wherever it lands (so duplicate rows are handled); otherwise the last (k+1-th) result is.
    """
    own = np.asarray(own).reshape(-1, 1)
    is_self = idx == own
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), idx.shape[1] - 1)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(idx.shape[0]), drop] = False
    return idx[keep].reshape(idx.shape[0], k)


def knn_search(base: np.ndarray, queries: np.ndarray | None = None, *, k: int, exclude_self: bool | None = None,
               batch_size: int = 16384, index=None, query_rows: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` most similar rows of ``base`` (N, d) for each query (Q, d); int64 (Q, k).

    Exact search with ``faiss.IndexFlatIP`` on float32 copies. When ``queries`` is None the base is
    queried against itself and, by default, each row's own index is excluded (``exclude_self``), which
    also handles duplicate rows: the row itself is removed wherever it lands in the k+1 results.
    ``index`` may pass a prebuilt search object holding exactly the rows of ``base`` in order (any
    FAISS index, or an object with ``ntotal`` and ``search(x, k) -> (scores, ids)``), e.g. an IVF or
    GPU index; the default is a fresh exact ``IndexFlatIP``. ``query_rows`` restricts a self-query to
    those rows of the base (self still excluded).
    Cost: O(Q * N * d) multiply-adds, done by FAISS's BLAS kernels in ``batch_size`` query blocks.
    """
    base32 = np.ascontiguousarray(base, dtype=np.float32)
    self_query = queries is None
    if exclude_self is None:
        exclude_self = self_query
    if exclude_self and not self_query:
        raise ValueError("exclude_self needs queries=None (the base queried against itself)")
    if query_rows is not None and not self_query:
        raise ValueError("query_rows selects rows of the base; it cannot be combined with queries")
    if self_query:
        query_rows = np.arange(base32.shape[0]) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
        queries32 = base32[query_rows]
    else:
        queries32 = np.ascontiguousarray(queries, dtype=np.float32)
    limit = base32.shape[0] - (1 if exclude_self else 0)
    if k < 1 or k > limit:
        raise ValueError(f"k={k} needs 1 <= k <= {limit} (rows available{' besides self' if exclude_self else ''})")
    if index is None:
        index = faiss.IndexFlatIP(base32.shape[1])
        index.add(base32)
    elif index.ntotal != base32.shape[0]:
        raise ValueError(f"index holds {index.ntotal} rows but base has {base32.shape[0]}")
    fetch = k + 1 if exclude_self else k
    out = np.empty((queries32.shape[0], k), dtype=np.int64)
    for start in range(0, queries32.shape[0], batch_size):
        _, idx = index.search(queries32[start : start + batch_size], fetch)
        if exclude_self:
            idx = drop_self(idx, query_rows[start : start + idx.shape[0]], k)
        out[start : start + idx.shape[0]] = idx
    return out
