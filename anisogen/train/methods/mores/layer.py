"""One LoReFT-form steering intervention ``h' = h + R^T (W h + b - R h)`` (float32, orthonormal R)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations


class SteeringIntervention(nn.Module):
    """One LoReFT-form intervention ``h' = h + R^T (W h + b - R h)`` (float32).

    Args:
        dim: D, the hidden size. rank: r (paper: 1).
        dropout: probability (authors: 0.05). dropout_on: ``delta`` (default) | ``output`` (faithful).
        init_identity: start with ``W = R, b = 0`` (identity map).
        trivialization: ``use_trivialization`` of the orthogonal parametrization (see module doc).
    Parameters: ``rotate.parametrizations.weight.original`` (r, D), ``proj.weight`` (r, D),
    ``proj.bias`` (r,): r(2D+1) in total.
    """

    def __init__(self, dim: int, rank: int = 1, *, dropout: float = 0.05, dropout_on: str = "delta",
                 init_identity: bool = False, trivialization: bool = False):
        super().__init__()
        if not 1 <= rank <= dim:
            raise ValueError(f"rank must be in [1, {dim}], got {rank}")
        if dropout_on not in ("output", "delta"):
            raise ValueError(f"dropout_on must be 'output' or 'delta', got {dropout_on!r}")
        self.dim, self.rank, self.dropout_on = int(dim), int(rank), dropout_on
        rot = nn.Linear(dim, rank, bias=False, dtype=torch.float32)
        nn.init.orthogonal_(rot.weight)
        self.rotate = parametrizations.orthogonal(rot, "weight", orthogonal_map="householder",
                                                  use_trivialization=trivialization)
        self.proj = nn.Linear(dim, rank, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout)
        if init_identity:
            self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        """``W <- R``, ``b <- 0``: the intervention becomes the identity."""
        self.proj.weight.copy_(self.R)
        self.proj.bias.zero_()

    @property
    def R(self) -> torch.Tensor:
        """(r, D) float32 with orthonormal rows (materialised from the parametrization)."""
        return self.rotate.weight

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``R^T (W h + b - R h)`` for float32 ``h`` (..., D) -> (..., D)."""
        R = self.R
        return (self.proj(h) - h @ R.T) @ R

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Steer every row of ``h`` (..., D); computed in float32 and cast back to ``h.dtype``."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float()
            d = self.delta(x)
            out = self.dropout(x + d) if self.dropout_on == "output" else x + self.dropout(d)
        return out.to(h.dtype)

