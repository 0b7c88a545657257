"""Modality-gap geometry: the diagnostics of the AnisoAlign paper (§3 and §5), in float64."""

from .gap import covariance_gap, gap_report, spectral_correlation, subspace_overlap
from .knn import drop_self, knn_search
from .method import (
    binary_entropy, instance_consistency, knn_mixing, method_report, neighbour_overlap,
    pairwise_correlation, residual_spectrum,
)
from .spectrum import anisotropy_ratio, cumulative_energy, effective_dimension, sorted_eigh, top_eigvecs

__all__ = [
    "gap_report", "method_report", "knn_search", "drop_self", "covariance_gap", "knn_mixing", "spectral_correlation",
    "subspace_overlap",
    "binary_entropy", "instance_consistency", "neighbour_overlap", "pairwise_correlation", "residual_spectrum",
    "anisotropy_ratio", "cumulative_energy", "effective_dimension", "sorted_eigh", "top_eigvecs",
]
