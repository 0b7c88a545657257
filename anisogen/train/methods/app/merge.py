"""APP merge math on projector state dicts: SVD truncation, TIES trimming, the merge itself.

See the package docstring for the equations and ``docs/METHODS.md`` for every default.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from .config import AppConfig

def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Numerical rank from descending singular values ``s`` (float64) of an ``shape`` matrix.

    Same tolerance as ``torch.linalg.matrix_rank``: ``s_max * max(m, n) * eps``.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float64).eps
    return int((s > tol).sum())


def choose_k(
    s: torch.Tensor, rank: int, *, mode: str, k_ratio: float = 0.25, energy: float = 0.8, min_k: int = 1
) -> int:
    """Number of kept components for singular values ``s`` (descending, float64).

    ``ratio``: ``floor(rank * k_ratio)``; ``energy``: smallest k whose cumulative ``s^2`` fraction
    reaches ``energy`` (a relative slack of 1e-12 absorbs rounding). Clamped to ``[min_k, rank]``;
    0 when ``rank == 0`` (nothing to keep).
    """
    if rank == 0:
        return 0
    if mode == "ratio":
        k = math.floor(rank * k_ratio)
    elif mode == "energy":
        e = s.double() ** 2
        frac = torch.cumsum(e, 0) / e.sum()
        k = int(torch.searchsorted(frac, torch.tensor(energy - 1e-12, dtype=frac.dtype)).item()) + 1
    else:
        raise ValueError(f"choose_k: mode must be 'ratio' or 'energy', got {mode!r}")
    return int(min(max(k, min_k), rank))


def svd_truncate(
    delta: torch.Tensor,
    *,
    mode: str = "energy",
    k_ratio: float = 0.25,
    energy: float = 0.8,
    min_k: int = 1,
    k: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Best rank-k approximation (Eckart-Young) of a 2-D task vector.

    Args:
        delta: (m, n) tensor, any float dtype/device; the SVD runs in float64 on CPU.
        mode, k_ratio, energy, min_k: the k rule (:func:`choose_k`).
        k: explicit number of components (overrides the rule; clamped to the rank).
    Returns:
        ``(delta_k, info)``: ``delta_k`` (m, n) float64 CPU; ``info`` = {``k``, ``rank``,
        ``retained_energy`` (sum of kept s^2 / total, 1.0 for a zero delta), ``norm_fraction``
        (||delta_k||_F / ||delta||_F), ``frobenius`` (||delta||_F), ``spectrum`` (list of all s)}.
    """
    if delta.dim() != 2:
        raise ValueError(f"svd_truncate needs a 2-D matrix, got shape {tuple(delta.shape)}")
    d = delta.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(d).all():
        raise ValueError("task vector contains NaN/inf values; the fine-tuned checkpoint is broken")
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    rank = numerical_rank(s, tuple(d.shape))
    if k is None:
        k = choose_k(s, rank, mode=mode, k_ratio=k_ratio, energy=energy, min_k=min_k)
    else:
        k = int(min(max(int(k), 0), rank))
    delta_k = (u[:, :k] * s[:k]) @ vh[:k, :]
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    info = {
        "k": int(k),
        "rank": int(rank),
        "retained_energy": kept / total if total > 0 else 1.0,
        "norm_fraction": math.sqrt(kept / total) if total > 0 else 1.0,
        "frobenius": math.sqrt(total),
        "spectrum": [float(x) for x in s],
    }
    return delta_k, info


def ties_trim(delta: torch.Tensor, density: float) -> tuple[torch.Tensor, dict]:
    """Single-task TIES: keep the ``ceil(density * numel)`` largest-|x| entries (ties broken by index).

    Returns ``(trimmed float64 CPU, info{kept, numel, retained_energy})``.
    """
    d = delta.detach().to(device="cpu", dtype=torch.float64)
    flat = d.flatten()
    n_keep = max(1, math.ceil(density * flat.numel())) if flat.numel() else 0
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:n_keep]] = True
    out = torch.where(keep, flat, torch.zeros_like(flat)).reshape(d.shape)
    total = float((flat**2).sum())
    return out, {
        "kept": int(n_keep),
        "numel": int(flat.numel()),
        "retained_energy": float((out**2).sum()) / total if total > 0 else 1.0,
    }


def _selected(name: str, include) -> bool:
    if include is None:
        return True
    if isinstance(include, str):
        return re.search(include, name) is not None
    return name in set(include)


def _check_pair(pre: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(pre) ^ set(ft))
    if missing:
        where = "fine-tuned" if missing[0] in pre else "pre-trained"
        raise KeyError(
            f"projector state dicts differ: tensor {missing[0]!r} is missing from the {where} checkpoint "
            f"({len(missing)} mismatched names); both must come from the same projector kind"
        )
    for name in pre:
        if tuple(pre[name].shape) != tuple(ft[name].shape):
            raise ValueError(
                f"tensor {name!r}: pre-trained shape {tuple(pre[name].shape)} != fine-tuned shape "
                f"{tuple(ft[name].shape)}"
            )


def app_merge(
    pre_sd: Mapping[str, torch.Tensor],
    ft_sd: Mapping[str, torch.Tensor],
    config: AppConfig | None = None,
    **kwargs,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge a fine-tuned projector into its pre-trained anchor (APP / naive TV / TIES).

    Args:
        pre_sd: theta_pre, name -> tensor (the stage-1 projector).
        ft_sd: theta_ft with the same names and shapes (the stage-2 projector-only fine-tune).
        config: an :class:`AppConfig`; or pass its fields as ``kwargs``.
    Returns:
        ``(merged, report)``: ``merged`` has the names, shapes and dtypes of ``ft_sd`` (arithmetic in
        float64 on CPU, then cast); ``report`` is JSON-able: ``{"method", "config", "tensors": {name:
        {...}}, "totals"}`` where each matrix entry carries ``k``, ``rank``, ``retained_energy``,
        ``spectrum`` and each non-matrix entry its ``bias_policy`` and ``scale``.
    """
    if config is None:
        config = AppConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either an AppConfig or keyword options, not both")
    _check_pair(pre_sd, ft_sd)
    merged: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict] = {}
    # matrices first, so that biases can use the sibling weight's norm fraction
    names = sorted(pre_sd, key=lambda n: (pre_sd[n].dim() != 2, n))
    for name in names:
        pre = pre_sd[name].detach().to("cpu", torch.float64)
        ft = ft_sd[name].detach().to("cpu", torch.float64)
        out_dtype = ft_sd[name].dtype
        if not torch.is_floating_point(ft_sd[name]):
            merged[name] = ft_sd[name].detach().clone()
            tensors[name] = {"kind": "copied", "reason": "not floating point"}
            continue
        tau = ft - pre
        entry: dict = {"shape": list(pre.shape), "frobenius": float(tau.norm())}
        if pre.dim() == 2:
            filtered = _selected(name, config.include)
            if config.mode in ("energy", "ratio") and filtered:
                tau_f, info = svd_truncate(
                    tau, mode=config.mode, k_ratio=config.k_ratio, energy=config.energy, min_k=config.min_k
                )
                entry.update(kind="matrix", filtered=True, **info)
            elif config.mode == "ties" and filtered:
                tau_f, info = ties_trim(tau, config.density)
                entry.update(kind="matrix", filtered=True, **info)
                entry["norm_fraction"] = math.sqrt(info["retained_energy"])
            else:
                tau_f = tau
                entry.update(kind="matrix", filtered=False, retained_energy=1.0, norm_fraction=1.0)
                if config.mode in ("energy", "ratio"):
                    # still report the spectrum of unfiltered matrices (useful for the analysis)
                    _, info = svd_truncate(tau, k=None, mode="ratio", k_ratio=1.0)
                    entry.update(k=info["rank"], rank=info["rank"], spectrum=info["spectrum"])
            merged[name] = (pre + config.alpha * tau_f).to(out_dtype)
        else:
            policy = config.bias_policy
            if policy == "full":
                scale = 1.0
            elif policy == "drop":
                scale = 0.0
            else:
                if config.bias_scale is not None:
                    scale = float(config.bias_scale)
                else:
                    sibling = _sibling_weight(name)
                    if sibling is None or sibling not in tensors:
                        raise KeyError(
                            f"bias_policy='scale' needs the weight matrix paired with {name!r} "
                            f"(expected {sibling!r}); pass bias_scale= for unpaired tensors"
                        )
                    scale = float(tensors[sibling].get("norm_fraction", 1.0))
            entry.update(kind="vector", bias_policy=policy, scale=scale)
            merged[name] = (pre + config.alpha * scale * tau).to(out_dtype)
        tensors[name] = entry
    report = {
        "method": "app" if config.mode in ("energy", "ratio") else config.mode,
        "config": config.to_dict(),
        "tensors": {n: tensors[n] for n in sorted(tensors)},
        "totals": _totals(tensors),
    }
    return {n: merged[n] for n in ft_sd}, report


def _sibling_weight(name: str) -> str | None:
    if name.endswith("bias"):
        return name[: -len("bias")] + "weight"
    return None


def _totals(tensors: dict[str, dict]) -> dict:
    mats = [t for t in tensors.values() if t.get("kind") == "matrix"]
    tot = sum(t["frobenius"] ** 2 for t in mats)
    kept = sum(t["frobenius"] ** 2 * t.get("retained_energy", 1.0) for t in mats)
    return {
        "matrices": len(mats),
        "filtered": sum(1 for t in mats if t.get("filtered")),
        "retained_energy": kept / tot if tot > 0 else 1.0,
    }


def task_vector(pre_sd: Mapping[str, torch.Tensor], ft_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ft - pre`` per tensor in float64 on CPU (the paper's tau)."""
    _check_pair(pre_sd, ft_sd)
    return {n: ft_sd[n].detach().to("cpu", torch.float64) - pre_sd[n].detach().to("cpu", torch.float64) for n in pre_sd}

