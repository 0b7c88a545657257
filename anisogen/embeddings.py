"""Validation and normalisation of embedding matrices.

Every public function that consumes embeddings goes through :func:`check_embeddings`, so bad input
fails the same way everywhere: a ``ValueError`` that names the array (``name``) and the first
offending row.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

#: Default tolerance on | ||row||_2 - 1 |. float16 storage of a unit vector keeps the norm within
#: about 1e-3, so 2e-3 accepts fp16 shards while rejecting un-normalised data.
NORM_ATOL = 2e-3


def l2_normalize(array: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of an (N, d) array; rows of (near) zero norm raise ``ValueError``."""
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if np.any(norms <= eps):
        row = int(np.flatnonzero(norms[:, 0] <= eps)[0])
        raise ValueError(f"row {row} has zero norm and cannot be L2-normalised")
    return array / norms


def check_embeddings(
    array,
    *,
    name: str = "embeddings",
    dim: int | None = None,
    normalize: bool = False,
    atol: float = NORM_ATOL,
    min_rows: int = 1,
    dtype=np.float64,
    row_offset: int = 0,
) -> np.ndarray:
    """Validate an (N, d) embedding matrix and return it as ``dtype`` (float64 by default).

    Checks, in order: 2-D shape, ``dim`` (if given), at least ``min_rows`` rows, finite values, and
    unit row norms within ``atol`` (or L2-normalises when ``normalize=True``).

    ``row_offset`` is added to reported row numbers, so a caller validating a chunk of a larger file
    can report absolute rows. Raises ``ValueError`` with ``name`` and the first bad row.
    """
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array of shape (N, d), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point embeddings, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: dimension mismatch, expected d={dim}, got d={arr.shape[1]}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {arr.shape[0]}")
    arr = arr.astype(dtype, copy=False)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name}: row {row + row_offset} contains NaN or Inf")
    if normalize:
        try:
            return l2_normalize(arr)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    norms = np.linalg.norm(arr, axis=1)
    bad = np.abs(norms - 1.0) > atol
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}: row {row + row_offset} has L2 norm {norms[row]:.6f}, not unit norm within "
            f"atol={atol} ({int(bad.sum())} such rows); L2-normalise the embeddings or pass normalize=True"
        )
    return arr


def check_same_dim(**arrays: np.ndarray) -> int:
    """Return the common column count of the named (N, d) arrays, or raise naming the mismatch."""
    dims = {name: np.asarray(a).shape[-1] for name, a in arrays.items()}
    if len(set(dims.values())) > 1:
        listing = ", ".join(f"{k} d={v}" for k, v in dims.items())
        raise ValueError(f"dimension mismatch between inputs: {listing}")
    return next(iter(dims.values()))


def check_paired(**arrays: np.ndarray) -> int:
    """Return the common row count of paired (N, d) arrays, or raise naming the mismatch."""
    rows = {name: np.asarray(a).shape[0] for name, a in arrays.items()}
    if len(set(rows.values())) > 1:
        listing = ", ".join(f"{k} N={v}" for k, v in rows.items())
        raise ValueError(f"paired inputs must have the same number of rows: {listing}")
    return next(iter(rows.values()))


def iter_chunks(source, chunk_size: int = 65536) -> Iterator[np.ndarray]:
    """Yield (n, d) chunks from an embedding source.

    A source is an (N, d) array (sliced into ``chunk_size`` rows), an iterable of (n, d) arrays, or a
    zero-argument callable returning such an iterable (so it can be read several times, e.g. one pass
    for moments and one for calibration).
    """
    if callable(source):
        source = source()
    if isinstance(source, np.ndarray) or hasattr(source, "shape"):
        arr = np.asarray(source)
        if arr.ndim != 2:
            raise ValueError(f"expected a 2-D array of shape (N, d), got shape {arr.shape}")
        for start in range(0, arr.shape[0], chunk_size):
            yield arr[start : start + chunk_size]
        return
    for chunk in source:
        yield np.asarray(chunk)


def is_reiterable(source) -> bool:
    """True when :func:`iter_chunks` can read ``source`` more than once."""
    return callable(source) or isinstance(source, (np.ndarray, list, tuple)) or hasattr(source, "shape")


def as_chunk_iterable(source) -> Iterable[np.ndarray]:
    """Materialise a one-shot iterator of chunks into a list so it can be read several times."""
    return source if is_reiterable(source) else list(source)
