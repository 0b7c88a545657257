"""``c3``: Connect-Collapse-Corrupt (Zhang et al., ICLR 2024) as adapted by AnisoAlign (App. B.3).

z = Norm(y - mu_t + mu_i + sigma * eps), eps ~ N(0, I_d).

* ``sigma`` defaults to the original C3/CapDec value sqrt(0.016) ~= 0.1265 *per dimension*. At large d
  the noise norm sigma*sqrt(d) dominates the unit signal (about 4.5 at d = 1280, cos(y, z) ~ 0.2).
* ``calibrate_phi``: the calibrated alternative of the spec's §6 Q10. When set (e.g. 0.90), ``fit``
  searches the sigma for which the mean instance consistency Phi = mean(y . z) over the fit texts equals
  that value, and stores it; ``sigma`` is then ignored. AnisoAlign reports Phi ~= 0.899 for C3.

Noise is deterministic per row: it is drawn from a generator seeded by (aligner seed, a hash of the
row's float64 bytes), so the same text embedding always receives the same noise, whatever the batch,
the process or the run.

On a device (:meth:`~anisogen.align.Aligner.device_transform`) that noise is the one host step of any
aligner: each block is copied to the host, ``row_noise`` is drawn there with NumPy's PCG64 and the
float32 noise is added back on the device. The definition is kept so that published baseline numbers
stay reproducible; C3 is a baseline, not a production path.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..embeddings import l2_normalize
from .base import Aligner, FitContext, _to_device32, register_aligner

#: sigma of the original C3 / CapDec recipe (noise variance 0.016 per dimension).
C3_ORIGINAL_SIGMA = float(np.sqrt(0.016))


def row_noise(rows: np.ndarray, seed: int) -> np.ndarray:
    """Standard-normal noise (n, d), float64, a pure function of (seed, each row's float64 bytes)."""
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    noise = np.empty_like(rows)
    for i, row in enumerate(rows):
        digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
        key = [int(seed), int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")]
        noise[i] = np.random.default_rng(key).standard_normal(rows.shape[1])
    return noise


@register_aligner
class C3Aligner(Aligner):
    """Tensors: ``mu_text``, ``mu_image`` (d,), ``sigma`` (1,) = the sigma in use."""

    name = "c3"
    default_params = {"sigma": C3_ORIGINAL_SIGMA, "calibrate_phi": None, "calibration_rows": 4096}

    def _fit(self, ctx: FitContext) -> None:
        self.tensors["mu_text"] = ctx.text_moments.mean
        self.tensors["mu_image"] = ctx.image_moments.mean
        target = self.params["calibrate_phi"]
        if target is None:
            sigma = float(self.params["sigma"])
            if sigma < 0:
                raise ValueError(f"c3: sigma must be >= 0, got {sigma}")
        else:
            sigma = self._calibrate_sigma(ctx, float(target))
        self.tensors["sigma"] = np.array([sigma])

    def _calibrate_sigma(self, ctx: FitContext, target_phi: float) -> float:
        """Bisection on sigma so that mean(y . Norm(anchor(y) + sigma eps)) = target_phi on fit texts."""
        if not 0.0 < target_phi < 1.0:
            raise ValueError(f"c3: calibrate_phi must be in (0, 1), got {target_phi}")
        rows, want = [], int(self.params["calibration_rows"])
        for chunk in ctx.text_chunks():
            rows.append(chunk[: want - sum(len(r) for r in rows)])
            if sum(len(r) for r in rows) >= want:
                break
        text = np.concatenate(rows)
        anchored = text - self.tensors["mu_text"] + self.tensors["mu_image"]
        noise = row_noise(text, self.seed)

        def phi(sigma: float) -> float:
            return float(np.mean(np.sum(text * l2_normalize(anchored + sigma * noise), axis=1)))

        if phi(0.0) < target_phi:
            raise ValueError(
                f"c3: calibrate_phi={target_phi} is unreachable; the noiseless centroid shift already gives "
                f"Phi={phi(0.0):.4f}"
            )
        lo, hi = 0.0, 1.0
        while phi(hi) > target_phi:
            hi *= 2.0
        for _ in range(60):
            mid = (lo + hi) / 2.0
            lo, hi = (mid, hi) if phi(mid) > target_phi else (lo, mid)
        return (lo + hi) / 2.0

    def _map(self, text: np.ndarray) -> np.ndarray:
        anchored = text - self.tensors["mu_text"] + self.tensors["mu_image"]
        sigma = float(self.tensors["sigma"][0])
        if sigma == 0.0:
            return anchored
        return anchored + sigma * row_noise(text, self.seed)

    def _device_tensors(self, device) -> dict:
        return {"shift": _to_device32(self.tensors["mu_image"] - self.tensors["mu_text"], device),
                "sigma": float(self.tensors["sigma"][0]), "seed": int(self.seed)}

    def _map_torch(self, text, tensors):
        """Anchor on the device; the noise is the one host step (module docstring of :mod:`..device`).

        The block goes to the host, ``row_noise`` is drawn there from each row's float64 bytes (the float32
        rows widened exactly, so the keys are those of ``transform`` on the same rows), and sigma * noise
        comes back as float32. All-zero rows are the block's padding (real rows have unit norm): no noise.
        """
        anchored = text + tensors["shift"]
        sigma = tensors["sigma"]
        if sigma == 0.0:
            return anchored
        rows = text.cpu().numpy().astype(np.float64)
        noise = np.zeros_like(rows)
        real = np.flatnonzero(np.any(rows != 0.0, axis=1))
        if real.size:
            noise[real] = sigma * row_noise(rows[real], tensors["seed"])
        return anchored + torch.from_numpy(noise.astype(np.float32)).to(text.device)
