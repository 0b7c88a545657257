"""Stage II-a: the deterministic global initialisation of a text embedding (spec §2.6).

1. Re-centring: y_bar = y - mu_t + mu_i.
2. U side: (rho, theta) = polar(B^T y_bar); theta^(0) = theta; rho_k^(0) = T_k(rho_k) with
   T_k = (F_k^x)^{-1} o F_k^y, per-block radial quantile matching (:class:`RadialMap`). F^y is taken over
   rho(y_bar) of the texts [INF]; both CDFs are empirical quantiles at ``knots`` levels with linear
   interpolation and clamping at the ends (spec Q8) [INF].
3. V side, in the Q_V eigenbasis (spec Q6) [INF]:
   v^(0) = Q_V [Q_V^T mu_i + D (Q_V^T y - Q_V^T mu_t)], D = diag(sigma_V^x / (sigma_V^y + eps)), where
   sigma_V^x, sigma_V^y are the per-coordinate standard deviations of images / texts in that basis, taken
   from the streaming float64 covariances. v^(0) lies exactly in V.

With ``radial="identity"`` and ``v_scaling="identity"`` (T_k = id, D = I) the state reconstructs y_bar
exactly: B c + v^(0) = P_U y_bar + P_V y_bar = y_bar (the sanity check of spec §2.9).

Shrinkage toward a global map [INF] (``shrinkage`` gamma in [0, 1]). The per-coordinate maps above match
every block's radial distribution and every V coordinate's spread separately, which reshapes caption
neighbourhoods when the two covariance shapes differ. The *global map* keeps the text's geometry and
only rescales it: c_glob = B^T mu_i + s_U B^T (y - mu_t) and v_glob = P_V mu_i + s_V P_V (y - mu_t). By default
s_U = s_V = s = sqrt(tr Sigma_i / tr Sigma_t) (``global_scale="common"``), so the global map is exactly
ReAlign's mu_i + s (y - mu_t); ``"per_side"`` takes ReAlign's trace rule on U and on V separately. The shrunk
state is the convex combination in Cartesian coordinates,
c^(0) = gamma c_paper + (1 - gamma) c_glob (then (theta^(0), rho^(0)) = polar(c^(0))) and
v^(0) = gamma v_paper + (1 - gamma) v_glob, i.e. D is replaced by gamma D + (1 - gamma) s_V. gamma = 1 is the
paper's map, bit for bit (the U side is not even re-polarised); gamma = 0 is the global map. The two sides
may take different strengths (gamma_U, gamma_V): the radial quantile maps and D_V buy different amounts of
modality mixing for the neighbourhood change they cause.

Variance floor on D_V [INF] (``floor``): sigma_V^y is replaced by sqrt(max(var_V^y, floor * mean var_V^y)), so
V directions in which texts barely vary (mostly text noise) are not blown up by sigma_V^x / sigma_V^y.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...stats import Moments
from .frame import Frame
from .polar import from_polar, to_polar

RADIAL_MAPS = ("quantile", "identity")
V_SCALINGS = ("std_ratio", "identity")


@dataclass
class RadialMap:
    """Per-block radial quantile matching T_k(r) = (F_k^x)^{-1}(F_k^y(r)).

    levels (K,) in [0, 1]; text_knots / image_knots (m, K): the empirical quantiles of the text / image
    radii of every block at those levels. All float64.
    """

    levels: np.ndarray
    text_knots: np.ndarray
    image_knots: np.ndarray

    def __call__(self, rho: np.ndarray) -> np.ndarray:
        """rho (n, m) text radii -> rho^(0) (n, m) image-distributed radii (float64)."""
        out = np.empty_like(rho, dtype=np.float64)
        for k in range(rho.shape[1]):
            cdf = np.interp(rho[:, k], self.text_knots[k], self.levels)
            out[:, k] = np.interp(cdf, self.levels, self.image_knots[k])
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        return {"init.levels": self.levels, "init.text_knots": self.text_knots, "init.image_knots": self.image_knots}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> "RadialMap | None":
        if "init.levels" not in tensors:
            return None
        return cls(tensors["init.levels"], tensors["init.text_knots"], tensors["init.image_knots"])


def fit_radial_map(text_rho: np.ndarray, image_rho: np.ndarray, knots: int) -> RadialMap:
    """Quantile knots of text radii ``text_rho`` (n_t, m) and image radii ``image_rho`` (n_i, m).

    K = min(knots, n_t, n_i) equally spaced levels from 0 to 1 (the min and max are knots, so values
    outside the sample range are clamped to the extreme image radii).
    """
    k = int(min(knots, text_rho.shape[0], image_rho.shape[0]))
    if k < 2:
        raise ValueError(f"radial quantile matching needs at least 2 knots, got {k}")
    levels = np.linspace(0.0, 1.0, k)
    text_knots = np.quantile(np.asarray(text_rho, dtype=np.float64), levels, axis=0).T.copy()
    image_knots = np.quantile(np.asarray(image_rho, dtype=np.float64), levels, axis=0).T.copy()
    return RadialMap(levels, np.maximum.accumulate(text_knots, axis=1), np.maximum.accumulate(image_knots, axis=1))


def v_side_scaling(text_moments: Moments, image_moments: Moments, q_v: np.ndarray, eps: float,
                   floor: float = 0.0) -> np.ndarray:
    """D (d - r,) = sigma_V^x / (sigma_V^y + eps): per-coordinate std ratio in the Q_V basis (float64).

    ``floor`` > 0 floors the text variances at ``floor`` times their mean over V before the ratio.
    """
    if floor < 0:
        raise ValueError(f"the D_V variance floor must be >= 0, got {floor}")
    var_x = np.clip(np.sum(q_v * (image_moments.covariance @ q_v), axis=0), 0.0, None)
    var_y = np.clip(np.sum(q_v * (text_moments.covariance @ q_v), axis=0), 0.0, None)
    if floor > 0 and var_y.size:
        var_y = np.maximum(var_y, floor * var_y.mean())
    return np.sqrt(var_x) / (np.sqrt(var_y) + eps)


GLOBAL_SCALES = ("common", "per_side")


def mean_coord_norm(rho0: np.ndarray, eps: float) -> float:
    """E ||c0|| from the radii rho0 (n, m) of initial states (``eps`` undone as in ``from_polar``)."""
    return float(np.mean(np.sqrt(np.maximum(rho0 * rho0 - eps, 0.0).sum(-1))))


def side_scales(text_moments: Moments, image_moments: Moments, basis: np.ndarray, q_v: np.ndarray,
                eps: float, mode: str = "common") -> tuple[float, float]:
    """(s_U, s_V): the global map's scales.

    ``"common"``: one scale s = sqrt(tr Sigma_i / tr Sigma_t) on both sides, ReAlign's trace rule, so the
    global map is ReAlign's pre-normalisation map mu_i + s (y - mu_t). ``"per_side"``: sqrt(tr(P Sigma_i) /
    tr(P Sigma_t)) separately on U (``basis``) and on V, which already reshapes the text geometry when the
    two sides' ratios differ.
    """
    if mode not in GLOBAL_SCALES:
        raise ValueError(f"global scale mode must be one of {GLOBAL_SCALES}, got {mode!r}")

    def trace(moments: Moments, q: np.ndarray | None) -> float:
        if q is None:
            return float(np.trace(moments.covariance))
        return float(np.sum(q * (moments.covariance @ q))) if q.size else 0.0

    def ratio(q: np.ndarray | None) -> float:
        return float(np.sqrt(max(trace(image_moments, q), 0.0) / (max(trace(text_moments, q), 0.0) + eps)))

    if mode == "common":
        s = ratio(None)
        return s, s
    return ratio(basis), ratio(q_v)


@dataclass
class GlobalInit:
    """The fitted Stage II-a map. ``radial`` None means T_k = identity; ``d_v`` all ones means D = I.

    ``shrinkage`` gamma and the side scales ``scale_u`` / ``scale_v`` define the shrunk map (module docstring);
    gamma = 1 (the default, and every artifact written before shrinkage existed) is the paper's map.
    ``shrinkage_v`` None uses the same gamma on V; a number shrinks the V side by its own gamma_V.
    """

    mu_text: np.ndarray
    mu_image: np.ndarray
    frame: Frame
    radial: RadialMap | None
    d_v: np.ndarray
    eps: float
    shrinkage: float = 1.0
    scale_u: float = 1.0
    scale_v: float = 1.0
    shrinkage_v: float | None = None

    def __post_init__(self) -> None:
        if self.shrinkage_v is None:
            self.shrinkage_v = self.shrinkage
        for gamma in (self.shrinkage, self.shrinkage_v):
            if not 0.0 <= gamma <= 1.0:
                raise ValueError(f"shrinkage gamma must be in [0, 1], got {gamma}")
        q_v = self.frame.q_v
        self._basis = self.frame.basis
        gamma = float(self.shrinkage_v)
        diag = self.d_v if gamma == 1.0 else gamma * self.d_v + (1.0 - gamma) * self.scale_v
        self._v_matrix = (q_v * diag) @ q_v.T  # Q_V D Q_V^T, (d, d)
        self._v_offset = q_v @ (q_v.T @ self.mu_image) - self._v_matrix @ self.mu_text
        self._u_offset = self.mu_image @ self._basis  # B^T mu_i

    def coords(self, text: np.ndarray) -> np.ndarray:
        """c = B^T (y - mu_t + mu_i), (n, r) float64."""
        return (text - self.mu_text + self.mu_image) @ self._basis

    def state(self, text: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(theta^(0), rho^(0), v^(0)) of texts (n, d): (n, m), (n, m), (n, d), float64."""
        coords = self.coords(text)
        rho, theta = to_polar(coords, self.eps)
        rho0 = self.radial(rho) if self.radial is not None else rho
        v0 = text @ self._v_matrix + self._v_offset
        gamma = float(self.shrinkage)
        if gamma == 1.0:
            return theta, rho0, v0
        paper = from_polar(rho0, theta, self.eps)
        glob = self._u_offset + self.scale_u * (coords - self._u_offset)  # B^T mu_i + s_U B^T (y - mu_t)
        rho0, theta0 = to_polar(gamma * paper + (1.0 - gamma) * glob, self.eps)
        return theta0, rho0, v0

    def mean_coord_norm(self, text: np.ndarray) -> float:
        """E ||c^(0)|| over ``text`` (n, d): the scale of the U-side state that the bounds act on."""
        return mean_coord_norm(self.state(text)[1], self.eps)

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"init.d_v": self.d_v, "init.shrinkage": np.array([float(self.shrinkage), float(self.shrinkage_v)]),
               "init.scales": np.array([float(self.scale_u), float(self.scale_v)])}
        if self.radial is not None:
            out.update(self.radial.tensors())
        return out
