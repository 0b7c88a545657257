"""``centroid``: shift text by the centroid gap, z = Norm(y - mu_t + mu_i) ("Mind the Gap" shift)."""

from __future__ import annotations

import numpy as np

from .base import Aligner, FitContext, register_aligner


@register_aligner
class CentroidAligner(Aligner):
    """Tensors: ``mu_text`` (d,), ``mu_image`` (d,), float64 means of the fit samples."""

    name = "centroid"
    default_params: dict = {}

    def _fit(self, ctx: FitContext) -> None:
        self.tensors["mu_text"] = ctx.text_moments.mean
        self.tensors["mu_image"] = ctx.image_moments.mean

    def _map(self, text: np.ndarray) -> np.ndarray:
        return text - self.tensors["mu_text"] + self.tensors["mu_image"]
