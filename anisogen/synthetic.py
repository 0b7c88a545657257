"""Synthetic paired image/text embeddings on the unit sphere with a known modality gap.

Construction (all directions drawn from one seeded random orthonormal basis of R^d):

* two orthogonal unit *anchors* m_x (images) and m_y (texts);
* a shared *content* subspace of rank ``content_rank`` whose coordinates have a power-law spectrum
  (the dominant geometry both modalities share);
* an image-only *residual* subspace E of rank ``residual_rank`` (the anisotropic part of the gap);
* isotropic noise over every non-anchor direction.

For item i with content c_i:
    u_i  = Norm(c_i + E g_i * residual_strength / sqrt(rank) + noise),   u'_i = Norm(c_i + noise')
    x_i  = cos(phi) m_x + sin(phi) u_i,                                 y_i  = cos(phi) m_y + sin(phi) u'_i
with cos(phi) = gap / sqrt(2). Both are exactly unit norm. Samples come in antithetic pairs
(u, u') and (-u, -u'), so the sample means are exactly mu_x = cos(phi) m_x and mu_y = cos(phi) m_y and
the planted centroid gap ||mu_x - mu_y|| equals ``gap`` up to float rounding.
The mean-corrected residual is r_i = sin(phi) (u_i - u'_i): isotropic over the d - 2 non-anchor
directions when ``residual_rank = 0`` and ``content_decay = 0``, dominated by E otherwise.

The residual planted by E is independent of the text: no text -> image map can remove it. The
AnisoAlign paper's premise is a *structured* distortion of the shared geometry instead; ``gain`` and
``gain_rank`` plant one (:func:`plant_gain`): the images' coordinates along the top ``gain_rank`` content
directions are scaled by ``gain``, so the paired residual is dominated by those directions and is a
function of the text, which an unpaired aligner can learn to undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .embeddings import l2_normalize


@dataclass
class SyntheticPairs:
    """Paired rows: ``image[i]`` and ``text[i]`` describe the same item. Arrays are float64 (n, d)."""

    image: np.ndarray
    text: np.ndarray
    truth: dict = field(default_factory=dict)

    def split(self, n_fit: int, seed: int = 0, *, keep_antithetic: bool = False
              ) -> tuple[np.ndarray, np.ndarray, "SyntheticPairs"]:
        """Unpaired fit sets and a paired held-out set.

        Returns ``(fit_text, fit_image, heldout)``: ``n_fit`` items (shuffled with ``seed``) give fit
        texts from one half and fit images from the other half, so no fit text has its image among the
        fit images; the remaining items form the paired held-out set.

        With ``keep_antithetic`` the items are shuffled as antithetic pairs (i, i + n/2), so every part
        keeps the exact planted means (``n_fit`` must then be a multiple of 4).
        """
        n = self.image.shape[0]
        if not 2 <= n_fit < n:
            raise ValueError(f"n_fit={n_fit} must be in [2, {n})")
        rng = np.random.default_rng(seed)
        if keep_antithetic:
            if n_fit % 4:
                raise ValueError(f"keep_antithetic needs n_fit divisible by 4, got {n_fit}")
            base = rng.permutation(n // 2)
            pairs = lambda idx: np.concatenate([idx, idx + n // 2])  # noqa: E731
            q = n_fit // 4
            text_idx, image_idx, held = pairs(base[:q]), pairs(base[q : 2 * q]), pairs(base[2 * q :])
        else:
            order = rng.permutation(n)
            half = n_fit // 2
            text_idx, image_idx, held = order[:half], order[half:n_fit], order[n_fit:]
        heldout = SyntheticPairs(self.image[held], self.text[held], self.truth)
        return self.text[text_idx], self.image[image_idx], heldout


def make_paired_embeddings(
    n: int = 20000,
    d: int = 64,
    *,
    gap: float = 0.4,
    content_rank: int | None = None,
    content_decay: float = 1.0,
    residual_rank: int = 4,
    residual_strength: float = 1.0,
    noise: float = 0.3,
    gain: float = 1.0,
    gain_rank: int = 0,
    seed: int = 0,
) -> SyntheticPairs:
    """Generate ``n`` (even) paired unit embeddings in R^d with a planted gap (see module docstring).

    Args:
        gap: the planted centroid gap G_mu, in (0, sqrt(2)).
        content_rank: rank of the shared content subspace (default: half of the free directions).
        content_decay: power-law exponent of the content spectrum (0 = isotropic content).
        residual_rank: rank k of the image-only anisotropic residual (0 = none).
        residual_strength: norm scale of the residual relative to the unit-scale content.
        noise: norm scale of the isotropic noise added to both modalities.
        gain, gain_rank: scale the images' top ``gain_rank`` content coordinates by ``gain`` (see
            :func:`plant_gain`; ``gain_rank = 0`` plants nothing).

    ``truth`` holds ``G_mu``, ``cos_phi``, ``anchor_image``/``anchor_text`` (d,), ``content_basis``
    (d, content_rank) and ``residual_basis`` (d, residual_rank).
    """
    if n < 2 or n % 2:
        raise ValueError(f"n must be an even number >= 2 (antithetic pairs), got {n}")
    if not 0.0 < gap < np.sqrt(2.0):
        raise ValueError(f"gap must be in (0, sqrt(2)), got {gap}")
    free = d - 2
    if content_rank is None:
        content_rank = max(1, free // 2)
    if content_rank < 1 or content_rank + residual_rank > free:
        raise ValueError(f"content_rank={content_rank} + residual_rank={residual_rank} must fit in d-2={free}")

    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    anchor_x, anchor_y = basis[:, 0], basis[:, 1]
    content_basis = basis[:, 2 : 2 + content_rank]
    residual_basis = basis[:, 2 + content_rank : 2 + content_rank + residual_rank]
    free_basis = basis[:, 2:]

    half = n // 2
    spectrum = np.arange(1, content_rank + 1, dtype=np.float64) ** (-content_decay)
    spectrum /= spectrum.sum()
    content = (rng.standard_normal((half, content_rank)) * np.sqrt(spectrum)) @ content_basis.T
    noise_x = noise * (rng.standard_normal((half, free)) / np.sqrt(free)) @ free_basis.T
    noise_y = noise * (rng.standard_normal((half, free)) / np.sqrt(free)) @ free_basis.T
    u_x = content + noise_x
    if residual_rank:
        u_x = (
            u_x
            + residual_strength
            * (rng.standard_normal((half, residual_rank)) / np.sqrt(residual_rank))
            @ residual_basis.T
        )
    u_y = content + noise_y
    u_x, u_y = l2_normalize(u_x), l2_normalize(u_y)
    u_x, u_y = np.vstack([u_x, -u_x]), np.vstack([u_y, -u_y])

    cos_phi = gap / np.sqrt(2.0)
    sin_phi = np.sqrt(1.0 - cos_phi**2)
    image = cos_phi * anchor_x + sin_phi * u_x
    text = cos_phi * anchor_y + sin_phi * u_y
    truth = {
        "G_mu": float(gap), "cos_phi": float(cos_phi), "anchor_image": anchor_x, "anchor_text": anchor_y,
        "content_basis": content_basis, "residual_basis": residual_basis,
    }
    pairs = SyntheticPairs(image=image, text=text, truth=truth)
    return plant_gain(pairs, gain, gain_rank) if gain_rank else pairs


def plant_gain(pairs: SyntheticPairs, gain: float, k: int) -> SyntheticPairs:
    """New pairs whose images carry an anisotropic gain on the top-``k`` content directions.

    The non-anchor part u of every image becomes Norm(u + (gain - 1) P_k u), P_k the projector on the
    first k content directions. Unit norms, the planted means (the map is odd in u, so antithetic pairs
    stay antithetic) and the texts are unchanged. ``truth`` gains ``gain`` and ``gain_basis`` (d, k).
    """
    if gain <= 0:
        raise ValueError(f"gain must be > 0, got {gain}")
    basis = pairs.truth["content_basis"][:, :k]
    if basis.shape[1] != k:
        raise ValueError(f"k={k} exceeds the content rank {pairs.truth['content_basis'].shape[1]}")
    cos_phi = pairs.truth["cos_phi"]
    sin_phi = np.sqrt(1.0 - cos_phi**2)
    anchor = pairs.truth["anchor_image"]
    u = (pairs.image - cos_phi * anchor) / sin_phi
    u = l2_normalize(u + (gain - 1.0) * (u @ basis) @ basis.T)
    truth = {**pairs.truth, "gain": float(gain), "gain_basis": basis}
    return SyntheticPairs(image=cos_phi * anchor + sin_phi * u, text=pairs.text, truth=truth)
