"""``realign``: ReAlign (arXiv 2602.07026, §4), Anchor -> Trace -> Centroid, in float64.

1. Anchor: y - mu_t + mu_i.
2. Trace: scale the residual by s = sqrt(tr Sigma_i / (tr Sigma_t + eps)) so that its energy matches the
   image spread: e' = Norm(mu_i + s (y - mu_t)).
3. Centroid: e = Norm(e' - mu_hat + mu_i), with mu_hat = E[e'] over the **fit texts**, stored in the
   artifact and reused, so transforms of held-out text do not depend on the batch (spec §6 Q18).

Images are untouched.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Aligner, FitContext, _to_device32, register_aligner


@register_aligner
class ReAlignAligner(Aligner):
    """Tensors: ``mu_text``, ``mu_image`` (d,), ``scale`` (1,), ``trace_text``/``trace_image`` (1,), ``mu_hat`` (d,)."""

    name = "realign"
    default_params = {"eps": 1e-10}
    centroid_calibration = True

    def _fit(self, ctx: FitContext) -> None:
        trace_text = ctx.text_moments.trace
        trace_image = ctx.image_moments.trace
        self.tensors["mu_text"] = ctx.text_moments.mean
        self.tensors["mu_image"] = ctx.image_moments.mean
        self.tensors["trace_text"] = np.array([trace_text])
        self.tensors["trace_image"] = np.array([trace_image])
        self.tensors["scale"] = np.array([np.sqrt(trace_image / (trace_text + float(self.params["eps"])))])

    def _map(self, text: np.ndarray) -> np.ndarray:
        return self.tensors["mu_image"] + self.tensors["scale"][0] * (text - self.tensors["mu_text"])

    def _device_tensors(self, device) -> dict:
        # mu_i + s (y - mu_t) = s y + (mu_i - s mu_t): the offset is formed in float64
        scale = float(self.tensors["scale"][0])
        return {"scale": _to_device32([scale], device),
                "offset": _to_device32(self.tensors["mu_image"] - scale * self.tensors["mu_text"], device)}

    def _map_torch(self, text, tensors):
        return torch.addcmul(tensors["offset"], text, tensors["scale"])
