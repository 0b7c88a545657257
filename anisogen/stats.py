"""Streaming, mergeable first and second moments of embeddings, in float64.

``Moments`` keeps the count, the sum and the sum of outer products of the rows it has seen. These
three are plain sums, so partial results from chunks, workers or ranks combine by addition
(:meth:`Moments.merge`, or an all-reduce of :meth:`Moments.to_vector`). Memory is O(d^2) whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .embeddings import check_embeddings, iter_chunks

#: A function that sums a float64 vector across processes (e.g. an all-reduce); identity when local.
Reducer = Callable[[np.ndarray], np.ndarray]


@dataclass
class Moments:
    """Running sums of an (N, d) sample: ``count``, ``total`` (d,) and ``outer`` (d, d), float64."""

    dim: int
    count: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim, dtype=np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    # -- accumulation -------------------------------------------------------------------------
    def update(self, chunk: np.ndarray) -> "Moments":
        """Add the rows of an (n, d) chunk (cast to float64). Returns ``self``."""
        x = np.asarray(chunk, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Moments(d={self.dim}) cannot take a chunk of shape {x.shape}")
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "Moments") -> "Moments":
        """Return a new ``Moments`` holding the sums of ``self`` and ``other``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge Moments of d={self.dim} and d={other.dim}")
        return Moments(self.dim, self.count + other.count, self.total + other.total, self.outer + other.outer)

    @classmethod
    def from_source(
        cls, source, *, name: str = "embeddings", dim: int | None = None, normalize: bool = False,
        chunk_size: int = 65536,
    ) -> "Moments":
        """Accumulate moments over an embedding source (array, iterable of chunks or callable).

        Every chunk is validated with :func:`check_embeddings` (finite, unit-norm unless
        ``normalize``); reported row numbers are absolute within the source.
        """
        moments: Moments | None = None
        seen = 0
        for chunk in iter_chunks(source, chunk_size):
            chunk = check_embeddings(chunk, name=name, dim=dim, normalize=normalize, row_offset=seen)
            if moments is None:
                moments = cls(chunk.shape[1])
            moments.update(chunk)
            seen += chunk.shape[0]
        if moments is None or moments.count == 0:
            raise ValueError(f"{name}: no rows to fit on")
        return moments

    # -- cross-process reduction ----------------------------------------------------------------
    def to_vector(self) -> np.ndarray:
        """Pack ``[count, total, outer]`` into one float64 vector of length 1 + d + d^2."""
        return np.concatenate([[float(self.count)], self.total, self.outer.ravel()])

    @classmethod
    def from_vector(cls, vector: np.ndarray, dim: int) -> "Moments":
        """Inverse of :meth:`to_vector`."""
        vector = np.asarray(vector, dtype=np.float64)
        expected = 1 + dim + dim * dim
        if vector.shape != (expected,):
            raise ValueError(f"Moments vector for d={dim} must have length {expected}, got {vector.shape}")
        return cls(dim, int(round(vector[0])), vector[1 : 1 + dim].copy(), vector[1 + dim :].reshape(dim, dim).copy())

    def reduce(self, reducer: Reducer | None) -> "Moments":
        """Sum these moments across processes with ``reducer`` (identity when ``None``)."""
        if reducer is None:
            return self
        return Moments.from_vector(reducer(self.to_vector()), self.dim)

    # -- derived statistics --------------------------------------------------------------------
    @property
    def mean(self) -> np.ndarray:
        """E[x], shape (d,)."""
        self._require_rows()
        return self.total / self.count

    @property
    def second_moment(self) -> np.ndarray:
        """Uncentred E[x x^T], shape (d, d)."""
        self._require_rows()
        return self.outer / self.count

    @property
    def covariance(self) -> np.ndarray:
        """Centred population covariance E[(x - mu)(x - mu)^T] (divides by N), shape (d, d)."""
        mu = self.mean
        cov = self.second_moment - np.outer(mu, mu)
        return (cov + cov.T) / 2.0

    @property
    def trace(self) -> float:
        """tr(covariance) = E||x - mu||^2."""
        mu = self.mean
        return float(np.trace(self.second_moment) - mu @ mu)

    def _require_rows(self) -> None:
        if self.count == 0:
            raise ValueError("Moments has seen no rows")


@dataclass
class MeanAccumulator:
    """Running float64 sum and count of (n, d) rows, mergeable like :class:`Moments` (no covariance)."""

    dim: int
    count: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim, dtype=np.float64)

    def update(self, chunk: np.ndarray) -> "MeanAccumulator":
        x = np.asarray(chunk, dtype=np.float64)
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        return self

    def reduce(self, reducer: Reducer | None) -> "MeanAccumulator":
        if reducer is None:
            return self
        vec = reducer(np.concatenate([[float(self.count)], self.total]))
        return MeanAccumulator(self.dim, int(round(vec[0])), vec[1:].copy())

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("MeanAccumulator has seen no rows")
        return self.total / self.count
