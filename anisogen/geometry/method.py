"""Section-5 diagnostics of the AnisoAlign paper: how well a transform T turns text into images.

Given paired held-out image X, text Y and substitutes Z = T(Y), all (N, d) and L2-normalised:

* source-semantic preservation (reference Y): ``Phi``, ``Psi``, ``Omega_k``;
* target compatibility (reference X): ``delta_mu``, kNN mixing ``M_k_Z`` / ``M_k_X``;
* the residual spectrum of r_i = x_i - z_i and its anisotropy ``A_r_T``.
"""

from __future__ import annotations

import numpy as np

from ..embeddings import check_embeddings, check_paired, check_same_dim
from .knn import knn_search
from .spectrum import anisotropy_ratio, sorted_eigh


def instance_consistency(text: np.ndarray, substitute: np.ndarray) -> float:
    """Phi = mean_i y_i . z_i."""
    return float(np.mean(np.einsum("ij,ij->i", text, substitute)))


def random_pairs(n: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` seeded random index pairs (i, j) with i != j, each uniform over [0, n)."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=n_pairs)
    j = (i + rng.integers(1, n, size=n_pairs)) % n
    return i, j


def pairwise_correlation(text: np.ndarray, substitute: np.ndarray, *, n_pairs: int = 100_000, seed: int = 0) -> float:
    """Psi = Pearson corr({y_i . y_j}, {z_i . z_j}) over seeded random pairs i != j."""
    i, j = random_pairs(text.shape[0], n_pairs, seed)
    sims_y = np.einsum("ij,ij->i", text[i], text[j])
    sims_z = np.einsum("ij,ij->i", substitute[i], substitute[j])
    return float(np.corrcoef(sims_y, sims_z)[0, 1])


def neighbour_overlap(neighbours_a: np.ndarray, neighbours_b: np.ndarray) -> np.ndarray:
    """|N_a(i) ∩ N_b(i)| / k per row, for two (n, k) arrays of distinct indices per row."""
    k = neighbours_a.shape[1]
    both = np.sort(np.concatenate([neighbours_a, neighbours_b], axis=1), axis=1)
    return (both[:, 1:] == both[:, :-1]).sum(axis=1) / k


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H2(p) = -p log2 p - (1-p) log2(1-p), with H2(0) = H2(1) = 0."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    inside = (p > 0) & (p < 1)
    q = p[inside]
    out[inside] = -q * np.log2(q) - (1 - q) * np.log2(1 - q)
    return out


def sample_rows(n: int, max_rows: int | None, rng: np.random.Generator) -> np.ndarray:
    """All row indices when ``max_rows`` is None or >= n, else a sorted seeded sample of ``max_rows``."""
    if max_rows is None or max_rows >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_rows, replace=False))


def knn_mixing(image: np.ndarray, substitute: np.ndarray, *, k: int = 20, seed: int = 0,
               n_permutations: int = 5, max_queries: int | None = None, neighbours: np.ndarray | None = None,
               query_rows: np.ndarray | None = None) -> dict:
    """Local modality mixing of the pooled set Q = X ∪ Z (need not be paired or of equal size).

    For u in Q, p_k(u) is the fraction of its k nearest neighbours in Q \\ {u} that are images, scored
    by the binary entropy H2(p_k(u)). ``M_k_Z_raw`` / ``M_k_X_raw`` average H2 over Z / X. Each is divided
    by its expectation when the modality labels are randomly permuted over Q (the neighbour graph kept
    fixed), estimated with ``n_permutations`` seeded permutations, giving ``M_k_Z`` and ``M_k_X``
    (about 1 = perfectly mixed, 0 = separated). Also returns ``nn_is_image_frac_Z``: the share of
    substitutes whose nearest neighbour is an image.

    ``max_queries`` scores a seeded sample of at most that many rows of each modality (the
    neighbours are still searched among all of Q). Cost: O(q |Q| d) for q query rows, i.e. O(4 N^2 d)
    with every row queried.

    ``neighbours`` may pass a precomputed (q, k) kNN graph of ``vstack([X, Z])`` (self excluded) for the
    rows ``query_rows`` of Q (default: every row), e.g. from an approximate index.
    """
    rng = np.random.default_rng(seed)
    n_x, n_z = image.shape[0], substitute.shape[0]
    labels = np.concatenate([np.ones(n_x, dtype=bool), np.zeros(n_z, dtype=bool)])
    if neighbours is None:
        if query_rows is None:
            query_rows = np.concatenate([sample_rows(n_x, max_queries, rng), n_x + sample_rows(n_z, max_queries, rng)])
        neighbours = knn_search(np.vstack([image, substitute]), k=k, query_rows=query_rows)
    elif query_rows is None:
        query_rows = np.arange(n_x + n_z)
    query_rows = np.asarray(query_rows)
    if neighbours.shape[0] != query_rows.shape[0]:
        raise ValueError(f"neighbours has {neighbours.shape[0]} rows but there are {query_rows.shape[0]} query rows")

    def mean_entropy(lab: np.ndarray) -> tuple[float, float]:
        h = binary_entropy(lab[neighbours].mean(axis=1))
        own = lab[query_rows]
        return float(h[own].mean()), float(h[~own].mean())

    raw_x, raw_z = mean_entropy(labels)
    expected = np.array([mean_entropy(rng.permutation(labels)) for _ in range(n_permutations)]).mean(axis=0)
    queried_z = ~labels[query_rows]
    return {
        "M_k_Z": raw_z / expected[1],
        "M_k_X": raw_x / expected[0],
        "M_k_Z_raw": raw_z,
        "M_k_X_raw": raw_x,
        "M_k_expected_Z": float(expected[1]),
        "M_k_expected_X": float(expected[0]),
        "nn_is_image_frac_Z": float(labels[neighbours[queried_z, 0]].mean()),
    }


def residual_spectrum(image: np.ndarray, substitute: np.ndarray, *, centered: bool = False) -> np.ndarray:
    """Eigenvalues (d,) descending of Sigma_r^T = (1/n) sum r r^T, r_i = x_i - z_i (uncentred by default)."""
    r = image - substitute
    if centered:
        r = r - r.mean(axis=0)
    return np.clip(sorted_eigh(r.T @ r / r.shape[0])[0], 0.0, None)


def method_report(*, image, text, substitute, k: int = 20, seed: int = 0, n_pairs: int = 100_000,
                  n_permutations: int = 5, max_queries: int | None = None, normalize: bool = False) -> dict:
    """The paper's §5 comparison metrics of one transform on paired held-out data.

    Args:
        image: X (N, d) real image embeddings; text: Y (N, d) their paired texts; substitute: Z = T(Y) (N, d).
        k: neighbourhood size for ``Omega_k`` and ``M_k``; needs N >= k + 1.
        seed: seeds the random pairs of ``Psi`` and the label permutations of ``M_k``.

    Returns a dict: ``Phi``, ``Psi``, ``Omega_k``, ``delta_mu`` = ||mu_z - mu_x||, ``M_k_Z``, ``M_k_X`` (and
    their raw/expected parts, see :func:`knn_mixing`), ``A_r_T`` = lambda_max / (tr / d) of the *uncentred*
    residual second moment, ``A_r_T_centered`` (spec Q14), ``residual_spectrum`` = lambda_j / tr, (d,).

    Cost: exact FAISS searches of O(q N d) for Y and Z and O(4 q N d) for X ∪ Z, with q = N query rows by
    default (``max_queries`` caps q), plus O(N d^2 + d^3) for the spectrum. On 2 cores, d = 512: N = 1e4
    takes seconds; N = 1e5 with every row queried takes about 10-20 minutes (the kNN part dominates),
    and about a tenth of that with ``max_queries=10_000``.
    """
    x = check_embeddings(image, name="image", normalize=normalize)
    y = check_embeddings(text, name="text", normalize=normalize)
    z = check_embeddings(substitute, name="substitute", normalize=normalize)
    d = check_same_dim(image=x, text=y, substitute=z)
    n = check_paired(image=x, text=y, substitute=z)
    if n < k + 1:
        raise ValueError(f"method_report needs at least k+1={k + 1} rows for k={k}, got {n}")

    queries = sample_rows(n, max_queries, np.random.default_rng([seed, 1]))
    lam = residual_spectrum(x, z)
    lam_centered = residual_spectrum(x, z, centered=True)
    report = {
        "n": n,
        "d": d,
        "k": k,
        "Phi": instance_consistency(y, z),
        "Psi": pairwise_correlation(y, z, n_pairs=n_pairs, seed=seed),
        "Omega_k": float(neighbour_overlap(knn_search(y, k=k, query_rows=queries),
                                           knn_search(z, k=k, query_rows=queries)).mean()),
        "delta_mu": float(np.linalg.norm(z.mean(axis=0) - x.mean(axis=0))),
        "A_r_T": anisotropy_ratio(lam),
        "A_r_T_centered": anisotropy_ratio(lam_centered),
        "residual_spectrum": lam / lam.sum(),
    }
    report.update(knn_mixing(x, z, k=k, seed=seed, n_permutations=n_permutations, max_queries=max_queries))
    return report
