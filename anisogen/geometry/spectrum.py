"""Eigen-decompositions used by the diagnostics (float64, descending order, deterministic signs)."""

from __future__ import annotations

import numpy as np


def sorted_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (d,) descending and eigenvectors (d, d) as columns of a symmetric matrix.

    Signs are fixed so that the largest-magnitude entry of every eigenvector is positive.
    """
    sym = (np.asarray(matrix, dtype=np.float64) + np.asarray(matrix, dtype=np.float64).T) / 2.0
    values, vectors = np.linalg.eigh(sym)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    pivot = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivot, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return values, vectors * signs


def top_eigvecs(matrix: np.ndarray, q: int) -> np.ndarray:
    """The q leading eigenvectors (d, q) of a symmetric matrix."""
    if not 1 <= q <= matrix.shape[0]:
        raise ValueError(f"q={q} must be between 1 and d={matrix.shape[0]}")
    return sorted_eigh(matrix)[1][:, :q]


def _nonnegative(eigenvalues: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)


def anisotropy_ratio(eigenvalues: np.ndarray) -> float:
    """A_r = lambda_max / (trace / d): 1 for an isotropic spectrum, up to d for rank one; NaN if all zero."""
    lam = _nonnegative(eigenvalues)
    return float(lam.max() / (lam.sum() / lam.size)) if lam.sum() > 0 else float("nan")


def effective_dimension(eigenvalues: np.ndarray) -> float:
    """d_eff = tr(S)^2 / tr(S^2) in [1, d] (participation ratio of the spectrum); NaN if all zero."""
    lam = _nonnegative(eigenvalues)
    return float(lam.sum() ** 2 / np.sum(lam**2)) if lam.sum() > 0 else float("nan")


def cumulative_energy(eigenvalues: np.ndarray) -> np.ndarray:
    """E(K) = sum_{j<=K} lambda_j / sum_j lambda_j for K = 1..d, sorted descending; NaN if all zero."""
    lam = np.sort(_nonnegative(eigenvalues))[::-1]
    return np.cumsum(lam) / lam.sum() if lam.sum() > 0 else np.full(lam.shape, np.nan)
