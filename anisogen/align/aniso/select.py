"""``select="auto"``: choose AnisoAlign's shrinkage, L_Phi weight and bounds from unpaired fit data [INF].

The paper gives no rule for gamma (shrinkage toward the global map), lambda_Phi or the bounds alpha, and
the defaults that suit one encoder can reshape another's caption neighbourhoods. The rule here reads
only the *fit* inputs, which are unpaired: a held-out part of the fit texts Y_s and of the fit images
X_s (never trained on). For every candidate it maps Y_s to substitutes Z_s and scores

* semantic preservation between each text and its own substitute: Omega_k (k-NN overlap of Y_s and Z_s,
  neighbours searched among Y_s and a pool of other fit texts, and among their substitutes) and Psi
  (correlation of the similarities of every pair of Y_s), both computable without any image;
* image-side mixing M_k^X of Z_s with the held-out images X_s (X_s and Z_s describe different items).

It keeps the candidates whose Omega_k and Psi are at least ReAlign's on the same texts minus
``tolerance`` and returns the one with the largest M_k^X (ties: the earlier, simpler candidate). Phi is
left out on purpose: no map that closes the centroid gap can exceed ReAlign's Phi (docs/ANISOALIGN.md).
If no candidate is feasible, the one closest to feasibility is returned and flagged.

No paired array is read: nothing here knows which text describes which image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ...geometry.knn import knn_search
from ...geometry.method import knn_mixing, neighbour_overlap

SELECT_METRICS = ("Omega_k", "Psi", "M_k_X", "M_k_Z")


@dataclass(frozen=True)
class Candidate:
    """One setting: ``shrinkage`` (gamma_U, gamma_V); ``lambda_phi`` None means no refinement (``bound_scale`` 0)."""

    shrinkage: tuple[float, float]
    lambda_phi: float | None = None
    bound_scale: float = 0.0

    @property
    def refined(self) -> bool:
        return self.lambda_phi is not None and self.bound_scale > 0

    def label(self) -> str:
        u, v = self.shrinkage
        gamma = f"gamma={u:g}" if u == v else f"gamma_U={u:g} gamma_V={v:g}"
        if not self.refined:
            return f"init {gamma}"
        return f"{gamma} lambda_phi={self.lambda_phi:g} beta={self.bound_scale:g}"


class SelectionSet:
    """Held-out fit texts ``text`` and images ``image`` (float64, unit rows) and the scoring of substitutes.

    ``pool`` (optional, other fit texts) densifies the neighbourhoods of Omega_k: each held-out text's k
    nearest neighbours are searched among the held-out texts and the pool, and likewise for its substitute
    among all substitutes. A denser neighbourhood is a stricter test (a small move changes more
    neighbours), closer to the density at which the substitutes are used.
    """

    def __init__(
        self, text: np.ndarray, image: np.ndarray, *, k: int, seed: int, pool: np.ndarray | None = None
    ) -> None:
        n = min(text.shape[0], image.shape[0])
        if n < k + 2:
            raise ValueError(f"automatic selection needs at least k+2={k + 2} held-out texts and images, got {n}")
        self.text, self.image, self.k, self.seed = text, image, int(k), int(seed)
        self.pool_size = 0 if pool is None else int(pool.shape[0])
        self._text_base = text if not self.pool_size else np.vstack([text, pool])
        self.text_neighbours = self._neighbours(text, pool)
        self._pairs = np.triu_indices(text.shape[0], 1)
        self._text_sims = _pair_sims(text, self._pairs)

    def median_knn_distance(self) -> float:
        """Median over the held-out texts of the Euclidean distance to their k-th nearest text (pool included)."""
        return median_knn_distance(self.text, self.text_neighbours, self._text_base)

    def _neighbours(self, rows: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
        base = rows if pool is None or not len(pool) else np.vstack([rows, pool])
        return knn_search(base, k=self.k, query_rows=np.arange(rows.shape[0]))

    def score(self, substitutes: np.ndarray, pool: np.ndarray | None = None) -> dict[str, float]:
        """Omega_k, Psi (text vs its substitute) and M_k^X, M_k^Z (substitutes vs held-out images).

        ``pool``: the substitutes of the pool texts, in the same order (needed when the set has a pool)."""
        if (0 if pool is None else pool.shape[0]) != self.pool_size:
            raise ValueError(f"the selection set has a pool of {self.pool_size} texts; got "
                             f"{0 if pool is None else pool.shape[0]} pool substitutes")
        omega = neighbour_overlap(self.text_neighbours, self._neighbours(substitutes, pool)).mean()
        mixing = knn_mixing(self.image, substitutes, k=self.k, seed=self.seed)
        psi = np.corrcoef(self._text_sims, _pair_sims(substitutes, self._pairs))[0, 1]
        return {"Omega_k": float(omega), "Psi": float(psi), "M_k_X": float(mixing["M_k_X"]),
                "M_k_Z": float(mixing["M_k_Z"])}


def _pair_sims(rows: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Cosine similarities of every pair i < j (Psi over all pairs, from one Gram matrix)."""
    return (rows @ rows.T)[pairs]


def median_knn_distance(rows: np.ndarray, neighbours: np.ndarray, base: np.ndarray | None = None) -> float:
    """Median over unit ``rows`` of the Euclidean distance to their last listed neighbour, a row of ``base``
    (default: ``rows``): with k-NN lists from :func:`knn_search`, the median k-th neighbour distance."""
    base = rows if base is None else base
    cos = np.einsum("ij,ij->i", rows, base[neighbours[:, -1]])
    return float(np.median(np.sqrt(np.clip(2.0 - 2.0 * cos, 0.0, None))))


def choose(rows: list[dict], reference: dict, tolerance: float) -> int:
    """Index of the chosen row; marks every row's ``feasible`` and the chosen row's ``chosen`` in place.

    A row is feasible when Omega_k and Psi are >= the reference's minus ``tolerance``. Among feasible
    rows the largest M_k^X wins (first row on ties); without any, the row with the largest
    min(Omega_k margin, Psi margin).
    """
    if not rows:
        raise ValueError("no candidates to choose from")
    margins = [min(r["Omega_k"] - reference["Omega_k"], r["Psi"] - reference["Psi"]) + tolerance for r in rows]
    for row, margin in zip(rows, margins):
        row["feasible"] = bool(margin >= 0)
        row["chosen"] = False
    feasible = [i for i, row in enumerate(rows) if row["feasible"]]
    if feasible:
        best = max(feasible, key=lambda i: (rows[i]["M_k_X"], -i))
    else:
        best = max(range(len(rows)), key=lambda i: (margins[i], -i))
    rows[best]["chosen"] = True
    return best


def shrinkage_pair(value) -> tuple[float, float]:
    """A ``shrinkage`` parameter (one gamma for both sides, or [gamma_U, gamma_V]) as a (gamma_U, gamma_V) pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"shrinkage must be a number or a pair [gamma_U, gamma_V], got {value!r}")
        pair = (float(value[0]), float(value[1]))
    else:
        pair = (float(value), float(value))
    if not all(0.0 <= g <= 1.0 for g in pair):
        raise ValueError(f"shrinkage values must be in [0, 1], got {value!r}")
    return pair


def candidate_row(candidate: Candidate, metrics: dict[str, float]) -> dict:
    """A table row: the candidate's settings and its metrics (JSON-serialisable)."""
    row = {"candidate": candidate.label(), **asdict(candidate), **{key: float(metrics[key]) for key in SELECT_METRICS}}
    row["shrinkage"] = list(candidate.shrinkage)
    return row


def format_table(rows: list[dict], reference: dict | None = None) -> str:
    """The selection table as fixed-width text (for the fit CLI and logs)."""
    head = f"{'candidate':<44} {'Omega_k':>8} {'Psi':>8} {'M_k_X':>8} {'M_k_Z':>8}  feasible"
    lines = [head]
    if reference:
        lines.append(f"{'realign (reference)':<44} " + " ".join(f"{reference[k]:>8.4f}" for k in SELECT_METRICS))
    for row in rows:
        mark = " <- chosen" if row.get("chosen") else ""
        lines.append(f"{row['candidate']:<44} " + " ".join(f"{row[k]:>8.4f}" for k in SELECT_METRICS)
                     + f"  {'yes' if row.get('feasible') else 'no':>8}{mark}")
    return "\n".join(lines)
