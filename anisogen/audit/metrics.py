"""The audit's metrics, assembled from :mod:`anisogen.geometry` (which defines every gap metric).

Three groups, each a dict of floats (plus a few curves as arrays):

* :func:`unpaired_metrics`: substitutes Z against *unpaired* images X (different rows, any sizes):
  ``delta_mu`` = ||mu_z - mu_x||; ``G_Sigma``, ``C_lambda``, ``O_q`` of the two covariances (the
  geometry helpers :func:`~anisogen.geometry.covariance_gap`, :func:`~anisogen.geometry.spectral_correlation`,
  :func:`~anisogen.geometry.subspace_overlap`, as in :func:`~anisogen.geometry.gap_report`, which needs
  paired rows); kNN mixing ``M_k_Z`` / ``M_k_X`` and ``nn_is_image_frac_Z`` from
  :func:`~anisogen.geometry.knn_mixing`; the pairwise-cosine JS divergence ``JS_cos``; norm statistics.
* :func:`semantic_metrics`: Z against its own source text embeddings Y (row-aligned ``src.npy``):
  ``Phi``, ``Psi``, ``Omega_k``, as in :func:`~anisogen.geometry.method_report`.
* :func:`paired_metrics`: the full :func:`~anisogen.geometry.method_report` on a paired evaluation set,
  with the substitutes made by the shard folder's own aligner artifact.

Pairwise-cosine JS divergence (after ReAlign §D): cosines of ``n_pairs`` seeded random pairs i != j inside
each set (:func:`anisogen.geometry.method.random_pairs`), a Gaussian kernel density of each on a grid of
``JS_BINS`` bins over [-1, 1] (binned KDE, Scott bandwidth std * n^(-1/5)), and
JS(P, Q) = KL(P||M)/2 + KL(Q||M)/2 with M = (P + Q)/2, in nats (0 = same distribution, ln 2 = disjoint).

kNN-based metrics (``M_k_*``, ``nn_is_image_frac_Z``, ``Omega_k``) may be scored on a seeded sample of
query rows (``max_queries`` per modality, drawn exactly as the geometry functions draw them); the
neighbours are always searched among all rows.

Inputs are (N, d) L2-normalised rows; arithmetic is float64.
"""

from __future__ import annotations

import numpy as np

from ..embeddings import check_embeddings
from ..geometry import (
    covariance_gap, cumulative_energy, instance_consistency, knn_mixing, knn_search, method_report, neighbour_overlap,
    pairwise_correlation, sorted_eigh, spectral_correlation, subspace_overlap, top_eigvecs,
)
from ..geometry.method import random_pairs, sample_rows
from ..stats import Moments
from .defaults import N_PAIRS, N_PERMUTATIONS

#: Grid bins over [-1, 1] for the pairwise-cosine densities.
JS_BINS = 2000


# --------------------------------------------------------------------------------- basic pieces
def unit_rows(raw: np.ndarray, name: str) -> np.ndarray:
    """float64 L2-normalised copy of (N, d) ``raw`` (rows of zero norm raise ``ValueError`` naming ``name``)."""
    return check_embeddings(raw, name=name, normalize=True)


def norm_stats(raw: np.ndarray) -> dict:
    """Row L2 norms of embeddings *as stored*: mean, std, min, max and max |norm - 1| (``norm_max_dev``)."""
    norms = np.linalg.norm(np.asarray(raw, dtype=np.float64), axis=1)
    return {"norm_mean": float(norms.mean()), "norm_std": float(norms.std()), "norm_min": float(norms.min()),
            "norm_max": float(norms.max()), "norm_max_dev": float(np.abs(norms - 1.0).max())}


def moments(x: np.ndarray, chunk: int = 32768) -> Moments:
    """Float64 streaming moments of (N, d) rows (:class:`anisogen.stats.Moments`)."""
    m = Moments(x.shape[1])
    for s in range(0, x.shape[0], chunk):
        m.update(x[s : s + chunk])
    return m


def covariance_spectrum(cov: np.ndarray) -> np.ndarray:
    """Eigenvalues of a covariance, descending, divided by their sum: (d,) float64."""
    lam = np.clip(sorted_eigh(cov)[0], 0.0, None)
    return lam / lam.sum() if lam.sum() > 0 else lam


def pairwise_cosines(x: np.ndarray, *, n_pairs: int = N_PAIRS, seed: int = 0) -> np.ndarray:
    """Cosines x_i . x_j of ``n_pairs`` seeded random pairs i != j of unit rows: (n_pairs,) float64."""
    i, j = random_pairs(x.shape[0], n_pairs, seed)
    out = np.empty(n_pairs, dtype=np.float64)
    for s in range(0, n_pairs, 16384):  # bounded memory at large d
        out[s : s + 16384] = np.einsum("ij,ij->i", x[i[s : s + 16384]], x[j[s : s + 16384]])
    return out


def cosine_density(cosines: np.ndarray, *, bins: int = JS_BINS) -> np.ndarray:
    """Binned Gaussian KDE of cosines on ``bins`` equal bins over [-1, 1], normalised to sum 1: (bins,).

    Bandwidth: Scott's rule, std * n^(-1/5) (floored at one bin width); mass leaving [-1, 1] is dropped
    before the final normalisation.
    """
    c = np.asarray(cosines, dtype=np.float64)
    counts, _ = np.histogram(np.clip(c, -1.0, 1.0), bins=bins, range=(-1.0, 1.0))
    width = 2.0 / bins
    h = max(float(c.std()) * c.size ** (-0.2), width)
    half = int(np.ceil(4 * h / width))
    offsets = np.arange(-half, half + 1) * width
    kernel = np.exp(-0.5 * (offsets / h) ** 2)
    density = np.convolve(counts.astype(np.float64), kernel, mode="full")[half : half + bins]
    return density / density.sum()


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two discrete distributions (each summing to 1), in nats, in [0, ln 2]."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def cosine_js(reference_cosines: np.ndarray, other_cosines: np.ndarray, *, bins: int = JS_BINS) -> float:
    """JS divergence (nats) between the pairwise-cosine KDEs of two sets (see the module docstring)."""
    return js_divergence(cosine_density(reference_cosines, bins=bins), cosine_density(other_cosines, bins=bins))


# ------------------------------------------------------------------------------------ unpaired
def mixing_query_rows(n_image: int, n_substitute: int, max_queries: int | None, seed: int) -> np.ndarray:
    """Rows of ``vstack([X, Z])`` scored by kNN mixing: at most ``max_queries`` seeded rows of each modality,
    drawn as :func:`anisogen.geometry.knn_mixing` draws them (all rows when ``max_queries`` is None)."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [sample_rows(n_image, max_queries, rng), n_image + sample_rows(n_substitute, max_queries, rng)]
    )


def semantic_query_rows(n: int, max_queries: int | None, seed: int) -> np.ndarray:
    """Rows scored by ``Omega_k``, drawn as :func:`anisogen.geometry.method_report` draws them."""
    return sample_rows(n, max_queries, np.random.default_rng([seed, 1]))


def unpaired_metrics(image: np.ndarray, substitute: np.ndarray, *, k: int = 20, seed: int = 0, q: int | None = None,
                     neighbours: np.ndarray | None = None, query_rows: np.ndarray | None = None,
                     n_pairs: int = N_PAIRS, n_permutations: int = N_PERMUTATIONS,
                     image_moments: Moments | None = None, image_cosines: np.ndarray | None = None,
                     substitute_moments: Moments | None = None) -> dict:
    """Target-compatibility metrics of unit substitutes Z (n_z, d) against unit images X (n_x, d), unpaired.

    ``neighbours``: optional precomputed (q, k) kNN graph of ``vstack([X, Z])`` (self excluded) for the
    pooled rows ``query_rows`` (default: every row; see :func:`mixing_query_rows`), e.g. from an IVF
    index; default exact search of every row. ``image_moments`` / ``image_cosines`` may pass
    :func:`moments` / :func:`pairwise_cosines` of X computed once for several substitute sets;
    ``image_moments`` / ``substitute_moments`` may also cover more rows than ``image`` / ``substitute`` (the
    audit passes moments of every row and samples for the kNN and cosine metrics).
    ``q`` defaults to round(d / 10) as in :func:`anisogen.geometry.gap_report`.

    Returns ``n_image`` / ``n_substitute`` (rows of the samples) and ``n_image_total`` /
    ``n_substitute_total`` (rows behind the moments), floats ``delta_mu``, ``G_Sigma``,
    ``C_lambda``, ``O_q`` (+ ``O_q_random`` = q/d), ``JS_cos``,
    ``cos_mean`` (mean pairwise cosine of Z), ``M_k_Z``, ``M_k_X`` (+ raw / expected parts),
    ``nn_is_image_frac_Z`` (+ ``nn_is_image_chance`` = n_x / (n_x + n_z - 1), its value under random
    labels), and the curve ``covariance_spectrum`` (d,) of Z.
    """
    d = image.shape[1]
    q = max(1, round(d / 10)) if q is None else min(int(q), d)
    mx = image_moments if image_moments is not None else moments(image)
    mz = substitute_moments if substitute_moments is not None else moments(substitute)
    cov_x, cov_z = mx.covariance, mz.covariance
    cos_x = image_cosines if image_cosines is not None else pairwise_cosines(image, n_pairs=n_pairs, seed=seed)
    cos_z = pairwise_cosines(substitute, n_pairs=n_pairs, seed=seed)
    n_x, n_z = image.shape[0], substitute.shape[0]
    out = {
        "n_image": n_x,
        "n_substitute": n_z,
        "n_image_total": mx.count,
        "n_substitute_total": mz.count,
        "d": d,
        "k": k,
        "q": q,
        "delta_mu": float(np.linalg.norm(mz.mean - mx.mean)),
        "G_Sigma": covariance_gap(cov_x, cov_z),
        "C_lambda": spectral_correlation(cov_x, cov_z),
        "O_q": subspace_overlap(top_eigvecs(cov_x, q), top_eigvecs(cov_z, q)),
        "O_q_random": q / d,
        "JS_cos": cosine_js(cos_x, cos_z),
        "cos_mean": float(cos_z.mean()),
        "cos_mean_image": float(cos_x.mean()),
    }
    out.update(knn_mixing(image, substitute, k=k, seed=seed, n_permutations=n_permutations, neighbours=neighbours,
                          query_rows=query_rows))
    out["nn_is_image_chance"] = n_x / (n_x + n_z - 1)
    out["covariance_spectrum"] = covariance_spectrum(cov_z)
    return out


# ------------------------------------------------------------------------------------ semantic
def semantic_metrics(text: np.ndarray, substitute: np.ndarray, *, k: int = 20, seed: int = 0, n_pairs: int = N_PAIRS,
                     query_rows: np.ndarray | None = None, text_neighbours: np.ndarray | None = None,
                     substitute_neighbours: np.ndarray | None = None) -> dict:
    """Source-semantic preservation of unit substitutes Z against their row-aligned unit source texts Y.

    ``Phi`` (instance consistency), ``Psi`` (pairwise-similarity correlation over ``n_pairs`` seeded
    pairs) and ``Omega_k`` (mean kNN overlap of Y and Z over the rows ``query_rows``, default all; the
    (q, k) self-excluded graphs of those rows may be passed precomputed, default exact search) — the
    definitions of :func:`anisogen.geometry.method_report`.
    """
    if text_neighbours is None:
        text_neighbours = knn_search(text, k=k, query_rows=query_rows)
    if substitute_neighbours is None:
        substitute_neighbours = knn_search(substitute, k=k, query_rows=query_rows)
    return {
        "Phi": instance_consistency(text, substitute),
        "Psi": pairwise_correlation(text, substitute, n_pairs=n_pairs, seed=seed),
        "Omega_k": float(neighbour_overlap(text_neighbours, substitute_neighbours).mean()),
    }


# -------------------------------------------------------------------------------------- paired
def paired_metrics(image: np.ndarray, text: np.ndarray, aligner=None, *, k: int = 20, seed: int = 0,
                   n_pairs: int = N_PAIRS, n_permutations: int = N_PERMUTATIONS,
                   max_queries: int | None = None) -> dict:
    """:func:`anisogen.geometry.method_report` on paired unit (N, d) images and texts.

    With an ``aligner`` the substitutes are ``aligner.transform(text)`` and the image side is
    ``aligner.transform_image(image)`` (identity except for baselines that move images); without one the
    raw texts are scored (the "no alignment" reference). Adds ``residual_energy_curve`` (cumulative
    energy of the residual spectrum) next to ``residual_spectrum``.
    """
    if aligner is None:
        substitute, image_side = text, image
    else:
        substitute = aligner.transform(text)
        image_side = aligner.transform_image(image)
    report = method_report(image=image_side, text=text, substitute=substitute, k=k, seed=seed, n_pairs=n_pairs,
                           n_permutations=n_permutations, max_queries=max_queries, normalize=True)
    report["residual_energy_curve"] = cumulative_energy(report["residual_spectrum"])
    return report


def split_scalars(metrics: dict) -> tuple[dict, dict]:
    """``(scalars, arrays)``: plain numbers (cast to int/float) and array-valued entries of a metric dict."""
    scalars, arrays = {}, {}
    for key, value in metrics.items():
        if isinstance(value, np.ndarray):
            arrays[key] = value
        elif isinstance(value, (bool, np.bool_)):
            scalars[key] = bool(value)
        elif isinstance(value, (int, np.integer)):
            scalars[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            scalars[key] = float(value)
    return scalars, arrays
