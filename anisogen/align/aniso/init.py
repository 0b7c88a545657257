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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...stats import Moments
from .frame import Frame
from .polar import to_polar

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


def v_side_scaling(text_moments: Moments, image_moments: Moments, q_v: np.ndarray, eps: float) -> np.ndarray:
    """D (d - r,) = sigma_V^x / (sigma_V^y + eps): per-coordinate std ratio in the Q_V basis (float64)."""
    var_x = np.sum(q_v * (image_moments.covariance @ q_v), axis=0)
    var_y = np.sum(q_v * (text_moments.covariance @ q_v), axis=0)
    return np.sqrt(np.clip(var_x, 0.0, None)) / (np.sqrt(np.clip(var_y, 0.0, None)) + eps)


@dataclass
class GlobalInit:
    """The fitted Stage II-a map. ``radial`` None means T_k = identity; ``d_v`` all ones means D = I."""

    mu_text: np.ndarray
    mu_image: np.ndarray
    frame: Frame
    radial: RadialMap | None
    d_v: np.ndarray
    eps: float

    def __post_init__(self) -> None:
        q_v = self.frame.q_v
        self._basis = self.frame.basis
        self._v_matrix = (q_v * self.d_v) @ q_v.T  # Q_V D Q_V^T, (d, d)
        self._v_offset = q_v @ (q_v.T @ self.mu_image) - self._v_matrix @ self.mu_text

    def coords(self, text: np.ndarray) -> np.ndarray:
        """c = B^T (y - mu_t + mu_i), (n, r) float64."""
        return (text - self.mu_text + self.mu_image) @ self._basis

    def state(self, text: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(theta^(0), rho^(0), v^(0)) of texts (n, d): (n, m), (n, m), (n, d), float64."""
        rho, theta = to_polar(self.coords(text), self.eps)
        rho0 = self.radial(rho) if self.radial is not None else rho
        v0 = text @ self._v_matrix + self._v_offset
        return theta, rho0, v0

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"init.d_v": self.d_v}
        if self.radial is not None:
            out.update(self.radial.tensors())
        return out
