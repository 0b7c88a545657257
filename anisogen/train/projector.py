"""Projectors: CLIP-space embeddings -> LM input embeddings.

Kinds (``build_projector(kind, d_in, d_out)``):

``linear``
    ``Linear(d_in, d_out)``; one LM token per input vector.
``mlp{N}x_gelu``
    LLaVA layout: ``Linear(d_in, d_out)`` then ``N-1`` times ``[GELU, Linear(d_out, d_out)]``, as an
    ``nn.Sequential`` so that ``mlp2x_gelu`` has the state-dict keys ``0.weight, 0.bias, 2.weight,
    2.bias`` of LLaVA's ``mm_projector`` (and APP can operate on its two matrices).
``expand{k}``
    ClipCap-style ``Linear(d_in, k * d_out)`` reshaped to ``k`` LM tokens per input vector.

Every projector maps ``(B, d_in)`` or ``(B, n, d_in)`` float tensors to ``(B, n * k, d_out)``, where
``k = tokens_per_vector`` (1 except for ``expand{k}``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import PROJECTOR_KINDS_HELP

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")
_EXPAND_RE = re.compile(r"^expand(\d+)$")



class Projector(nn.Sequential):
    """An ``nn.Sequential`` with LLaVA-compatible keys plus the metadata needed to rebuild it.

    Attributes: ``kind``, ``d_in``, ``d_out``, ``tokens_per_vector``.
    """

    def __init__(self, kind: str, d_in: int, d_out: int, layers: list[nn.Module], tokens_per_vector: int):
        super().__init__(*layers)
        self.kind = kind
        self.d_in = int(d_in)
        self.d_out = int(d_out)
        self.tokens_per_vector = int(tokens_per_vector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - see module docstring
        if x.dim() == 2:
            x = x[:, None, :]
        if x.dim() != 3:
            raise ValueError(f"projector input must be (B, d) or (B, n, d), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"embedding dimension {x.shape[-1]} does not match the projector input dimension {self.d_in} "
                f"({self.kind}); the embeddings come from a different CLIP model than the projector was built for"
            )
        b, n, _ = x.shape
        y = super().forward(x)
        return y.reshape(b, n * self.tokens_per_vector, self.d_out)

    def describe(self) -> dict:
        """JSON-able description used in checkpoint and export configs."""
        return {"kind": self.kind, "d_in": self.d_in, "d_out": self.d_out, "tokens_per_vector": self.tokens_per_vector}


def build_projector(kind: str, d_in: int, d_out: int) -> Projector:
    """Build a projector of ``kind`` (see the module docstring) in float32."""
    if kind == "linear":
        return Projector(kind, d_in, d_out, [nn.Linear(d_in, d_out)], 1)
    m = _MLP_RE.match(kind)
    if m:
        depth = int(m.group(1))
        if depth < 1:
            raise ValueError(f"projector {kind!r}: depth must be >= 1")
        layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(d_out, d_out)]
        return Projector(kind, d_in, d_out, layers, 1)
    m = _EXPAND_RE.match(kind)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise ValueError(f"projector {kind!r}: k must be >= 1")
        return Projector(kind, d_in, d_out, [nn.Linear(d_in, k * d_out)], k)
    raise ValueError(f"unknown projector kind {kind!r}; expected {PROJECTOR_KINDS_HELP}")


def projector_from_description(desc: dict) -> Projector:
    """Rebuild an (untrained) projector from :meth:`Projector.describe` output."""
    return build_projector(desc["kind"], int(desc["d_in"]), int(desc["d_out"]))
