"""``centroid``: shift text by the centroid gap, z = Norm(y - mu_t + mu_i) ("Mind the Gap" shift)."""

from __future__ import annotations

import numpy as np

from .base import Aligner, FitContext, _to_device32, register_aligner


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

    def _device_tensors(self, device) -> dict:
        return {"shift": _to_device32(self.tensors["mu_image"] - self.tensors["mu_text"], device)}

    def _map_torch(self, text, tensors):
        return text + tensors["shift"]
