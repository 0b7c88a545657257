"""``unicorn``: the Unicorn recipe (arXiv 2503.22655, eq. 3).

Training substitutes are the mean-removed text embeddings, z = Norm(y - mu_t): an image-free
approximation of y - mu_t + mu_i. Unicorn's released code leaves the difference un-normalised; our
interface returns unit vectors, so we normalise (the direction is identical).

Unicorn moves images too: at inference a real image embedding is mean-removed, x' = Norm(x - mu_i).
:meth:`UnicornAligner.transform_image` does that with the image mean of the *fit* images (the paper
uses the test-set image mean, which would make the transform batch-dependent).
"""

from __future__ import annotations

import numpy as np

from ..embeddings import l2_normalize
from .base import Aligner, FitContext, _to_device32, register_aligner


@register_aligner
class UnicornAligner(Aligner):
    """Tensors: ``mu_text`` (d,), ``mu_image`` (d,), float64."""

    name = "unicorn"
    default_params: dict = {}

    def _fit(self, ctx: FitContext) -> None:
        self.tensors["mu_text"] = ctx.text_moments.mean
        self.tensors["mu_image"] = ctx.image_moments.mean

    def _map(self, text: np.ndarray) -> np.ndarray:
        return text - self.tensors["mu_text"]

    def _device_tensors(self, device) -> dict:
        return {"mu_text": _to_device32(self.tensors["mu_text"], device)}

    def _map_torch(self, text, tensors):
        return text - tensors["mu_text"]

    def transform_image(self, image, *, normalize: bool = False) -> np.ndarray:
        """x' = Norm(x - mu_i): the image side of Unicorn at inference. (N, d) -> float32 unit (N, d)."""
        x = super().transform_image(image, normalize=normalize).astype(np.float64)
        return l2_normalize(x - self.tensors["mu_image"]).astype(np.float32)
