"""Blockwise polar coordinates of the dominant-subspace coordinates (spec §2.3-§2.4, eq. 2).

The r coordinates c = B^T z (B = Q_U R, the mixed frame basis) are read as m = r/2 two-dimensional
blocks (a_k, b_k) = (c_{2k}, c_{2k+1}) (0-based; the spec's a_k = c_{2k-1}, b_k = c_{2k} 1-based [INF]).

    rho_k   = sqrt(a_k^2 + b_k^2 + eps)          (radius, eps > 0 keeps log rho and 1/rho finite)
    theta_k = atan2(b_k, a_k)  in [-pi, pi]      (phase)
    wrap(x) = ((x + pi) mod 2 pi) - pi           (into [-pi, pi))

:func:`from_polar` is the exact inverse of :func:`to_polar`: it removes the ``eps`` again, using the
magnitude sqrt(max(rho^2 - eps, 0)), so c -> (rho, theta) -> c holds to float rounding (about 1e-15
in float64). Every function accepts NumPy arrays or torch tensors, with the block axis last: inputs
(..., r), outputs (..., m).
"""

from __future__ import annotations

import math

import numpy as np
import torch

TWO_PI = 2.0 * math.pi


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def wrap(x):
    """Wrap angles (radians) into [-pi, pi): ((x + pi) mod 2 pi) - pi. NumPy or torch, any shape."""
    if _is_torch(x):
        return torch.remainder(x + math.pi, TWO_PI) - math.pi
    return np.mod(np.asarray(x) + math.pi, TWO_PI) - math.pi


def split_blocks(c):
    """(a, b) = (c[..., 0::2], c[..., 1::2]): the two coordinates of every block, each (..., m)."""
    if c.shape[-1] % 2:
        raise ValueError(f"polar blocks need an even number of coordinates, got r={c.shape[-1]}")
    return c[..., 0::2], c[..., 1::2]


def merge_blocks(a, b):
    """Inverse of :func:`split_blocks`: interleave (..., m) and (..., m) into (..., 2m)."""
    if _is_torch(a):
        return torch.stack([a, b], dim=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])
    return np.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def to_polar(c, eps: float):
    """Coordinates c (..., r) -> (rho, theta), each (..., r/2). Same dtype and library as ``c``."""
    a, b = split_blocks(c)
    if _is_torch(c):
        return torch.sqrt(a * a + b * b + eps), torch.atan2(b, a)
    return np.sqrt(a * a + b * b + eps), np.arctan2(b, a)


def from_polar(rho, theta, eps: float):
    """(rho, theta), each (..., m) -> coordinates (..., 2m) with blocks (|rho| cos theta, |rho| sin theta).

    |rho| = sqrt(max(rho^2 - eps, 0)) undoes the ``eps`` of :func:`to_polar`, so the round trip is exact.
    """
    if _is_torch(rho):
        mag = torch.sqrt(torch.clamp(rho * rho - eps, min=0.0))
        return merge_blocks(mag * torch.cos(theta), mag * torch.sin(theta))
    mag = np.sqrt(np.maximum(rho * rho - eps, 0.0))
    return merge_blocks(mag * np.cos(theta), mag * np.sin(theta))
