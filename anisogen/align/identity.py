"""``identity``: the raw text embedding is the substitute (the papers' "W/o. Align" row)."""

from __future__ import annotations

import numpy as np

from .base import Aligner, FitContext, register_aligner


@register_aligner
class IdentityAligner(Aligner):
    """z = y. Fitting only records the dimension and sample counts."""

    name = "identity"
    default_params: dict = {}

    def _fit(self, ctx: FitContext) -> None:
        pass

    def _map(self, text: np.ndarray) -> np.ndarray:
        return text

    def _device_tensors(self, device) -> dict:
        return {}

    def _map_torch(self, text, tensors):
        return text
